"""Merge the benchmark's SmolLM2 adapters with every method and score them with `iteris eval`.

    python benchmarks/quality/run_benchmark.py --tasks sentiment,review_or_plot,news_topic,headline \
        --split test --out benchmarks/quality/results/smollm2_4tasks

Rows: base, individual (each task's own adapter), and one merged adapter per method. Hyperparameters
come from --params (a JSON file chosen on the validation split), else the defaults below.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import iteris
from iteris.assets import minilm_dir, smollm2_dir
from iteris.evaluate import evaluate, format_table, write_results

HERE = Path(__file__).resolve().parent

# family -> base model, calibration and evaluation files, and merge options
FAMILIES = {
    "smollm2": {"base": smollm2_dir, "calibration": "calibration.jsonl", "eval": "{split}.jsonl", "merge": {}},
    # RegMean's GLUE setting: the merged encoder body, each task keeping its own classification head
    "minilm": {"base": minilm_dir, "calibration": "classify_calibration.jsonl", "eval": "classify_{split}.jsonl",
               "merge": {"modules_to_save": "per_adapter"}, "metric": "accuracy"},
}

DEFAULT_METHODS = {
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 0},
    "regmean": {"reduction": 0.9},
    "iteris": {"iterations": 10, "alpha1": 1e-7, "alpha2": 1e-7},
}
# A sweep on the validation split: row label -> (method, parameters).
GRID = {
    **{f"task_arithmetic scale={v}": ("task_arithmetic", {"scale": v}) for v in (0.5, 0.75, 1.0)},
    **{f"ties density={v}": ("ties", {"density": v}) for v in (0.2, 0.5, 0.8)},
    **{f"dare_ties density={v}": ("dare_ties", {"density": v, "seed": 0}) for v in (0.3, 0.5, 0.7)},
    **{f"regmean reduction={v}": ("regmean", {"reduction": v}) for v in (0.5, 0.9, 1.0)},
    **{f"iteris alpha={v:g}": ("iteris", {"iterations": 10, "alpha1": v, "alpha2": v}) for v in (1e-7, 1e-4, 1e-2)},
}
CHOSEN_ITERIS = {"iterations": 10, "alpha1": 1e-4, "alpha2": 1e-4}
ITERATIONS = {f"iteris iterations={k}": ("iteris", {**CHOSEN_ITERIS, "iterations": k}) for k in (0, 1, 2, 3, 5, 10, 20)}
# The paper's ablations around the chosen IterIS setting. A third element overrides the merge's own options:
# calibration samples per task (drawn from the 100-prompt pool), or the merged rank (SVD of the exact result).
ABLATIONS = {
    "samples": {f"iteris samples={n}": ("iteris", CHOSEN_ITERIS, {"samples": n, "pool": "calibration_100.jsonl"})
                for n in (1, 5, 10, 20, 50, 100)},
    "gamma": {f"iteris gamma={g}": ("iteris", {**CHOSEN_ITERIS, "gamma": g}) for g in (0.0, 0.25, 0.5, 0.75, 1.0)},
    "alpha": {f"iteris alpha1={a1:g} alpha2={a2:g}": ("iteris", {**CHOSEN_ITERIS, "alpha1": a1, "alpha2": a2})
              for a1, a2 in ((1e-7, 1e-7), (1e-4, 1e-7), (1e-7, 1e-4), (1e-4, 1e-4), (1e-2, 1e-2))},
    "adaptive": {f"iteris adaptive_weights={v}": ("iteris", {**CHOSEN_ITERIS, "adaptive_weights": v})
                 for v in (True, False)},
    "rank": {f"iteris rank={k}": ("iteris", CHOSEN_ITERIS, {"rank": k}) for k in (8, 16, None)},
}


def best_params(sweep: dict) -> dict:
    """{method: parameters} of each method's best row (normalized mean) in a sweep's results.json."""
    means = {row["method"]: row["normalized_mean"] for row in sweep["rows"]}
    best = {}
    for label, merge in sweep["merge"].items():
        method = merge["method"]
        if method not in best or means[label] > means[best[method]]:
            best[method] = label
    return {method: sweep["merge"][label]["parameters"] for method, label in best.items()}


def _rows(methods: dict) -> dict:
    """label -> (method, parameters, options) with options always present."""
    return {label: (row[0], row[1], row[2] if len(row) > 2 else {}) for label, row in methods.items()}


def merge_all(tasks, methods, out: Path, device: str, samples: int, progress: bool, family: str = "smollm2",
              stats_dtype: str = "auto") -> dict:
    """methods: row label -> (method, parameters[, options]); each merged adapter is saved under out/merged/<n>."""
    fam = FAMILIES[family]
    timings = {}
    for index, (label, (method, params, options)) in enumerate(_rows(methods).items()):
        calibration = options.get("pool", fam["calibration"])
        adapters = [
            {"name": t, "path": str(HERE / "adapters" / family / t), "data": str(HERE / "data" / t / calibration)}
            for t in tasks
        ]
        start = time.perf_counter()
        result = iteris.merge(
            {
                "base_model": str(fam["base"]()), "method": method, "parameters": params, "device": device,
                "dtype": "auto", "rank": options.get("rank"),
                "calibration": {"samples": options.get("samples", samples), "max_length": 384, "batch_size": 16,
                                "stats_dtype": stats_dtype},
                "adapters": adapters, "progress": progress, **fam["merge"],
            }
        )
        result.save(out / "merged" / str(index), force=True)
        timings[label] = {"seconds": time.perf_counter() - start, "report": result.report, "method": method,
                          "parameters": params, "options": options, "dir": str(out / "merged" / str(index))}
        print(f"merged {label} in {timings[label]['seconds']:.1f} s", flush=True)
    return timings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--family", default="smollm2", choices=sorted(FAMILIES))
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--params", default=None,
                        help="JSON {method: parameters}, or a sweep's results.json (each method's best row is taken)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    parser.add_argument("--grid", choices=["hyperparameters", "iterations", *ABLATIONS], default=None,
                        help="rows of a sweep instead of one row per method")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N records per task")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--stats-dtype", default="auto", help="statistics precision (auto: float64 on CPU)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--keep-merged", action="store_true", help="keep the merged adapters under OUT/merged")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    chosen = json.loads(Path(args.params).read_text()) if args.params else dict(DEFAULT_METHODS)
    if "rows" in chosen:
        chosen = best_params(chosen)
        print(f"parameters chosen from {args.params}: {json.dumps(chosen)}", flush=True)
    if args.methods:
        chosen = {m: chosen.get(m, DEFAULT_METHODS.get(m, {})) for m in args.methods.split(",")}
    methods = {m: (m, p) for m, p in chosen.items()}
    if args.grid:
        methods = {"hyperparameters": GRID, "iterations": ITERATIONS, **ABLATIONS}[args.grid]
    out = Path(args.out)
    fam = FAMILIES[args.family]
    merges = merge_all(tasks, methods, out, args.device, args.samples, not args.quiet, args.family, args.stats_dtype)
    eval_cfg = {
        "base_model": str(fam["base"]()),
        "tasks": [
            {"name": t, "data": str(HERE / "data" / t / fam["eval"].format(split=args.split)),
             "adapter": str(HERE / "adapters" / args.family / t), "limit": args.limit,
             "metric": fam.get("metric") or json.loads((HERE / "data" / t / "task.json").read_text())["metric"]}
            for t in tasks
        ],
        "models": [{"name": label, "path": merges[label]["dir"]} for label in methods],
        "device": args.device, "dtype": "auto", "batch_size": args.eval_batch, "progress": not args.quiet,
    }
    start = time.perf_counter()
    results = evaluate(eval_cfg)
    print(f"evaluated in {time.perf_counter() - start:.1f} s", flush=True)
    results["merge"] = {
        label: {"method": v["method"], "parameters": v["parameters"], "options": v["options"], "seconds": v["seconds"],
                "max_rank_error": max(v["report"]["output"]["relative_error"].values(), default=0.0),
                "relative_change": [h["relative_change"] for h in v["report"].get("iterations") or []]}
        for label, v in merges.items()
    }
    results["split"] = args.split
    write_results(results, out, force=True)  # (out holds the merged adapters it just wrote)
    if not args.keep_merged:
        shutil.rmtree(out / "merged", ignore_errors=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
