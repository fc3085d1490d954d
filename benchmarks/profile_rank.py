"""One process of a merge under torch.profiler: what `iteris merge CONFIG --out DIR` runs, with each rank's
busiest GPU kernels and host ops written to TABLES/rank<N>.txt. Run it under torchrun as the merge would run
(benchmarks/distributed.py --profile TABLES does), with few iterations: the profiler slows the run and keeps
every event.

    torchrun --nproc-per-node 2 benchmarks/profile_rank.py merge.yaml out/ tables/
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch


def main():
    import iteris

    config, out, tables = sys.argv[1:4]
    rows = int(os.environ.get("PROFILE_ROWS", "25"))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        iteris.merge(config, out=out, force=True)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    rank = os.environ.get("RANK", "0")
    parts = [f"rank {rank}: profiled merge {wall:.1f} s"]
    if torch.cuda.is_available():
        parts.append(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))
    parts.append(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    Path(tables).mkdir(parents=True, exist_ok=True)
    (Path(tables) / f"rank{rank}.txt").write_text("\n\n".join(parts))


if __name__ == "__main__":
    main()
