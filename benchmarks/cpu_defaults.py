"""A laptop's merge: three SmolLM2-135M adapters, 50 prompts each of up to 128 tokens, on the CPU. Merge time
of IterIS settings (and RegMean / task arithmetic), how far float32 statistics move the merged update from
float64 ones, and each merge's scores on the three tasks' test split (first --limit records).

    python benchmarks/cpu_defaults.py --out benchmarks/results/cpu/cpu_defaults.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import iteris
from iteris.assets import smollm2_dir
from iteris.evaluate import evaluate

HERE = Path(__file__).resolve().parent / "quality"
TASKS = ["sentiment", "review_or_plot", "news_topic"]
SETTINGS = {
    "iteris defaults": ("iteris", {}, "auto"),  # (whatever the defaults are when run)
    "task_arithmetic": ("task_arithmetic", {"scale": 0.75}, "float64"),
    "regmean": ("regmean", {}, "float64"),
    "iteris sequential, float64 statistics": ("iteris", {"schedule": "sequential"}, "float64"),
    "iteris sequential, float32 statistics": ("iteris", {"schedule": "sequential"}, "float32"),
    "iteris global 1 iteration, float32 statistics": ("iteris", {"iterations": 1}, "float32"),
}


def merge(method: str, params: dict, stats_dtype: str, out: Path):
    adapters = [{"name": t, "path": str(HERE / "adapters" / "smollm2" / t),
                 "data": str(HERE / "data" / t / "calibration.jsonl")} for t in TASKS]
    start = time.perf_counter()
    result = iteris.merge({"base_model": str(smollm2_dir()), "method": method, "parameters": params, "device": "cpu",
                           "calibration": {"samples": 50, "max_length": 128, "stats_dtype": stats_dtype},
                           "adapters": adapters, "progress": False})
    seconds = time.perf_counter() - start
    result.save(out, force=True)
    return result, seconds


def relative_difference(a, b) -> float:
    num = sum(float((a[n].dense() - b[n].dense()).pow(2).sum()) for n in a)
    den = sum(float(b[n].dense().pow(2).sum()) for n in b)
    return (num / den) ** 0.5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--settings", default=";".join(SETTINGS), help="labels, separated by ;")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    work = out.parent / "cpu_defaults_merged"
    rows, deltas = {}, {}
    for i, label in enumerate(args.settings.split(";")):
        method, params, dtype = SETTINGS[label]
        result, seconds = merge(method, params, dtype, work / str(i))
        deltas[label] = result.deltas
        rows[label] = {"method": method, "parameters": params, "stats_dtype": dtype, "seconds": seconds}
        print(f"{label}: {seconds:.1f} s", flush=True)
    a, b = "iteris sequential, float32 statistics", "iteris sequential, float64 statistics"
    if a in deltas and b in deltas:
        rows[a]["relative_difference_to_float64"] = relative_difference(deltas[a], deltas[b])
    cfg = {"base_model": str(smollm2_dir()), "device": "cpu", "batch_size": 16, "progress": False,
           "tasks": [{"name": t, "data": str(HERE / "data" / t / "test.jsonl"), "limit": args.limit,
                      "adapter": str(HERE / "adapters" / "smollm2" / t),
                      "metric": json.loads((HERE / "data" / t / "task.json").read_text())["metric"]} for t in TASKS],
           "models": [{"name": label, "path": str(work / str(i))} for i, label in enumerate(rows)]}
    start = time.perf_counter()
    scored = evaluate(cfg)
    for row in scored["rows"]:
        rows.setdefault(row["method"], {}).update(scores=row["scores"], normalized_mean=row["normalized_mean"])
    info = {"device": "cpu", "threads": torch.get_num_threads(), "tasks": TASKS, "limit": args.limit,
            "eval_seconds": time.perf_counter() - start}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    for label, row in rows.items():
        print(f"{label:50s} {row.get('seconds', 0):7.1f} s  {row.get('normalized_mean', float('nan')):.3f}")


if __name__ == "__main__":
    main()
