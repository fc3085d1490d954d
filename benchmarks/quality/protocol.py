"""One protocol for every method: each method's main knob tried on the validation split (the same number of
values for every method), the best value then run on the test split for N = 2, 4, 6, 8, 9 adapters. Every
merged adapter is a LoRA kept beside the base model (float32 factors, full rank where a method's result is
dense), scored by `iteris eval` as one row; merge seconds and peak GPU memory are recorded with each row.

    # the base and individual rows (once per split), then the grid on the 8-task validation split
    python benchmarks/quality/protocol.py tune --n 8 --out benchmarks/quality/results/protocol/val_n8.json
    # the chosen values on the test split
    python benchmarks/quality/protocol.py test --params benchmarks/quality/results/protocol/val_n8.json \
        --n 2,4,6,8,9 --out benchmarks/quality/results/protocol/test.json

Results are written after every row, so a run cut short keeps what it measured (and a rerun skips rows the
output already holds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import iteris
from iteris.assets import smollm2_dir
from iteris.evaluate import evaluate

HERE = Path(__file__).resolve().parent
ORDER = ["sentiment", "review_or_plot", "news_topic", "headline", "lead_sentence", "moral_foundation",
         "word_pleasantness", "debate_speaker", "convention_party"]
FULL_RANK = 4096  # above every layer's size: a dense result is written whole (exact), not cut to sum r_i

# method -> (main knob, values tried on validation, fixed parameters). Three values each.
GRID = {
    "task_arithmetic": ("scale", [0.3, 0.5, 1.0], {}),
    "ties": ("density", [0.2, 0.5, 0.8], {}),
    "dare_ties": ("density", [0.3, 0.5, 0.7], {"seed": 0}),
    "tsv_m": ("scale", [0.5, 1.0, 1.5], {}),
    "iso_c": ("scale", [1.0, 2.0, 3.0], {}),
    "iso_cts": ("scale", [2.0, 4.0, 6.0], {}),
    "knots_ties": ("scale", [0.5, 1.0, 2.0], {}),
    "wudi": ("lr", [1e-5, 2e-5, 5e-5], {}),
    "regmean": ("reduction", [0.5, 0.9, 1.0], {}),
    "regmean_plusplus": ("reduction", [0.5, 0.9, 1.0], {}),
    "prodistill": ("lr", [0.003, 0.01, 0.03], {"epochs": 5}),
    "iteris": ("refine_lr", [3e-4, 1e-3, 3e-3], {"schedule": "sequential", "refine_steps": 96}),
}
DENSE = {"ties", "dare_ties", "wudi", "prodistill"}


def tasks_for(n: int) -> list[str]:
    return ORDER[:n]


def merge_row(tasks: list[str], method: str, params: dict, out: Path, samples: int) -> dict:
    """Merge, save under ``out``; seconds and peak GPU memory of the merge alone."""
    adapters = [{"name": t, "path": str(HERE / "adapters" / "smollm2" / t),
                 "data": str(HERE / "data" / t / "calibration.jsonl")} for t in tasks]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = iteris.merge({
        "base_model": str(smollm2_dir()), "method": method, "parameters": params, "device": "auto", "dtype": "auto",
        "rank": FULL_RANK if method in DENSE else None,
        "calibration": {"samples": samples, "max_length": 384, "batch_size": 16},
        "adapters": adapters, "progress": False,
    })
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result.save(out, force=True)
    report = result.report
    return {"seconds": seconds, "peak_gpu_mb": peak, "timings": report.get("timings"),
            "max_rank_error": max(report["output"]["relative_error"].values(), default=0.0)}


LIMIT = {"records": None}  # --limit: the first records of each task only (a smoke test)


def score(tasks: list[str], split: str, models: dict[str, str], reference: bool) -> dict:
    """{row: {task: score}} for the models (and base / individual when ``reference``)."""
    cfg = {
        "base_model": str(smollm2_dir()),
        "tasks": [{"name": t, "data": str(HERE / "data" / t / f"{split}.jsonl"),
                   **({"adapter": str(HERE / "adapters" / "smollm2" / t)} if reference else {}),
                   "limit": LIMIT["records"], "metric": json.loads((HERE / "data" / t / "task.json").read_text())["metric"]} for t in tasks],
        "models": [{"name": k, "path": v} for k, v in models.items()],
        "include_base": reference, "device": "auto", "dtype": "auto", "batch_size": 32, "progress": False,
    }
    return {row["method"]: row["scores"] for row in evaluate(cfg)["rows"]}


def normalized(scores: dict, individual: dict) -> float:
    return sum(scores[t] / individual[t] for t in scores) / len(scores)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def run_rows(rows: dict[str, tuple[int, str, dict]], split: str, path: Path, samples: int) -> dict:
    """rows: label -> (N, method, parameters). Reference rows first (all nine tasks), then each row."""
    results = load(path)
    results["split"] = split
    if "reference" not in results:
        t0 = time.perf_counter()
        results["reference"] = score(ORDER, split, {}, reference=True)
        results["reference_seconds"] = time.perf_counter() - t0
        save(results, path)
    individual = results["reference"]["individual"]
    base = results["reference"]["base"]
    with tempfile.TemporaryDirectory() as scratch:
        for label, (n, method, params) in rows.items():
            if label in results["rows"]:
                continue
            tasks = tasks_for(n)
            row = {"n": n, "method": method, "parameters": params}
            try:
                row.update(merge_row(tasks, method, params, Path(scratch) / "m", samples))
                t0 = time.perf_counter()
                row["scores"] = score(tasks, split, {label: str(Path(scratch) / "m")}, reference=False)[label]
                row["eval_seconds"] = time.perf_counter() - t0
                row["normalized_mean"] = normalized(row["scores"], individual)
                row["half_gain_kept"] = {t: (row["scores"][t] - base[t]) / (individual[t] - base[t]) for t in tasks}
            except Exception as exc:  # a method that fails is a row that says so
                row["error"] = f"{type(exc).__name__}: {exc}"
            shutil.rmtree(Path(scratch) / "m", ignore_errors=True)
            results["rows"][label] = row
            save(results, path)
            print(f"{label}: {row.get('normalized_mean', row.get('error'))} merge {row.get('seconds', 0):.1f} s "
                  f"eval {row.get('eval_seconds', 0):.1f} s", flush=True)
    return results


def chosen(tuned: dict) -> dict[str, dict]:
    """Each method's best parameters (normalized mean) among its tuning rows."""
    best: dict[str, dict] = {}
    for row in tuned["rows"].values():
        if "normalized_mean" in row and (row["method"] not in best
                                         or row["normalized_mean"] > best[row["method"]]["normalized_mean"]):
            best[row["method"]] = row
    return {m: r["parameters"] for m, r in best.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["tune", "test", "rows"])
    parser.add_argument("--n", default="8")
    parser.add_argument("--methods", default=",".join(GRID))
    parser.add_argument("--params", help="tune: a tuning results file whose best rows are run (test stage)")
    parser.add_argument("--rows", help="rows stage: JSON {label: [N, method, parameters]}")
    parser.add_argument("--split", default=None)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--limit", type=int, default=None, help="score the first N records per task (smoke test)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    LIMIT["records"] = args.limit
    ns = [int(v) for v in args.n.split(",")]
    methods = args.methods.split(",")
    if args.stage == "tune":
        rows = {f"n{n} {m} {GRID[m][0]}={v:g}": (n, m, {**GRID[m][2], GRID[m][0]: v})
                for n in ns for m in methods for v in GRID[m][1]}
        split = args.split or "val"
    elif args.stage == "test":
        params = chosen(json.loads(Path(args.params).read_text()))
        rows = {f"n{n} {m}": (n, m, params[m]) for n in ns for m in methods if m in params}
        split = args.split or "test"
    else:
        rows = {k: tuple(v) for k, v in json.loads(args.rows).items()}
        split = args.split or "val"
    run_rows(rows, split, Path(args.out), args.samples)


if __name__ == "__main__":
    main()
