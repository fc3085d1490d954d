"""RegMean on LoRA deltas: each layer's update minimises the summed output error on every task's inputs."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import CaptureSpec, GlobalSweep
from ..errors import IterisError
from ..solve import regmean_solve
from .base import MergeContext, param, register


@dataclass
class RegMeanParams:
    reduction: float = param(0.9, "scale of the Grams' off-diagonal entries (RegMean's regulariser)")
    normalize: bool = param(False, "divide each task's Gram by its token count (tasks weigh alike)")

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
    def solve_group(group, stats):
        grams = [st.full_gram() for st in stats]
        weights = [w / float(st.tokens) if ctx.params.normalize else w for st, w in zip(stats, ctx.weights)]
        out = {}
        for name in group.members:
            out[name], how = regmean_solve(grams, ctx.loras(name), ctx.params.reduction, weights)
            if how != "cholesky":
                ctx.report.setdefault("singular_layers", []).append(name)
        return out

    return ctx.engine.sweep(GlobalSweep(CaptureSpec(projections=False)), solve_group, label="regmean")
