"""The protocol's table and plot from its result files (``protocol.py``): per method, the value chosen on
validation, the normalized mean on the test split at every N, the least share of its own gain any task keeps,
and merge seconds and peak GPU memory (from a ``--merge-only`` file where one is given: those merges ran
alone on the machine).

    R=benchmarks/quality/results/protocol
    python benchmarks/quality/protocol_report.py --tune $R/tune_n8_*.json --test $R/test_*.json \
        --timing $R/timing_n8.json --n-timing 8 --plot $R/protocol.png > $R/protocol.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def rows_of(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        out += [{**row, "label": label, "file": path} for label, row in results["rows"].items()]
    return out


def best_rows(rows) -> dict[str, dict]:
    """method -> its tuning row with the highest normalized mean (rows that failed are skipped)."""
    best: dict[str, dict] = {}
    for row in rows:
        if "normalized_mean" in row and (row["method"] not in best
                                         or row["normalized_mean"] > best[row["method"]]["normalized_mean"]):
            best[row["method"]] = row
    return best


def chosen_values(tune_rows: list[dict]) -> dict[str, tuple[str, float]]:
    """method -> ('knob=value', validation normalized mean) of its best tuning row."""
    return {m: (r["label"].split(" ", 2)[2], r["normalized_mean"]) for m, r in best_rows(tune_rows).items()}


def noise(reference: dict, tasks: list[str], records: dict[str, int]) -> float:
    """Standard error of a row's normalized mean from the test items alone: binomial for accuracies, a 0.15
    per-item standard deviation assumed for ROUGE-L (measured on the base rows: 0.13-0.17)."""
    individual = reference["individual"]
    total = 0.0
    for t in tasks:
        p = individual[t]
        sd = 0.15 if t in ("headline", "lead_sentence") else math.sqrt(max(p * (1 - p), 1e-4))
        total += (sd / math.sqrt(records[t]) / p) ** 2
    return math.sqrt(total) / len(tasks)


def paired_difference(a: dict, b: dict, individual: dict) -> tuple[float, float] | None:
    """Row a's normalized mean minus row b's, and its standard error from the records both were scored on
    (each task's per-record differences over the task's own score): much smaller than two rows' own noise,
    since both rows get the same records right and wrong. None where a row kept no per-record scores."""
    if not (a.get("items") and b.get("items")):
        return None
    tasks = list(a["items"])
    mean, variance = 0.0, 0.0
    for t in tasks:
        d = [(x - y) / individual[t] for x, y in zip(a["items"][t], b["items"][t])]
        m = sum(d) / len(d)
        mean += m
        variance += sum((v - m) ** 2 for v in d) / max(len(d) - 1, 1) / len(d)
    return mean / len(tasks), math.sqrt(variance) / len(tasks)


def table(test_rows: list[dict], timing_rows: list[dict], chosen: dict, n_timing: int) -> str:
    ns = sorted({r["n"] for r in test_rows})
    methods = sorted({r["method"] for r in test_rows},
                     key=lambda m: -max((r.get("normalized_mean") or 0) for r in test_rows
                                        if r["method"] == m and r["n"] == max(ns)))
    cell = {(r["method"], r["n"]): r for r in test_rows}
    timed = {r["method"]: r for r in timing_rows if r["n"] == n_timing} or {
        m: r for (m, n), r in cell.items() if n == n_timing}
    head = (["method", "chosen on val"] + [f"N = {n}" for n in ns]
            + [f"least gain kept (N = {n_timing})", f"merge s (N = {n_timing})", "peak GPU MB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for m in methods:
        values = []
        for n in ns:
            r = cell.get((m, n), {})
            values.append(f"{r['normalized_mean']:.3f}" if "normalized_mean" in r else r.get("error", "-")[:20])
        kept = cell.get((m, n_timing), {}).get("gain_kept") or cell.get((m, n_timing), {}).get("half_gain_kept")
        t = timed.get(m, {})
        lines.append("| " + " | ".join([m, chosen.get(m, ("-",))[0]] + values + [
            f"{min(kept.values()):.2f}" if kept else "-",
            f"{t['seconds']:.1f}" if "seconds" in t else "-",
            f"{t['peak_gpu_mb']:.0f}" if t.get("peak_gpu_mb") is not None else "-"]) + " |")
    return "\n".join(lines)


def plot(test_rows: list[dict], timing_rows: list[dict], n_timing: int, path: str, title: str, time_note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in test_rows})
    timed = {r["method"]: r for r in timing_rows if r["n"] == n_timing}
    palette = plt.cm.tab20.colors  # more methods than the default cycle's ten colours
    for index, m in enumerate(methods):
        mine = [r for r in test_rows if r["method"] == m]
        points = sorted((r["n"], r["normalized_mean"]) for r in mine if "normalized_mean" in r)
        color = "black" if m == "iteris" else palette[index % len(palette)]
        style = dict(lw=2.5 if m == "iteris" else 1, color=color)
        left.plot([n for n, _ in points], [v for _, v in points], "o-", label=m, **style)
        at = next((v for n, v in points if n == n_timing), None)
        # only merges timed alone where a timing file was given (a shared card's seconds are not comparable)
        source = timed.get(m, {}) if timed else next((r for r in mine if r["n"] == n_timing), {})
        seconds = source.get("seconds")
        if at is not None and seconds:
            right.scatter(seconds, at, s=60 if m == "iteris" else 25, color=color)
            right.annotate(m, (seconds, at), fontsize=8, xytext=(4, 2), textcoords="offset points")
    left.axhline(1.0, color="gray", ls=":")
    left.set_xlabel("adapters merged (N)")
    left.set_ylabel("normalized mean (test)")
    left.set_title(title)
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_xlabel(f"merge seconds at N = {n_timing}{time_note}")
    right.set_ylabel(f"normalized mean at N = {n_timing}")
    right.set_title("quality against merge time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def combine(paths: list[str], out: Path, note: str | None) -> None:
    """Shards of one stage (parallel runs, each with its own methods) as one results file."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in parts[0].items() if k != "rows"}
    merged.update(rows={label: row for part in parts for label, row in part["rows"].items()},
                  shards=[Path(p).name for p in paths], **({"note": note} if note else {}))
    out.write_text(json.dumps(merged, indent=1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", nargs="+", required=True)
    parser.add_argument("--test", nargs="+", required=True, help="a later file's row replaces an earlier one's")
    parser.add_argument("--timing", nargs="*", default=[])
    parser.add_argument("--n-timing", type=int, default=8)
    parser.add_argument("--plot")
    parser.add_argument("--ours", default="iteris", help="the method every other is compared with, record by record")
    parser.add_argument("--title", default="SmolLM2-135M")
    parser.add_argument("--time-note", default="", help="appended to the time axis's label (how the runs were timed)")
    parser.add_argument("--combine", nargs=2, metavar=("TUNE_OUT", "TEST_OUT"),
                        help="also write the --tune files' rows as one file and the --test files' as another")
    parser.add_argument("--note", default=None, help="a sentence stored in the combined files")
    args = parser.parse_args()
    if args.combine:
        for paths, out in zip((args.tune, args.test), args.combine):
            combine(paths, Path(out), args.note)
    # a later --test file's row for the same method and N replaces an earlier one's (a rerun)
    test_rows = list({(r["method"], r["n"]): r for r in rows_of(args.test)}.values())
    timing_rows = rows_of(args.timing)
    chosen = chosen_values(rows_of(args.tune))
    print(table(test_rows, timing_rows, chosen, args.n_timing))
    first = json.loads(Path(args.test[0]).read_text())
    data = Path(__file__).resolve().parent / "data"
    suffix = "classify_test.jsonl" if first.get("family") == "minilm" else "test.jsonl"
    records = {t: sum(1 for line in (data / t / suffix).read_text().splitlines() if line.strip())
               for t in first["reference"]["individual"]}
    for n in sorted({r["n"] for r in test_rows}):
        tasks = list(first["reference"]["individual"])[:n]
        se = noise(first["reference"], tasks, records)
        print(f"\nnoise (standard error of a normalized mean, N = {n}): {se:.3f}")
    individual = first["reference"]["individual"]
    for n in sorted({r["n"] for r in test_rows}):
        ranked = sorted((r for r in test_rows if r["n"] == n and "normalized_mean" in r),
                        key=lambda r: -r["normalized_mean"])
        ours = next((r for r in ranked if r["method"] == args.ours), None)
        for other in (r for r in ranked if ours is not None and r is not ours):
            if paired := paired_difference(ours, other, individual):
                print(f"N = {n}: {args.ours} - {other['method']} = {paired[0]:+.3f} "
                      f"(paired standard error {paired[1]:.3f}, {paired[0] / max(paired[1], 1e-12):+.1f} SE)")
    if args.plot:
        plot(test_rows, timing_rows, args.n_timing, args.plot, args.title, args.time_note)


if __name__ == "__main__":
    main()
