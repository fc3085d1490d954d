"""Data-free weighted sums of LoRA deltas, kept exact as concatenated LoRAs of rank sum(r_i)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import LowRankDelta, svd_factors
from ..errors import IterisError
from .base import MergeContext, param, register


def weighted_sum(ctx: MergeContext, weights: list[float]) -> dict[str, LowRankDelta]:
    """sum_i w_i s_i B_i A_i written exactly as [B_1 .. B_N] @ [w_1 s_1 A_1; ..; w_N s_N A_N]."""
    out = {}
    for name in ctx.targets:
        pairs = [(lora, w) for lora, w in zip(ctx.loras(name), weights) if lora is not None]
        out[name] = LowRankDelta(
            B=torch.cat([lora.B for lora, _ in pairs], dim=1),
            A=torch.cat([(w * lora.scale) * lora.A for lora, w in pairs], dim=0),
        )
    return out


@dataclass
class TaskArithmeticParams:
    scale: float = param(1.0, "lambda: multiplies the whole sum of weighted deltas")


@register(
    "task_arithmetic",
    TaskArithmeticParams,
    "dW = lambda * sum_i w_i dW_i (exact, rank sum r_i)",
)
def task_arithmetic(ctx: MergeContext):
    return weighted_sum(ctx, [ctx.params.scale * w for w in ctx.weights])


@dataclass
class LinearParams:
    normalize: bool = param(True, "divide the weights by their sum (a weighted average of the deltas)")


@register("linear", LinearParams, "dW = sum_i w_i dW_i / sum_i w_i (weighted average; exact, rank sum r_i)")
def linear(ctx: MergeContext):
    weights = list(ctx.weights)
    if ctx.params.normalize:
        total = sum(weights)
        if total == 0:
            raise IterisError("linear: the adapter weights sum to 0; set normalize: false or change the weights")
        weights = [w / total for w in weights]
    return weighted_sum(ctx, weights)


@dataclass
class CatParams:
    pass


@register("cat", CatParams, "PEFT's 'cat': the weighted LoRAs concatenated, rank sum r_i (same as task_arithmetic)")
def cat(ctx: MergeContext):
    return weighted_sum(ctx, ctx.weights)


@dataclass
class SvdParams:
    svd_rank: int | None = param(None, "rank of the result (default: the largest adapter rank, as PEFT)")
    svd_clamp: float | None = param(None, "clamp factor entries to +-(this quantile of their signed values), as PEFT does")

    def validate(self):
        if self.svd_rank is not None and self.svd_rank < 1:
            raise IterisError("svd: svd_rank must be >= 1")
        if self.svd_clamp is not None and not 0.0 < self.svd_clamp <= 1.0:
            raise IterisError("svd: svd_clamp must be in (0, 1]")


@register("svd", SvdParams, "PEFT's 'svd': truncated SVD of sum_i w_i dW_i to svd_rank")
def svd(ctx: MergeContext):
    summed = weighted_sum(ctx, ctx.weights)
    out = {}
    for name, delta in summed.items():
        rank = ctx.params.svd_rank or max(l.rank for l in ctx.loras(name) if l is not None)
        U, S, Vh = svd_factors(delta, min(rank, min(delta.shape)))
        B, A = U * S, Vh
        if ctx.params.svd_clamp is not None:
            dist = torch.cat([B.flatten(), A.flatten()])
            hi = torch.quantile(dist.float(), ctx.params.svd_clamp).item()
            B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
        out[name] = LowRankDelta(B=B.float(), A=A.float())
    return out
