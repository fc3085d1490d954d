"""Merges that reshape the singular spectrum of the task updates: TSV-M, Iso-C and Iso-CTS.

Their authors run them on full fine-tuning updates, with SVDs of d_out x d_in matrices over all min(d_out, d_in)
components. For LoRAs every update lies in the span of the stacked factors, so they run here in that span,
the "core space" (as in Core Space merging, NeurIPS 2025): with B = [w_1 s_1 B_1, ..] = Q_B R_B and
[A_1; ..]^T = Q_A R_A, update i is Q_B M_i Q_A^T with M_i = R_B[:, i] R_A[:, i]^T (K x K, K <= sum r_i).
Each method reshapes the M_i exactly as its authors reshape the full updates, with K in place of
min(d_out, d_in), and the result Q_B M Q_A^T is an exact LoRA of rank K: no d_out x d_in matrix is formed.
The full-space forms would spread the spectrum's mean over min(d_out, d_in) directions, almost all of them
outside every adapter's update (arbitrary completions of the SVD), which no LoRA user wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import LowRankDelta
from ..errors import IterisError
from .base import MergeContext, param, register


def weighted_factors(loras: list, weights: list[float], device: str, dtype=torch.float64):
    """([w_i s_i B_i], [A_i]): each weighted update as its two factors, on ``device`` in ``dtype``."""
    to = {"device": device, "dtype": dtype}
    return [(w * lora.scale) * lora.B.to(**to) for lora, w in zip(loras, weights)], [lora.A.to(**to) for lora in loras]


def core_space(loras: list, weights: list[float], device: str):
    """(Q_B, Q_A, [M_i]): each weighted update w_i s_i B_i A_i = Q_B M_i Q_A^T, in float64."""
    Bs, As = weighted_factors(loras, weights, device)
    Q_B, R_B = torch.linalg.qr(torch.cat(Bs, dim=1))
    Q_A, R_A = torch.linalg.qr(torch.cat(As, dim=0).T)
    cores, start = [], 0
    for lora in loras:
        cols = slice(start, start + lora.rank)
        cores.append(R_B[:, cols] @ R_A[:, cols].T)
        start += lora.rank
    return Q_B, Q_A, cores


def orthogonal_part(X: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (the polar factor U V^T of X = U S V^T)."""
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


def top_components(M: torch.Tensor, k: int):
    """(u, s, vh) of M's top k singular components, those of numerically zero singular value left out: their
    vectors are arbitrary completions, which the full-rank updates the authors merge never have."""
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    tol = s[0] * max(M.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    k = min(k, int((s > tol).sum()))
    return u[:, :k], s[:k], vh[:k]


def tsv_merge(cores: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M: each task's top singular components side by side, their left and right singular vectors each
    made orthonormal as a whole, the singular values kept. The authors keep 1/T of min(d_out, d_in) per task,
    which for LoRAs is every component of every task: so here, wherever they fit in K (else 1/T of K each)."""
    parts = [top_components(M, min(M.shape)) for M in cores]  # every component of every task, where they fit
    if sum(len(s) for _, s, _ in parts) > min(cores[0].shape):
        parts = [top_components(M, int(min(M.shape) / len(cores))) for M in cores]  # the authors' 1/T of each
    U, S, Vh = (torch.cat(x, dim=d) for x, d in zip(zip(*parts), (1, 0, 0)))
    return orthogonal_part(U) @ torch.diag(S) @ orthogonal_part(Vh.T).T


def iso_c_merge(cores: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C: the sum of the updates with every singular value replaced by their mean (over its nonzero ones:
    where the updates cancel, no arbitrary direction is given weight)."""
    U, S, Vh = top_components(sum(cores), min(cores[0].shape))
    return S.mean() * (U @ Vh)


def iso_cts_merge(cores: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS: the sum's top singular directions (the common space) and, in the rest, each task's top
    directions outside the common space, made orthonormal together, with one isotropic singular value."""
    K, T = min(cores[0].shape), len(cores)
    common = int(K * common_fraction)
    shared = min(round((K - common) / T) * T, K // T * T)  # the task-specific share divides evenly among the tasks
    common, per_task = K - shared, shared // T
    u_c, s_c, vh_c = top_components(sum(cores), common)
    parts = [top_components(M - u_c @ (u_c.T @ M), per_task) for M in cores] + [(u_c, s_c, vh_c)]
    U, S, Vh = (torch.cat(x, dim=d) for x, d in zip(zip(*parts), (1, 0, 0)))
    return S.mean() * (orthogonal_part(U) @ orthogonal_part(Vh.T).T)


def _merge_layers(ctx: MergeContext, merge_cores) -> dict[str, LowRankDelta]:
    """Every layer: the adapters that touch it, in their core space, merged and scaled; an exact LoRA."""
    out = {}
    for name in ctx.targets:
        pairs = [(lora, w) for lora, w in zip(ctx.loras(name), ctx.weights) if lora is not None]
        Q_B, Q_A, cores = core_space([l for l, _ in pairs], [w for _, w in pairs], ctx.device)
        M = ctx.params.scale * merge_cores(cores)
        out[name] = LowRankDelta(B=(Q_B @ M).float(), A=Q_A.T.float())
    return out


_SCALE_HELP = ("alpha: multiplies the merged update (the authors choose it on validation data from (0, 3]; "
               "1.0 is TSV-M's published default)")


@dataclass
class SubspaceParams:
    scale: float = param(1.0, _SCALE_HELP)


@dataclass
class IsoCTSParams:
    scale: float = param(1.0, _SCALE_HELP)
    common_space_fraction: float = param(0.8, "share of the spectrum kept from the sum (the rest: each task's own)")

    def validate(self):
        if not 0.0 <= self.common_space_fraction <= 1.0:
            raise IterisError(f"iso_cts: common_space_fraction must be in [0, 1], got {self.common_space_fraction}")


@register("tsv_m", SubspaceParams,
          "TSV-M (Gargiulo et al., CVPR 2025): task singular vectors, decorrelated; in the LoRA core space "
          "(exact, rank sum r_i)")
def tsv_m(ctx: MergeContext):
    return _merge_layers(ctx, tsv_merge)


@register("iso_c", SubspaceParams,
          "Iso-C (Marczak et al., ICML 2025): the sum with a flat spectrum; in the LoRA core space "
          "(exact, rank sum r_i)")
def iso_c(ctx: MergeContext):
    return _merge_layers(ctx, iso_c_merge)


@register("iso_cts", IsoCTSParams,
          "Iso-CTS (Marczak et al., ICML 2025): common and task-specific subspaces, flat spectrum; in the LoRA "
          "core space (exact, rank sum r_i)")
def iso_cts(ctx: MergeContext):
    return _merge_layers(ctx, lambda cores: iso_cts_merge(cores, ctx.params.common_space_fraction))
