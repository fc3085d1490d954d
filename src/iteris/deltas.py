"""Merged weight updates, kept factored whenever the maths allows it.

``LoraModule`` is one adapter's update of one layer, the input every merge starts from. A data-aware merge of LoRAs is exactly low rank (``B_cat @ A*``), so it is stored and written without ever
forming the d_out x d_in matrix. Methods that act element-wise (TIES, DARE) produce a dense update, which
becomes a LoRA only through a truncated SVD whose error is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoraModule:
    """One target module of one adapter: ``delta = scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def delta(self, dtype=torch.float64) -> torch.Tensor:
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LowRankDelta:
    """``delta = B @ A`` with B (d_out x k) and A (k x d_in)."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def dense(self, dtype=torch.float64) -> torch.Tensor:
        return self.B.to(dtype) @ self.A.to(dtype)

    def norm_sq(self) -> float:
        """||B A||_F^2 through the k x k Grams, never the full matrix."""
        B, A = self.B.double(), self.A.double()
        return float(((B.T @ B) * (A @ A.T)).sum())

    def to_lora(self, rank: int | None = None) -> tuple["LowRankDelta", float]:
        if rank is None or rank >= self.rank:
            return self, 0.0
        return _truncate_factored(self.B, self.A, rank)


@dataclass
class DenseDelta:
    D: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.D.shape)

    @property
    def rank(self) -> int:
        return min(self.D.shape)

    def dense(self, dtype=torch.float64) -> torch.Tensor:
        return self.D.to(dtype)

    def norm_sq(self) -> float:
        return float(self.D.double().pow(2).sum())

    def to_lora(self, rank: int | None = None) -> tuple[LowRankDelta, float]:
        """A LoRA of ``rank`` (full rank when None, which is exact) and its relative Frobenius error."""
        D = self.D.double()
        if rank is not None and rank < min(D.shape) // 2:
            return _top_singular(D, rank)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        k = len(S) if rank is None else min(rank, len(S))
        return _split(U[:, :k], S[:k], Vh[:k]), _tail_error(S, k)


def _top_singular(D: torch.Tensor, rank: int) -> tuple[LowRankDelta, float]:
    """The leading ``rank`` singular triplets from the smaller Gram's eigenvectors (float64): a few times
    faster than a full SVD when only a thin slice is kept, and as accurate for the part that is kept."""
    wide = D.shape[0] <= D.shape[1]
    M = D if wide else D.T
    values, vectors = torch.linalg.eigh(M @ M.T)
    top = values.flip(0)[:rank].clamp(min=0.0)
    U = vectors.flip(1)[:, :rank]
    S = top.sqrt()
    safe = torch.where(S > 0, S, torch.ones_like(S))
    Vh = (U.T @ M) / safe[:, None] * (S > 0)[:, None]
    total = float(D.pow(2).sum())
    error = 0.0 if total == 0.0 else max(total - float(top.sum()), 0.0) / total
    lora = _split(U, S, Vh) if wide else _split(Vh.T, S, U.T)
    return lora, error**0.5


def _tail_error(S: torch.Tensor, k: int) -> float:
    total = float(S.pow(2).sum())
    return 0.0 if total == 0.0 else (float(S[k:].pow(2).sum()) / total) ** 0.5


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> LowRankDelta:
    """Share singular values evenly between the factors, so neither is badly scaled in low precision."""
    root = S.sqrt()
    return LowRankDelta(B=U * root, A=root[:, None] * Vh)


def _factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A from two thin QRs and a small SVD, never forming B @ A."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # factors may be wider than the layer
    return Qb @ U, S, Vh @ Qa.T


def _truncate_factored(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[LowRankDelta, float]:
    """Best rank-``rank`` approximation of B @ A."""
    U, S, Vh = _factored_svd(B, A)
    rank = min(rank, len(S))
    return _split(U[:, :rank], S[:rank], Vh[:rank]), _tail_error(S, rank)


def svd_factors(delta: LowRankDelta | DenseDelta, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of a delta truncated to ``rank`` (for methods defined on the SVD, such as PEFT's ``svd``)."""
    if isinstance(delta, LowRankDelta):
        U, S, Vh = _factored_svd(delta.B, delta.A)
    else:
        U, S, Vh = torch.linalg.svd(delta.D.double(), full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def relative_change(new: LowRankDelta | DenseDelta, old: LowRankDelta | DenseDelta) -> tuple[float, float]:
    """(||new - old||_F^2, ||old||_F^2), factored when both share the same B."""
    if (
        isinstance(new, LowRankDelta)
        and isinstance(old, LowRankDelta)
        and new.B.shape == old.B.shape
        and torch.equal(new.B, old.B)
    ):
        diff = LowRankDelta(B=new.B, A=new.A - old.A).norm_sq()
    else:
        diff = float((new.dense() - old.dense()).pow(2).sum())
    return diff, old.norm_sq()
