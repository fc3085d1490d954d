"""Profile IterIS rounds on a random Llama-shaped model: the top GPU kernels and host-side ops.

    PYTHONPATH=src python benchmarks/profile_sweep.py --size 1b --samples 16 --iterations 1 [--trace out.json]

A warm-up merge runs first (one round, few samples), then the profiled one; the tables are torch.profiler's.
"""

from __future__ import annotations

import argparse
import time

import torch

import speed


def main():
    from iteris.merge import merge_loaded

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1b", choices=sorted(speed.SIZES))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--alpha1", type=float, default=1e-7)
    parser.add_argument("--alpha2", type=float, default=1e-7)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--trace", default=None)
    args = parser.parse_args()
    device = "cuda"
    model = speed.build_model(args.size, device)
    adapters = speed.make_adapters(model, args.adapters)
    calibration = {"batch_size": args.batch_size, "stats_dtype": "float32"}
    params = {"iterations": args.iterations, "alpha1": args.alpha1, "alpha2": args.alpha2}
    merge_loaded(model, adapters, speed.make_samples(args.adapters, 2, 512), parameters={**params, "iterations": 1},
                 calibration=calibration)
    samples = speed.make_samples(args.adapters, args.samples, 512)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        _, report = merge_loaded(model, adapters, samples, parameters=params, calibration=calibration)
        torch.cuda.synchronize()
    print(f"profiled wall {time.perf_counter() - start:.2f} s; timings {report['timings']}")
    for it in report["iterations"]:
        print({k: it.get(k) for k in ("iteration", "seconds", "capture_seconds", "solve_seconds")})
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
