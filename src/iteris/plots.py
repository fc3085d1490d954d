"""Figures beside a merge or an evaluation (matplotlib, an optional extra: ``pip install iteris[plot]``)."""

from __future__ import annotations

from pathlib import Path

from .errors import IterisError

CONVERGENCE = "merge_convergence.png"
LAYER_ERROR = "merge_layer_error.png"
SCORES = "scores.png"


def require_matplotlib() -> None:
    """Asked before any work starts, so that --plot never fails after a long merge."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise IterisError("--plot draws with matplotlib, which is not installed: pip install 'iteris[plot]' "
                          "(or leave out --plot)") from None


def _figure(width: float, height: float):
    """A figure drawn off-screen without pyplot: a notebook's own backend and figures are left alone."""
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def merge_figures(report: dict, directory: Path) -> list[str]:
    """IterIS's change per round (or each block's residual before and after its refinement) and each layer's
    compression error; returns the files written (names relative to ``directory``)."""
    written = []
    rounds = [r for r in report.get("iterations") or [] if r.get("relative_change") is not None]
    fits = report.get("refinement") or report.get("block_fit") or {}
    if rounds or fits:
        fig, ax = _figure(7, 3.8)
        if rounds:
            ax.semilogy([r["iteration"] for r in rounds], [max(r["relative_change"], 1e-16) for r in rounds], "o-")
            ax.set_xlabel("inference-solving round")
            ax.set_ylabel("relative change of the merged deltas")
            ax.set_title("IterIS: how much each round moved the merge")
        else:
            blocks = list(fits)
            ax.semilogy(range(len(blocks)), [max(fits[b]["loss_before"], 1e-30) for b in blocks], "o-",
                        label="closed form" if "refinement" in report else "start")
            ax.semilogy(range(len(blocks)), [max(fits[b]["loss_after"], 1e-30) for b in blocks], "o-",
                        label="after the block's fit")
            ax.set_xlabel("block (depth order)")
            ax.set_ylabel("block residual")
            ax.set_title("each block's residual before and after its fit")
            ax.legend()
        _save(fig, directory / CONVERGENCE)
        written.append(CONVERGENCE)
    errors = _layer_errors(report)
    if errors:
        fig, ax = _figure(max(7, len(errors) * 0.08), 3.8)
        ax.bar(range(len(errors)), list(errors.values()), width=1.0)
        ax.set_xlabel(f"layer ({len(errors)}, in the order of the report)")
        ax.set_ylabel("relative Frobenius error")
        exact = (report.get("output") or {}).get("exact")
        ax.set_title("compression error per layer" + (" (exact: no compression)" if exact else ""))
        _save(fig, directory / LAYER_ERROR)
        written.append(LAYER_ERROR)
    return written


def _layer_errors(report: dict) -> dict[str, float]:
    """Each layer's compression error; a pipeline's components each report their own (named component/layer)."""
    flat = dict((report.get("output") or {}).get("relative_error") or {})
    for component, entry in (report.get("components") or {}).items():
        errors = (entry.get("output") or {}).get("relative_error") or {}
        flat.update({f"{component}/{layer}": v for layer, v in errors.items()})
    return flat


def score_figure(results: dict, path: Path) -> None:
    """Per task, a bar for the base model, each task's own adapter and every merged model."""
    rows = results["rows"]
    tasks = results["tasks"]
    fig, ax = _figure(max(6, 1.6 * len(tasks) + 2), 4)
    width = 0.8 / max(len(rows), 1)
    for k, row in enumerate(rows):
        ax.bar([i + k * width for i in range(len(tasks))], [row["scores"][t] for t in tasks], width,
               label=row["method"])
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(tasks))])
    metrics = results.get("metrics") or {}
    ax.set_xticklabels([f"{t}\n({metrics[t]})" if t in metrics else t for t in tasks])
    ax.set_ylabel("score")
    ax.set_title("scores per task")
    ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
