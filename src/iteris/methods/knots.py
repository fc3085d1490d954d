"""KnOTS-TIES (Stoica et al., ICLR 2025): the adapters' updates aligned in one shared basis before TIES.

The updates side by side, [dW_1 .. dW_T] = U S [V_1 .. V_T]^T, share one output basis U; each task is then
the k x d_in matrix S V_i^T, and TIES (trim, elect signs, disjoint mean) merges those, elementwise, in the
aligned basis: dW = U merged. For LoRAs U spans the stacked B's, so with B = [w_1 s_1 B_1 ..] = Q R the
SVD is that of R [A_1 .. A_T] placed block-diagonally (R x T d_in, R = sum r_i), and the result is an exact
LoRA of rank <= sum r_i: no d_out x d_in matrix is formed. The authors' LLaMA-LoRA settings are the
defaults: top_k 100 (nothing trimmed), signs elected by the sum of values, the tasks scaled by 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import LowRankDelta
from ..errors import IterisError
from .base import MergeContext, param, register
from .subspace import weighted_factors

SUPPORT = 1e-5  # singular values at or below this are no part of the shared basis (the authors' threshold)


def aligned_tasks(loras: list, weights: list[float], device: str):
    """(U, [S V_i^T]): the shared output basis of the weighted updates and each task in it, in float64."""
    Bs, As = weighted_factors(loras, weights, device)
    Q, R = torch.linalg.qr(torch.cat(Bs, dim=1))
    blocks, start = [], 0
    for A in As:
        blocks.append(R[:, start:start + A.shape[0]] @ A)  # R_i A_i: task i's columns of R D
        start += A.shape[0]
    u, s, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = s > SUPPORT
    u, s, vh = u[:, keep], s[keep], vh[keep]
    d_in = loras[0].A.shape[1]
    return Q @ u, [s[:, None] * part for part in vh.split(d_in, dim=1)]


def ties_in_basis(tasks: list[torch.Tensor], thresholds: list[float | None], scale: float) -> torch.Tensor:
    """TIES on the aligned tasks: each trimmed to its entries of magnitude >= its threshold, the sign of the
    summed values elected per entry, the agreeing entries (times ``scale``) averaged."""
    stacked = torch.stack(tasks)
    if any(t is not None for t in thresholds):
        keep = torch.stack([t.abs() >= th if th is not None else torch.ones_like(t, dtype=torch.bool)
                            for t, th in zip(tasks, thresholds)])
        stacked = stacked * keep
    sign = torch.sign(stacked.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # (where the values cancel exactly: the layer's majority sign)
    agree = torch.where(sign > 0, stacked > 0, stacked < 0)
    kept = scale * stacked * agree
    count = agree.sum(dim=0)
    return torch.where(count > 0, kept.sum(dim=0) / count.clamp(min=1), torch.zeros_like(kept[0]))


@dataclass
class KnotsTiesParams:
    scale: float = param(0.5, "each task's scaling before the disjoint mean (the authors' LLaMA-LoRA default)")
    top_k: float = param(100.0, "percent of each task's entries kept (by magnitude, over all layers at once)")

    def validate(self):
        if not 0.0 < self.top_k <= 100.0:
            raise IterisError(f"knots_ties: top_k is a percentage in (0, 100], got {self.top_k}")


@register("knots_ties", KnotsTiesParams,
          "KnOTS-TIES (Stoica et al., ICLR 2025): TIES on the tasks aligned in one SVD basis (exact, rank <= sum r_i)")
def knots_ties(ctx: MergeContext):
    p = ctx.params
    aligned, present = {}, {}
    for name in ctx.targets:
        pairs = [(i, lora) for i, lora in enumerate(ctx.loras(name)) if lora is not None]
        present[name] = [i for i, _ in pairs]
        aligned[name] = aligned_tasks([l for _, l in pairs], [ctx.weights[i] for i, _ in pairs], ctx.device)
    thresholds = _thresholds(aligned, present, len(ctx.adapters), p.top_k)
    out = {}
    for name, (U, tasks) in aligned.items():
        merged = ties_in_basis(tasks, [thresholds[i] for i in present[name]], p.scale)
        out[name] = LowRankDelta(B=U.float(), A=merged.float())
    return out


def _thresholds(aligned: dict, present: dict, n: int, top_k: float) -> list[float | None]:
    """Each task's magnitude threshold for keeping its top ``top_k`` percent of entries, over all layers."""
    if top_k >= 100.0:
        return [None] * n
    out = []
    for i in range(n):
        values = torch.cat([tasks[present[name].index(i)].abs().flatten() for name, (_, tasks) in aligned.items()
                            if i in present[name]])
        drop = values.numel() - int(values.numel() * top_k / 100.0)
        out.append(float(values.kthvalue(drop).values) if drop > 0 else None)
    return out
