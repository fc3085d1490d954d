"""The closed-form layer solves of IterIS and RegMean: pure tensor maths, no model, no I/O.

For one target layer and tasks i = 1..N (DESIGN.md §2):

    P  = sum_i c_i dW_i (X_i^T Xh_i + a1 ||X_i^T Xh_i||_F I)
    Q  = sum_i c_i (Xh_i^T Xh_i + a2 ||Xh_i^T Xh_i||_F I)
    dW* = P Q^-1

With dW_i = s_i B_i A_i, P = B_cat R where R stacks the rows c_i s_i A_i (X_i^T Xh_i + a1 ||.|| I), so
dW* = B_cat (R Q^-1): a LoRA of rank sum(r_i), found with sum(r_i) right-hand sides instead of d_out.
Statistics arrive already reduced (Grams, projected cross terms, norms); solves run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deltas import LoraModule
from .deltas import DenseDelta, LowRankDelta
from .errors import IterisError

SOLVE_DTYPE = torch.float64


@dataclass
class TaskLayerStats:
    """What one task contributes to one layer's solve.

    gram:       Xh^T Xh (d_in x d_in), Xh the inputs the merged model's layer sees (mixed by gamma).
    cross_proj: A_i X^T Xh (r_i x d_in), X the inputs the adapter's own model sees; None if the adapter
                does not touch this layer (its delta is zero there).
    cross_norm: ||X^T Xh||_F (a float, or a 0-dim tensor left on the device).
    weight:     c_i, adaptive weight times the user's manual weight.
    rows:       Xh itself (n_i x d_in), for the sample-space solve (then gram may be None).
    own_proj:   X A_i^T (n_i x r_i), likewise; None if the adapter does not touch this layer.
    """

    gram: torch.Tensor | None
    cross_proj: torch.Tensor | None
    cross_norm: float | torch.Tensor
    weight: float
    rows: torch.Tensor | None = None
    own_proj: torch.Tensor | None = None


def weight_norm_sq(base: torch.Tensor, lora: LoraModule | None, base_sq: float | None = None) -> float:
    """||W0 + s B A||_F^2 = ||W0||^2 + 2 s <W0, B A> + s^2 ||B A||^2, never forming the d_out x d_in sum.

    ``base_sq`` (||W0||^2), when the caller has it already: one layer, many adapters."""
    dtype = torch.promote_types(base.dtype, torch.float32)
    W0 = base.to(dtype)
    total = float(W0.pow(2).sum(dtype=SOLVE_DTYPE)) if base_sq is None else base_sq
    if lora is None:
        return total
    A = lora.A.to(device=W0.device, dtype=dtype)
    B = lora.B.to(device=W0.device, dtype=dtype)
    cross = float(((B.T @ W0) * A).sum(dtype=SOLVE_DTYPE))
    return total + 2.0 * lora.scale * cross + lora.scale**2 * LowRankDelta(B=B, A=A).norm_sq()


def adaptive_weight(weight_sq: float, output_sq: float) -> float:
    """c = ||W||_F^2 / ||X W^T||_F^2: balances tasks whose layers work at different scales.

    ||X W^T||^2 is what the layer outputs in the adapter's own model, summed over real tokens during
    capture, so it costs nothing beyond the forward pass (rather than a d_out x d_in x d_in product)."""
    if output_sq <= 0.0:
        raise IterisError("adaptive weight undefined: a layer received all-zero inputs; set adaptive_weights: false")
    return weight_sq / output_sq


def regularize(matrix: torch.Tensor, alpha: float, norm: float | None = None) -> torch.Tensor:
    """M + alpha * ||M||_F * I: Tikhonov term scaled to the matrix it regularises."""
    M = matrix.to(SOLVE_DTYPE)
    if alpha == 0.0:
        return M
    if norm is None:
        norm = float(torch.linalg.matrix_norm(M))
    M = M.clone() if M is matrix else M
    M.diagonal().add_(alpha * norm)
    return M


def pretrain_rhs(base_weight: torch.Tensor, cross: torch.Tensor, weight: float, alpha1: float, cross_norm: float) -> torch.Tensor:
    """One task's W0 term of P in with_pretrain_matrix mode: c_i W0 (X_i^T Xh_i + a1 ||.||_F I)."""
    W0 = base_weight.to(SOLVE_DTYPE)
    return weight * (W0 @ regularize(cross.to(W0.device), alpha1, cross_norm))


def blocked_right_solve(L: torch.Tensor, R: torch.Tensor, block: int = 1024, blocked: bool | None = None) -> torch.Tensor:
    """R (L L^T)^-1 for lower-triangular L (d x d) and few rows R (k x d), by blocked substitution.

    With k << d, trsm runs at a few percent of the GPU's rate, even on L's diagonal blocks alone. Here the
    diagonal blocks are inverted together (one batched trsm with ``block`` right-hand sides each), and
    each substitution pass streams L once through GEMMs. ``blocked`` (default: on a GPU when d > block)."""
    d = L.shape[0]
    if not (blocked if blocked is not None else L.is_cuda and d > block):  # one trsm each way
        Y = torch.linalg.solve_triangular(L.mT, R, upper=True, left=False)
        return torch.linalg.solve_triangular(L, Y, upper=False, left=False)
    edges = list(range(0, d, block)) + [d]
    spans = list(zip(edges[:-1], edges[1:]))
    # diagonal blocks padded to one size with the identity (their inverses then hold the identity there too)
    diagonal = torch.eye(block, dtype=L.dtype, device=L.device).repeat(len(spans), 1, 1)
    for n, (a, b) in enumerate(spans):
        diagonal[n, : b - a, : b - a] = L[a:b, a:b]
    identity = torch.eye(block, dtype=L.dtype, device=L.device).expand_as(diagonal)
    inverse = torch.linalg.solve_triangular(diagonal, identity, upper=False)
    Z = R.T.contiguous()  # solves L L^T Z = R^T: Z = Q^-1 R^T, so R Q^-1 = Z^T (Q is symmetric)
    for n, (a, b) in enumerate(spans):  # L W = R^T
        if a:
            Z[a:b].sub_(L[a:b, :a] @ Z[:a])
        Z[a:b] = inverse[n, : b - a, : b - a] @ Z[a:b]
    for n, (a, b) in reversed(list(enumerate(spans))):  # L^T Z = W
        if b < d:
            Z[a:b].sub_(L[b:, a:b].T @ Z[b:])
        Z[a:b] = inverse[n, : b - a, : b - a].T @ Z[a:b]
    return Z.T


def _cholesky_right(Q: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R Q^-1 by Cholesky and blocked substitution, and the factorisation's info (a tensor: no host sync).

    One matrix at a time: cuSOLVER's batched Cholesky is several times slower than a loop at these sizes."""
    L, info = torch.linalg.cholesky_ex(Q)
    return blocked_right_solve(L, R), info


def solve_right_many(Qs: list[torch.Tensor], Rs: list[torch.Tensor]) -> list[tuple[torch.Tensor, str]]:
    """R_k Q_k^-1 for symmetric positive (semi)definite Q_k, by Cholesky; the factorisations are checked once
    for all of them (one host sync), and a singular Q falls back to least squares."""
    solved = [_cholesky_right(Q.to(SOLVE_DTYPE), R.to(SOLVE_DTYPE)) for Q, R in zip(Qs, Rs)]
    failed = {k for k, (_, info) in enumerate(solved) if int(info) != 0}  # the first waits; the rest are ready
    out = []
    for k, (X, _) in enumerate(solved):
        if k in failed:
            # Too few tokens for d_in (or alpha2 = 0): take the minimum-norm solution rather than fail.
            Q, R = Qs[k].to(SOLVE_DTYPE), Rs[k].to(SOLVE_DTYPE)
            out.append((R @ torch.linalg.pinv(Q, hermitian=True), "pinv"))
        else:
            out.append((X, "cholesky"))
    return out


def solve_right(Q: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, str]:
    """R Q^-1 for symmetric positive (semi)definite Q, by Cholesky; least squares if Q is singular."""
    return solve_right_many([Q], [R])[0]


class _GramSum:
    """Q = sum_i c_i G_i + (a2 sum_i c_i ||G_i||_F) I in float64.

    Each task's Gram is converted to float64 and its norm taken once however many layers read it (q/k/v,
    gate/up share one); the norms stay on the device (no host sync)."""

    def __init__(self, alpha2: float, shared: bool = True):
        self.alpha2 = alpha2
        self.shared = shared  # keep the float64 copies for the next layer (else one copy alive at a time)
        self._seen: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def _float64(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        G, norm = self._seen.get(id(gram), (None, None))
        if G is None:
            G = gram.to(SOLVE_DTYPE)
            if norm is None and self.alpha2:
                norm = torch.linalg.vector_norm(G)
            self._seen[id(gram)] = (G if self.shared else None, norm)
        return G, norm

    def q(self, tasks: list[TaskLayerStats]) -> torch.Tensor:
        Q = None
        shift = 0.0
        for t in tasks:
            G, norm = self._float64(t.gram)
            Q = G * t.weight if Q is None else Q.add_(G, alpha=t.weight)
            if self.alpha2:
                shift = shift + t.weight * norm
            del G
        if self.alpha2:
            Q.diagonal().add_(self.alpha2 * shift)
        return Q


def iteris_solve_many(
    layers: list[tuple[list[TaskLayerStats], list[LoraModule | None]]], alpha1: float, alpha2: float
) -> list[tuple[LowRankDelta, str]]:
    """The default-mode solve of several layers (one stage): the norms of the Grams they share are taken once,
    and the factorisations are checked together."""
    grams = _GramSum(alpha2, shared=len(layers) > 1)
    Qs, Rs, Bs = [], [], []
    for tasks, loras in layers:
        device = tasks[0].gram.device
        Qs.append(grams.q(tasks))
        Rs.append(_stacked_rows(tasks, loras, alpha1, device))
        Bs.append(stacked_b(loras, device))
    del grams
    return [(LowRankDelta(B=B, A=A), how) for B, (A, how) in zip(Bs, solve_right_many(Qs, Rs))]


def iteris_solve_samples(
    layers: list[tuple[list[TaskLayerStats], list[LoraModule | None]]], alpha1: float, alpha2: float
) -> list[tuple[LowRankDelta, str]]:
    """The default-mode solve of one layer group in sample space (DESIGN.md §3.4), for n = sum_i n_i tokens
    fewer than d_in: an n x n Cholesky instead of a d_in x d_in one, the same answer.

    With F the stacked rows sqrt(c_i) Xh_i, Q = F^T F + lam I (lam = a2 sum_i c_i ||Xh_i^T Xh_i||_F > 0), and
    R = G F + E, where G holds sqrt(c_i) s_i (X_i A_i^T)^T in task i's token columns and E the rows
    a1 c_i s_i ||X_i^T Xh_i|| A_i:
        R Q^-1 = G K^-1 F + (E - E F^T K^-1 F) / lam,   K = F F^T + lam I   (push-through and Woodbury).
    The main term has no cancellation; only the small alpha1 term goes through Woodbury's difference."""
    first = layers[0][0]
    device = first[0].rows.device
    X = torch.cat([t.rows.to(SOLVE_DTYPE) for t in first])  # the group's members read the same rows
    H = X @ X.T
    counts = [t.rows.shape[0] for t in first]
    edges = [0]
    for n in counts:
        edges.append(edges[-1] + n)
    gram_norms = [torch.linalg.vector_norm(H[a:b, a:b]) for a, b in zip(edges[:-1], edges[1:])]
    Ks, lefts, extras, row_scales, Bs = [], [], [], [], []
    for tasks, loras in layers:
        lam = alpha2 * sum(t.weight * norm for t, norm in zip(tasks, gram_norms))
        root = torch.cat([torch.full((n,), t.weight**0.5, dtype=SOLVE_DTYPE, device=device) for t, n in zip(tasks, counts)])
        K = H * root[:, None] * root[None, :]
        K.diagonal().add_(lam)
        blocks, extra = [], []
        for t, lora, a, b in zip(tasks, loras, edges[:-1], edges[1:]):
            if lora is None:
                continue
            G = torch.zeros(lora.A.shape[0], X.shape[0], dtype=SOLVE_DTYPE, device=device)
            G[:, a:b] = (t.weight**0.5 * lora.scale) * t.own_proj.to(SOLVE_DTYPE).T
            blocks.append(G)
            if alpha1 != 0.0:
                extra.append((alpha1 * t.weight * lora.scale * t.cross_norm) * lora.A.to(device=device, dtype=SOLVE_DTYPE))
        left = torch.cat(blocks)
        E = torch.cat(extra) if extra else None
        if E is not None:
            left = left - ((E @ X.T) * root[None, :]) / lam  # E F^T / lam
        Ks.append(K)
        lefts.append(left)
        extras.append(None if E is None else E / lam)
        row_scales.append(root)
        Bs.append(stacked_b(loras, device))
    out = []
    for (Y, how), root, extra, B in zip(solve_right_many(Ks, lefts), row_scales, extras, Bs):
        A = (Y * root[None, :]) @ X  # (left K^-1) F
        if extra is not None:
            A = A + extra
        out.append((LowRankDelta(B=B, A=A), how))
    return out


def _stacked_rows(tasks: list[TaskLayerStats], loras, alpha1: float, device) -> torch.Tensor:
    """R: the rows c_i s_i (A_i X_i^T Xh_i + a1 ||X_i^T Xh_i|| A_i), stacked in adapter order."""
    rows = []
    for t, lora in zip(tasks, loras):
        if lora is None:
            continue
        proj = t.cross_proj.to(SOLVE_DTYPE)
        if alpha1 != 0.0:
            proj = proj + (alpha1 * t.cross_norm) * lora.A.to(device=device, dtype=SOLVE_DTYPE)
        rows.append((t.weight * lora.scale) * proj)
    return torch.cat(rows, dim=0)


def stacked_b(loras: list[LoraModule | None], device=None) -> torch.Tensor:
    return torch.cat([m.B.to(device=device, dtype=SOLVE_DTYPE) for m in loras if m is not None], dim=1)


def iteris_solve(
    tasks: list[TaskLayerStats],
    loras: list[LoraModule | None],
    alpha1: float,
    alpha2: float,
    base_weight: torch.Tensor | None = None,
    base_rhs: torch.Tensor | None = None,
) -> tuple[LowRankDelta | DenseDelta, str]:
    """One layer's IterIS solve.

    Default mode returns the exact factored delta B_cat @ A*. With ``base_weight`` (W0) and ``base_rhs``
    (sum_i c_i W0 (X_i^T Xh_i + a1 ||.|| I)) the whole weight is fitted (``with_pretrain_matrix``) and the
    dense update W* - W0 is returned.
    """
    if base_weight is None:
        return iteris_solve_many([(tasks, loras)], alpha1, alpha2)[0]
    device = tasks[0].gram.device  # statistics stay where they were gathered; adapters may live elsewhere
    Q = _GramSum(alpha2).q(tasks)
    R = _stacked_rows(tasks, loras, alpha1, device)
    B_cat = stacked_b(loras, device)
    P = base_rhs.to(device=device, dtype=SOLVE_DTYPE) + B_cat @ R
    W_star, how = solve_right(Q, P)
    return DenseDelta(D=W_star - base_weight.to(device=device, dtype=SOLVE_DTYPE)), how


def reduce_off_diagonal(gram: torch.Tensor, reduction: float) -> torch.Tensor:
    """RegMean's regulariser: off-diagonal entries scaled by ``reduction``, the diagonal kept."""
    G = gram.to(SOLVE_DTYPE)
    return reduction * G + (1.0 - reduction) * torch.diag_embed(torch.diagonal(G))


def regmean_solve(
    grams: list[torch.Tensor],
    loras: list[LoraModule | None],
    reduction: float,
    weights: list[float] | None = None,
) -> tuple[LowRankDelta, str]:
    """RegMean on LoRA deltas: dW* = (sum_i dW_i G~_i)(sum_i G~_i)^-1, exactly B_cat @ A*."""
    weights = weights or [1.0] * len(grams)
    device = grams[0].device
    reduced = [w * reduce_off_diagonal(g, reduction) for g, w in zip(grams, weights)]
    Q = sum(reduced)
    R = torch.cat(
        [lora.scale * lora.A.to(device=device, dtype=SOLVE_DTYPE) @ g for g, lora in zip(reduced, loras) if lora is not None],
        dim=0,
    )
    A_star, how = solve_right(Q, R)
    return LowRankDelta(B=stacked_b(loras, device), A=A_star), how
