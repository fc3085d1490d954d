"""TIES and DARE on the dense deltas, with PEFT's merge utilities (the same maths its users know).

These act element-wise, so the result is dense; it becomes a LoRA by truncated SVD (error reported).
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass
from typing import Callable

import torch
from peft.utils import merge_utils

from ..deltas import DenseDelta
from ..errors import IterisError
from .base import MergeContext, param, register


def _check_density(method: str, density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise IterisError(f"{method}: density must be in (0, 1], got {density}")


def _check_sign(method: str, value: str) -> None:
    if value not in ("total", "frequency"):
        raise IterisError(f"{method}: majority_sign_method must be 'total' or 'frequency', got '{value}'")


def _layer_seed(seed: int, name: str) -> int:
    """A seed per (run seed, layer): masks do not depend on other layers, and seeds s and s+1 share nothing."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") % (2**63)


def _dense_merge(ctx: MergeContext, combine: Callable, seed: int | None = None) -> dict[str, DenseDelta]:
    # Random masks are drawn on the CPU so that a seed means the same masks on every machine.
    device = "cpu" if seed is not None else ctx.device
    out = {}
    for name in ctx.targets:
        present = [(lora, w) for lora, w in zip(ctx.loras(name), ctx.weights) if lora is not None]
        tensors = [lora.delta(torch.float32).to(device) for lora, _ in present]
        weights = torch.tensor([w for _, w in present], dtype=torch.float32, device=device)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(_layer_seed(seed, name))
            out[name] = DenseDelta(D=combine(tensors, weights).cpu())
    return out


@dataclass
class TiesParams:
    density: float = param(0.2, "fraction of each delta's largest-magnitude entries kept")
    majority_sign_method: str = param("total", "'total' (sum of values) or 'frequency' (count of signs)")

    def validate(self):
        _check_density("ties", self.density)
        _check_sign("ties", self.majority_sign_method)


@register("ties", TiesParams, "TIES: trim to density, elect signs, disjoint mean (dense; SVD to rank)")
def ties(ctx: MergeContext):
    p = ctx.params
    return _dense_merge(ctx, lambda t, w: _ties(t, w, p.density, p.majority_sign_method))


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest magnitudes: PEFT's top-k mask (exact ties aside), found
    with one k-th value instead of a top-k sort, which is several times faster on large layers."""
    keep = int(density * tensor.numel())
    if keep >= tensor.numel():
        return tensor
    if keep == 0:
        return torch.zeros_like(tensor)
    magnitude = tensor.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
    return tensor * (tensor.abs() >= threshold)


def _ties(tensors: list[torch.Tensor], weights: torch.Tensor, density: float, sign_method: str) -> torch.Tensor:
    """PEFT's TIES (trim, elect sign, disjoint merge) with the faster trim."""
    stacked = torch.stack([_magnitude_prune(t, density) for t in tensors])
    sign = merge_utils.calculate_majority_sign_mask(stacked, method=sign_method)
    weighted = stacked * merge_utils.reshape_weight_task_tensors(stacked, weights)
    return merge_utils.disjoint_merge(weighted, sign)


@dataclass
class DareParams:
    density: float = param(0.5, "probability of keeping each entry (kept entries are rescaled by 1/density)")
    seed: int = param(0, "seed of the random drop masks")

    def validate(self):
        _check_density("dare", self.density)


@register("dare_linear", DareParams, "DARE: random drop and rescale, then weighted sum (dense; SVD to rank)")
def dare_linear(ctx: MergeContext):
    p = ctx.params
    return _dense_merge(ctx, lambda t, w: merge_utils.dare_linear(t, w, p.density), seed=p.seed)


@dataclass
class DareTiesParams(DareParams):
    majority_sign_method: str = param("total", "'total' (sum of values) or 'frequency' (count of signs)")

    def validate(self):
        super().validate()
        _check_sign("dare_ties", self.majority_sign_method)


@register("dare_ties", DareTiesParams, "DARE drop and rescale, then TIES sign election (dense; SVD to rank)")
def dare_ties(ctx: MergeContext):
    p = ctx.params
    return _dense_merge(
        ctx, lambda t, w: merge_utils.dare_ties(t, w, p.density, p.majority_sign_method), seed=p.seed
    )
