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


# N adapters merged at once -> results folder (all with the parameters chosen on the 4-task validation split)
N_RUNS = {2: "n_adapters/n2", 4: "smollm2_4tasks_tuned", 6: "n_adapters/n6", 8: "n_adapters/n8", 9: "n_adapters/n9"}
METHODS = ["task_arithmetic", "ties", "dare_ties", "regmean", "iteris"]


def _means(folder: str) -> dict[str, float]:
    results = json.loads((HERE / "results" / folder / "results.json").read_text())
    return {r["method"]: r["normalized_mean"] for r in results["rows"]}


def n_adapters_plot() -> None:
    runs = {n: _means(folder) for n, folder in N_RUNS.items()}
    tuned = _means("n_adapters/n8_tuned")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        line = ax.plot(list(runs), [runs[n][method] for n in runs], "o-", label=method)
        ax.plot([8], [tuned[method]], "x", color=line[0].get_color(), ms=8)
    ax.plot(list(runs), [runs[n]["base"] for n in runs], "k:", label="base model")
    ax.plot([], [], "kx", label="N=8, re-tuned on its validation split")
    ax.set_xlabel("adapters merged at once (N)")
    ax.set_ylabel("normalized mean (test)")
    ax.set_title("SmolLM2-135M: merged / individual, per task, averaged")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "n_adapters.png", dpi=110)


def _sweep(folder: str, prefix: str) -> list[tuple[str, float]]:
    return [(label[len(prefix):], value) for label, value in _means(folder).items() if label.startswith(prefix)]


def ablations_plot() -> None:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.2, 1.2]})
    samples = [(int(k), v) for k, v in _sweep("ablation_samples", "iteris samples=")]
    axes[0].semilogx([k for k, _ in samples], [v for _, v in samples], "o-")
    axes[0].set_xlabel("calibration samples per task")
    gamma = [(float(k), v) for k, v in _sweep("ablation_gamma", "iteris gamma=")]
    axes[1].plot([k for k, _ in gamma], [v for _, v in gamma], "o-")
    axes[1].set_xlabel("γ")
    alpha = _sweep("ablation_alpha", "iteris ")
    axes[2].barh([k.replace(" ", "\n") for k, _ in alpha], [v for _, v in alpha])
    axes[2].set_xlim(0.85, 1.0)
    axes[2].set_xlabel("normalized mean")
    other = [(f"adaptive {k}", v) for k, v in _sweep("ablation_adaptive", "iteris adaptive_weights=")]
    other += [(f"rank {'Σr = 32' if k == 'None' else k}", v) for k, v in _sweep("ablation_rank", "iteris rank=")]
    axes[3].barh([k for k, _ in other], [v for _, v in other])
    axes[3].set_xlim(0.85, 1.0)
    axes[3].set_xlabel("normalized mean")
    axes[0].set_ylabel("normalized mean (test)")
    for ax, title in zip(axes, ["calibration samples", "γ", "α1 / α2", "adaptive weights, merged rank"]):
        ax.set_title(title)
    axes[0].set_ylim(0.85, 1.0)
    axes[1].set_ylim(0.85, 1.0)
    fig.tight_layout()
    fig.savefig(HERE / "results" / "ablations.png", dpi=110)


if __name__ == "__main__":
    iterations_plot()
    n_adapters_plot()
    ablations_plot()
