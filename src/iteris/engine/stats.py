"""The statistics a capture produces and the arithmetic on them: Grams accumulated from feature rows,
packed to their upper block triangle for travel, unpacked, mirrored, summed from shares.

Pure tensor code, no hooks, models or processes: tested against dense float64 formulas like ``solve.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..precision import HALF, half_addmm_
from .spec import CaptureSpec


@dataclass
class GroupStats:
    """One task's statistics for one layer group (float32/float64, on the layer's device).

    gram:   Xh^T Xh, Xh = (1 - gamma) X~ + gamma X (X~: merged model's inputs, X: the adapter's own).
    cross:  X^T Xh, kept only when asked for (its Frobenius norm, or W0 X^T Xh, is needed).
    proj:   A_m X^T Xh for each member m given a projection.
    out_sq: ||X W_m^T||_F^2 per member, W_m the layer's weight in the adapter's own model (what the
            layer outputs there), when asked for: the denominator of the adaptive weight.
    rows, own_proj: where rows were asked for and the tasks' tokens together are fewer than d_in, Xh itself
            (tokens x d_in, then ``gram`` is None) and X A_m^T per member (tokens x r_m): a solve in
            sample space (DESIGN.md §3.4) needs them; ``full_gram()`` still gives the Gram.
    """

    gram: torch.Tensor | None
    cross: torch.Tensor | None
    proj: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int | torch.Tensor = 0  # (a 0-dim tensor where summed over or sent between processes)
    same_inputs: bool = False  # X~ == X (no merged model yet): cross == gram
    cross_norm: torch.Tensor | None = None  # ||X^T Xh||_F (0-dim float64), when the cross term was gathered
    out_sq: dict[str, float] = field(default_factory=dict)
    rows: torch.Tensor | None = None
    own_proj: dict[str, torch.Tensor] = field(default_factory=dict)
    # as received from another process: the Gram's upper block triangle, packed (``pack_gram``), d_in
    packed: torch.Tensor | None = None
    packed_dim: int = 0

    def full_gram(self) -> torch.Tensor:
        if self.gram is None and self.packed is not None:
            self.gram = unpack_gram(self.packed, self.packed_dim)
            self.packed = None
        elif self.gram is None:
            self.gram = self.rows.T @ self.rows
        return self.gram

    @property
    def cross_or_gram(self) -> torch.Tensor | None:
        return self.full_gram() if self.same_inputs else self.cross


def add_product(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """acc += left^T right, without losing what half-precision features hold.

    bf16/fp16 features from a half-precision model multiply at the half-precision GEMM rate straight into
    the float32 accumulator (cuBLAS accumulates in float32): exactly the float32 product of those features,
    at twice the TF32 rate. Anything else is cast to the accumulator's dtype first.
    """
    if acc.dtype == torch.float32 and left.dtype in HALF and right.dtype == left.dtype:
        half_addmm_(acc, left.T, right)
    else:
        acc.addmm_(left.T.to(acc.dtype), right.to(acc.dtype))


def _gram_blocks(d: int) -> list[slice]:
    """Column blocks of a Gram: only blocks on and above the diagonal are computed (k(k+1)/2 of k^2)."""
    k = 1 if d <= 2048 else 2 if d <= 8192 else 4
    edges = [round(i * d / k) for i in range(k + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(k)]


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x, upper block triangle only (``mirror_gram`` completes it): a Gram is symmetric, so
    computing the lower blocks would spend up to half the GEMM work on copies."""
    blocks = _gram_blocks(acc.shape[0])
    if len(blocks) == 1:
        add_product(acc, x, x)
        return
    for i, a in enumerate(blocks):
        for b in blocks[i:]:
            add_product(acc[a, b], x[:, a], x[:, b])


def upper_blocks(acc: torch.Tensor) -> list[torch.Tensor]:
    """The blocks ``add_gram`` computes (on and above the diagonal): all a Gram's information."""
    blocks = _gram_blocks(acc.shape[0])
    return [acc[a, b] for i, a in enumerate(blocks) for b in blocks[i:]]


def packed_size(d: int) -> int:
    return sum(b.numel() for b in upper_blocks(torch.empty(d, d, device="meta")))


def pack_gram(acc: torch.Tensor) -> torch.Tensor:
    """A Gram's upper blocks in one flat tensor: what travels between processes (5/8 of it for d_in > 8192;
    for d_in <= 2048, one block: the Gram itself, not a copy)."""
    blocks = upper_blocks(acc)
    if len(blocks) == 1:
        return acc.view(-1)
    packed = torch.empty(packed_size(acc.shape[0]), dtype=acc.dtype, device=acc.device)
    offset = 0
    for block in blocks:
        packed[offset : offset + block.numel()].view(block.shape).copy_(block)
        offset += block.numel()
    return packed


def unpack_gram(packed: torch.Tensor, d: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """The Gram from ``pack_gram``'s output, mirrored (``into``: its upper blocks overwritten, not mirrored)."""
    if into is None and len(_gram_blocks(d)) == 1:
        return packed.view(d, d)
    acc = torch.empty(d, d, dtype=packed.dtype, device=packed.device) if into is None else into
    offset = 0
    for block in upper_blocks(acc):
        block.copy_(packed[offset : offset + block.numel()].view(block.shape))
        offset += block.numel()
    if into is None:
        mirror_gram(acc)
    return acc


def mirror_gram(acc: torch.Tensor) -> None:
    blocks = _gram_blocks(acc.shape[0])
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            acc[b, a].copy_(acc[a, b].T)


def cross_norm(st: GroupStats, own_rows: torch.Tensor | None) -> torch.Tensor:
    """||X^T Xh||_F, 0-dim float64; from kept rows through the tokens x tokens products, since
    ||X^T Xh||_F^2 = <X X^T, Xh Xh^T>."""
    if st.rows is None:
        return torch.linalg.vector_norm(st.cross_or_gram, dtype=torch.float64)
    mixed = st.rows.double()
    mixed_products = mixed @ mixed.T
    if st.same_inputs:
        return torch.linalg.vector_norm(mixed_products)
    own = own_rows.double()
    return ((own @ own.T) * mixed_products).sum().clamp_min(0).sqrt()


def add_shares(target: GroupStats, mine: GroupStats | None, parts: list, members: list[str], spec: CaptureSpec) -> None:
    """One task's statistics of a group from its shares (this rank's, if it captured one, and those received,
    each with its scalars tensor: tokens, then output norms), summed into ``target`` (``mine`` or a blank)."""
    cross, want_norm, keep_cross, out_norms = spec.accumulates_cross, spec.wants_cross_norm, spec.keeps_cross, spec.out_norms
    for part, scalars in parts:  # received on the main stream, read here (maybe on a solve's side stream)
        for t in [part.packed, part.cross, scalars, *part.proj.values()]:
            if t is not None and t.is_cuda:
                t.record_stream(torch.cuda.current_stream(t.device))
    gram = mine.full_gram() if mine is not None else None
    for part, _ in parts:
        whole = unpack_gram(part.packed, part.packed_dim)
        gram = whole if gram is None else gram.add_(whole)
        part.packed = None  # one share's Gram at a time
    target.gram, target.packed = gram, None
    proj = dict(mine.proj) if mine is not None else {}
    for part, _ in parts:
        for m, t in part.proj.items():
            proj[m] = t if m not in proj else proj[m] + t
    target.proj = proj
    total = mine.cross if mine is not None else None
    for part, _ in parts:
        if part.cross is not None:
            total = part.cross if total is None else total.add_(part.cross)
    tokens = mine.tokens if mine is not None else 0
    out_sq = dict(mine.out_sq) if mine is not None else {}
    for _, scalars in parts:
        tokens = tokens + scalars[0]
        if out_norms:
            for m, value in zip(members, scalars[1:]):
                out_sq[m] = out_sq.get(m, 0.0) + value
    target.tokens, target.out_sq = tokens, out_sq
    target.cross = total if cross else None
    if want_norm:
        target.cross_norm = cross_norm(target, None)  # (unpaired: of the Gram)
    if not keep_cross:
        target.cross = None


def map_tensors(st: GroupStats, move) -> GroupStats:
    """Replace every tensor a GroupStats holds (fields and dict values) by ``move(tensor)``, in place."""
    for key, value in vars(st).items():
        if isinstance(value, torch.Tensor):
            setattr(st, key, move(value))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, torch.Tensor):
                    value[k] = move(v)
    return st
