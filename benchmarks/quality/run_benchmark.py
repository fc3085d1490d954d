"""Merge the benchmark's SmolLM2 adapters with every method and score them with `iteris eval`.

    python benchmarks/quality/run_benchmark.py --tasks sentiment,review_or_plot,news_topic,headline \
        --split test --out benchmarks/quality/results/smollm2_4tasks

Rows: base, individual (each task's own adapter), and one merged adapter per method. Hyperparameters
come from --params (a JSON file chosen on the validation split), else the defaults below.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

import iteris  # noqa: E402
from iteris.assets import smollm2_dir  # noqa: E402
from iteris.evaluate import evaluate, format_table, write_results  # noqa: E402

DEFAULT_METHODS = {
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 0},
    "regmean": {"reduction": 0.9},
    "iteris": {"iterations": 10, "alpha1": 1e-7, "alpha2": 1e-7},
}


def merge_all(tasks, methods, out: Path, device: str, samples: int, progress: bool) -> dict:
    adapters = [
        {"name": t, "path": str(HERE / "adapters" / "smollm2" / t), "data": str(HERE / "data" / t / "calibration.jsonl")}
        for t in tasks
    ]
    timings = {}
    for method, params in methods.items():
        start = time.perf_counter()
        result = iteris.merge(
            {
                "base_model": str(smollm2_dir()), "method": method, "parameters": params, "device": device,
                "dtype": "auto", "calibration": {"samples": samples, "max_length": 384, "batch_size": 16},
                "adapters": adapters, "progress": progress,
            }
        )
        result.save(out / "merged" / method, force=True)
        timings[method] = {"seconds": time.perf_counter() - start, "report": result.report}
        print(f"merged with {method} in {timings[method]['seconds']:.1f} s", flush=True)
    return timings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--params", default=None, help="JSON {method: parameters}")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records per task")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    methods = json.loads(Path(args.params).read_text()) if args.params else dict(DEFAULT_METHODS)
    if args.methods:
        methods = {m: methods.get(m, DEFAULT_METHODS.get(m, {})) for m in args.methods.split(",")}
    out = Path(args.out)
    merges = merge_all(tasks, methods, out, args.device, args.samples, not args.quiet)
    eval_cfg = {
        "base_model": str(smollm2_dir()),
        "tasks": [
            {"name": t, "data": str(HERE / "data" / t / f"{args.split}.jsonl"),
             "adapter": str(HERE / "adapters" / "smollm2" / t), "limit": args.limit,
             "metric": json.loads((HERE / "data" / t / "task.json").read_text())["metric"]}
            for t in tasks
        ],
        "models": [{"name": m, "path": str(out / "merged" / m)} for m in methods],
        "device": args.device, "dtype": "auto", "batch_size": 16, "progress": not args.quiet,
    }
    start = time.perf_counter()
    results = evaluate(eval_cfg)
    print(f"evaluated in {time.perf_counter() - start:.1f} s", flush=True)
    results["merge"] = {m: {"parameters": methods[m], "seconds": v["seconds"],
                            "iterations": v["report"].get("iterations")} for m, v in merges.items()}
    results["split"] = args.split
    write_results(results, out)
    print(format_table(results))


if __name__ == "__main__":
    main()
