"""RegMean on LoRA deltas: each layer's update minimises the summed output error on every task's inputs."""

from __future__ import annotations

from dataclasses import dataclass

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
)
def regmean(ctx: MergeContext):
    calib = ctx.calibration

    def solve_stage(names, per_task):
        out = {}
        by_group: dict[str, list[str]] = {}
        for name in names:
            by_group.setdefault(calib.group_of[name], []).append(name)
        for group, members in by_group.items():
            group_stats = [calib.onload(group, stats[group]) for stats in per_task]  # back on the GPU if offloaded
            grams = [st.full_gram() for st in group_stats]
            weights = [w / float(st.tokens) if ctx.params.normalize else w for st, w in zip(group_stats, ctx.weights)]
            for name in members:
                out[name], how = regmean_solve(grams, ctx.loras(name), ctx.params.reduction, weights)
                if how != "cholesky":
                    ctx.report.setdefault("singular_layers", []).append(name)
        return out

    return calib.sweep(solve_stage, ctx.adapters, paired=False, projections=False, label="regmean")
