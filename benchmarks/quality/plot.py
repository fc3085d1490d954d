"""Plots for benchmarks/quality/README.md from the results JSON files (matplotlib needed).

    python benchmarks/quality/plot.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def iterations_plot() -> None:
    results = json.loads((HERE / "results" / "iterations" / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    points = sorted(
        (int(label.split("=")[1]), row["normalized_mean"]) for label, row in rows.items() if label.startswith("iteris")
    )
    changes = results["merge"]["iteris iterations=20"]["relative_change"][1:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([k for k, _ in points], [v for _, v in points], "o-", label="IterIS")
    left.axhline(rows["individual"]["normalized_mean"], color="gray", ls=":", label="individual adapters")
    left.set_xlabel("iterations after the initial solve")
    left.set_ylabel("normalized mean (test)")
    left.set_title("SmolLM2-135M, 4 adapters")
    left.legend()
    right.semilogy(range(1, len(changes) + 1), changes, "o-")
    right.set_xlabel("iteration")
    right.set_ylabel("relative change of the merged deltas")
    right.set_title("How far each iteration moves the merge")
    fig.tight_layout()
    fig.savefig(HERE / "results" / "iterations.png", dpi=110)


if __name__ == "__main__":
    iterations_plot()
