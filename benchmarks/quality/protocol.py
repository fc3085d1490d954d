"""One protocol for every method: each method's main knob tried on the validation split (the same number of
values for every method), the best value then run on the test split for N = 2, 4, 6, 8, 9 adapters. Every
merged adapter is a LoRA kept beside the base model (float32 factors, full rank where a method's result is
dense), scored by `iteris eval` as one row; merge seconds and peak GPU memory are recorded with each row.

    R=benchmarks/quality/results/protocol
    # the base and individual rows, once per split (other runs copy them with --reference)
    python benchmarks/quality/protocol.py reference --split val --out $R/reference_val.json
    # the grid on the 8-task validation split (shards: --methods, each into its own file)
    python benchmarks/quality/protocol.py tune --n 8 --reference $R/reference_val.json --out $R/tune_n8.json
    # the chosen values on the test split
    python benchmarks/quality/protocol.py test --params $R/tune_n8.json --n 2,4,6,8,9 \
        --reference $R/reference_test.json --out $R/test.json
    # merge seconds and peak memory alone on the machine (no scoring)
    python benchmarks/quality/protocol.py test --params $R/tune_n8.json --n 8 --merge-only --out $R/timing_n8.json

``--family minilm``: the seven encoder classification tasks (each task keeping its own head). Results are
written after every row, so a run cut short keeps what it measured (and a rerun skips rows the output already
holds). ``protocol_report.py`` turns the files into the table and the plot.
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
from iteris.evaluate import evaluate
from protocol_report import best_rows
from run_benchmark import FAMILIES

HERE = Path(__file__).resolve().parent
ORDERS = {
    "smollm2": ["sentiment", "review_or_plot", "news_topic", "headline", "lead_sentence", "moral_foundation",
                "word_pleasantness", "debate_speaker", "convention_party"],
    "minilm": ["sentiment", "review_or_plot", "news_topic", "moral_foundation", "word_pleasantness", "debate_speaker",
               "convention_party"],
}
FULL_RANK = 4096  # above every layer's size: a dense result is written whole (exact), not cut to sum r_i

# method -> (main knob, values tried on validation, fixed parameters). Three values each; the two methods
# whose best value sat at the edge of the three (IterIS and ProDistill, both at 3e-2) got a fourth, 1e-1.
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
    # 5 epochs, not the authors' 50: at N = 8 that is 160 steps a block, IterIS's refinement has 256
    "prodistill": ("lr", [0.003, 0.01, 0.03, 0.1], {"epochs": 5}),
    # the default a GPU user gets (sequential, 256 refinement steps), asked for explicitly so that a CPU run
    # (whose default has no refinement) measures the same method
    "iteris": ("refine_lr", [3e-3, 1e-2, 3e-2, 1e-1], {"refine_steps": 256}),
    # entropy of a classifier's predictions: the encoder classification tasks only; 100 steps, not the
    # authors' 500: each step runs the whole model on a batch of every task (at N = 7, 100 steps take
    # 5 minutes on 2 CPU cores)
    "adamerging": ("lr", [1e-3, 3e-3, 1e-2], {"steps": 100}),
}
CLASSIFIERS_ONLY = {"adamerging"}
DENSE = {"ties", "dare_ties", "wudi", "prodistill"}


SETTINGS = {"family": "smollm2", "records": None, "eval_batch": 128}  # from the command line


def tasks_for(n: int) -> list[str]:
    return ORDERS[SETTINGS["family"]][:n]


def merge_row(tasks: list[str], method: str, params: dict, out: Path, samples: int,
              calibration: dict | None = None) -> dict:
    """Merge, save under ``out``; seconds and peak GPU memory of the merge alone. ``calibration``: changes to
    the calibration settings every method gets (``{"generate": true}``: each adapter's own continuations)."""
    family = FAMILIES[SETTINGS["family"]]
    adapters = [{"name": t, "path": str(HERE / "adapters" / SETTINGS["family"] / t),
                 "data": str(HERE / "data" / t / family["calibration"])} for t in tasks]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = iteris.merge({
        "base_model": str(family["base"]()), "method": method, "parameters": params, "device": "auto",
        "dtype": "auto", "rank": FULL_RANK if method in DENSE else None,
        # prompts only unless a row says otherwise (the grid was run so; IterIS asks for continuations by default)
        "calibration": {"samples": samples, "max_length": 384, "batch_size": 16, "generate": False,
                        **(calibration or {})},
        "adapters": adapters, "progress": False, **family["merge"],
    })
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result.save(out, force=True)
    report = result.report
    return {"seconds": seconds, "peak_gpu_mb": peak, "timings": report.get("timings"),
            "max_rank_error": max(report["output"]["relative_error"].values(), default=0.0)}


def score(tasks: list[str], split: str, models: dict[str, str], reference: bool) -> dict:
    """{row: iteris eval's row} for the models (and base / individual when ``reference``); a model's row also
    holds each record's score under "items" (two rows compared record by record)."""
    name, family = SETTINGS["family"], FAMILIES[SETTINGS["family"]]
    metric = lambda t: family.get("metric") or json.loads((HERE / "data" / t / "task.json").read_text())["metric"]
    cfg = {
        "base_model": str(family["base"]()),
        "tasks": [{"name": t, "data": str(HERE / "data" / t / family["eval"].format(split=split)),
                   **({"adapter": str(HERE / "adapters" / name / t)} if reference else {}),
                   "limit": SETTINGS["records"], "metric": metric(t)} for t in tasks],
        "models": [{"name": k, "path": v} for k, v in models.items()],
        "include_base": reference, "device": "auto", "dtype": "auto", "batch_size": SETTINGS["eval_batch"],
        "progress": False, "per_item": not reference,
    }
    return {row["method"]: row for row in evaluate(cfg)["rows"]}


def normalized(scores: dict, individual: dict) -> float:
    return sum(scores[t] / individual[t] for t in scores) / len(scores)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def reference_rows(split: str, path: Path, copy_from: Path | None) -> dict:
    """The base and individual rows on every task of the family: read from ``copy_from`` where given (so that
    parallel runs share one measurement), else measured and stored with the results."""
    results = load(path)
    results.update({"split": split, "family": SETTINGS["family"], "eval_batch": SETTINGS["eval_batch"],
                    "records": SETTINGS["records"]})
    if "reference" not in results:
        if copy_from is not None:
            source = json.loads(copy_from.read_text())
            if (source["split"], source.get("family", "smollm2")) != (split, SETTINGS["family"]):
                raise SystemExit(f"{copy_from} holds {source['split']} rows of {source.get('family')}")
            results["reference"], results["reference_seconds"] = source["reference"], source["reference_seconds"]
        else:
            t0 = time.perf_counter()
            rows = score(ORDERS[SETTINGS["family"]], split, {}, reference=True)
            results["reference"] = {name: row["scores"] for name, row in rows.items()}
            results["reference_seconds"] = time.perf_counter() - t0
        save(results, path)
    return results


def run_rows(rows: dict[str, tuple], split: str, path: Path, samples: int,
             copy_from: Path | None = None, merge_only: bool = False) -> dict:
    """rows: label -> (N, method, parameters[, calibration changes]). Reference rows first (all tasks), then
    each row."""
    results = reference_rows(split, path, copy_from) if not merge_only else {**load(path), "merge_only": True}
    with tempfile.TemporaryDirectory() as scratch:
        if merge_only:  # one untimed merge first: CUDA's and the kernels' first-use costs are no method's
            merge_row(tasks_for(2), "regmean", {}, Path(scratch) / "warm", samples)
        for label, (n, method, params, *calibration) in rows.items():
            if label in results["rows"]:
                continue
            tasks = tasks_for(n)
            calibration = calibration[0] if calibration else None
            row = {"n": n, "method": method, "parameters": params, **({"calibration": calibration} if calibration else {})}
            try:
                row.update(merge_row(tasks, method, params, Path(scratch) / "m", samples, calibration))
                if not merge_only:
                    row.update(scored_row(tasks, split, label, Path(scratch) / "m", results["reference"]))
            except Exception as exc:  # a method that fails is a row that says so
                row["error"] = f"{type(exc).__name__}: {exc}"
            shutil.rmtree(Path(scratch) / "m", ignore_errors=True)
            results["rows"][label] = row
            save(results, path)
            print(f"{label}: {row.get('normalized_mean', row.get('error'))} merge {row.get('seconds', 0):.1f} s "
                  f"eval {row.get('eval_seconds', 0):.1f} s", flush=True)
    return results


def scored_row(tasks: list[str], split: str, label: str, merged: Path, reference: dict) -> dict:
    individual, base = reference["individual"], reference["base"]
    t0 = time.perf_counter()
    row = score(tasks, split, {label: str(merged)}, reference=False)[label]
    scores = row["scores"]
    return {"scores": scores, "eval_seconds": time.perf_counter() - t0,
            "normalized_mean": normalized(scores, individual),
            "gain_kept": {t: (scores[t] - base[t]) / (individual[t] - base[t]) for t in tasks}, "items": row["items"]}


def chosen(tuned: list[dict]) -> dict[str, tuple[dict, dict | None]]:
    """Each method's best parameters and calibration changes (normalized mean) among the tuning rows of one or
    more files."""
    return {m: (r["parameters"], r.get("calibration"))
            for m, r in best_rows(r for t in tuned for r in t["rows"].values()).items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["reference", "tune", "test", "rows"])
    parser.add_argument("--family", default="smollm2", choices=sorted(ORDERS))
    parser.add_argument("--n", default="8")
    parser.add_argument("--methods", default=None, help="default: every method of the grid the family can run")
    parser.add_argument("--params", help="test stage: tuning results files (comma-separated); each method's best row")
    parser.add_argument("--rows", help="rows stage: JSON {label: [N, method, parameters(, calibration changes)]}")
    parser.add_argument("--values", help="tune stage: only these of the grid's values (comma-separated)")
    parser.add_argument("--calibration", help="tune stage: JSON changes to every row's calibration settings "
                                              "(the labels name them)")
    parser.add_argument("--set", help="tune stage: JSON changes to every row's fixed parameters (the labels name them)")
    parser.add_argument("--reference", help="a results file whose base and individual rows are copied")
    parser.add_argument("--merge-only", action="store_true", help="merge seconds and peak memory, no scoring")
    parser.add_argument("--split", default=None)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="score the first N records per task (smoke test)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    SETTINGS.update(family=args.family, records=args.limit, eval_batch=args.eval_batch)
    ns = [int(v) for v in args.n.split(",")]
    methods = args.methods.split(",") if args.methods else [
        m for m in GRID if args.family == "minilm" or m not in CLASSIFIERS_ONLY]
    if args.stage == "reference":
        reference_rows(args.split or "val", Path(args.out), None)
        return
    if args.stage == "tune":
        only = {float(v) for v in args.values.split(",")} if args.values else None
        calibration = json.loads(args.calibration) if args.calibration else None
        changes = json.loads(args.set) if args.set else {}
        suffix = "".join(f" {k}={v}" for k, v in {**changes, **(calibration or {})}.items())
        rows = {f"n{n} {m} {GRID[m][0]}={v:g}{suffix}": (n, m, {**GRID[m][2], **changes, GRID[m][0]: v}, calibration)
                for n in ns for m in methods for v in GRID[m][1] if only is None or v in only}
        split = args.split or "val"
    elif args.stage == "test":
        params = chosen([json.loads(Path(p).read_text()) for p in args.params.split(",")])
        rows = {f"n{n} {m}": (n, m, *params[m]) for n in ns for m in methods if m in params}
        split = args.split or "test"
    else:
        rows = {k: tuple(v) for k, v in json.loads(args.rows).items()}
        split = args.split or "val"
    run_rows(rows, split, Path(args.out), args.samples, Path(args.reference) if args.reference else None,
             args.merge_only)


if __name__ == "__main__":
    main()
