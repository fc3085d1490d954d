"""RegMean on LoRA deltas: each layer's update minimises the summed output error on every task's inputs."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import CaptureSpec, GlobalSweep, MergedInputSweep
from ..errors import IterisError
from ..solve import regmean_solve
from .base import MergeContext, param, register


@dataclass
class RegMeanParams:
    reduction: float = param(0.9, "scale of the Grams' off-diagonal entries (RegMean's regulariser)")
    normalize: bool = param(False, "divide each task's Gram by its token count (tasks weigh alike)")

    def overlaps_solves(self) -> bool:
        """Its sweep solves a block while the next is captured (on a GPU): two blocks' statistics at once."""
        return True

    def validate(self):
        if not 0.0 <= self.reduction <= 1.0:
            raise IterisError(f"regmean: reduction must be in [0, 1], got {self.reduction}")


@register(
    "regmean",
    RegMeanParams,
    "RegMean: dW = (sum_i dW_i G~_i)(sum_i G~_i)^-1 with input Grams G_i (exact, rank sum r_i)",
    needs_calibration=True,
    per_layer_report=("singular_layers",),
)
def regmean(ctx: MergeContext):
    return ctx.engine.sweep(GlobalSweep(CaptureSpec(projections=False)), _solve_groups(ctx), label="regmean")


@register(
    "regmean_plusplus",
    RegMeanParams,
    "RegMean++ (Nguyen et al., 2025): RegMean block by block in depth order, each block's inputs taken from the "
    "merged blocks before it (exact, rank sum r_i)",
    needs_calibration=True,
    per_layer_report=("singular_layers",),
)
def regmean_plusplus(ctx: MergeContext):
    return ctx.engine.sweep(MergedInputSweep(CaptureSpec(projections=False)), _solve_groups(ctx),
                            label="regmean++")


def _solve_groups(ctx: MergeContext):
    """RegMean's solve of one layer group from each task's Gram."""

    def solve_group(group, stats):
        grams = [st.full_gram() for st in stats]
        weights = [w / float(st.tokens) if ctx.params.normalize else w for st, w in zip(stats, ctx.weights)]
        out = {}
        for name in group.members:
            out[name], how = regmean_solve(grams, ctx.loras(name), ctx.params.reduction, weights)
            if how != "cholesky":
                ctx.report.setdefault("singular_layers", []).append(name)
        return out

    return solve_group
