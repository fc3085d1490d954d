"""Float32-accurate products of bf16 features on bf16 tensor cores, with no float32 copy of the features.

A float32 matrix is exactly the sum of three bf16 matrices (8 + 8 + 8 significant bits), and the product of
two bf16 numbers is exact in float32. So for bf16 features x (tokens x d, wide) and a thin float32 matrix W
(r x d: a LoRA A, a projection), one bf16 GEMM of x against W's three parts with float32 output gives the
float32 product up to summation order, reading x once in bf16. Casting x to float32 first would move
three times x's bytes, which for thin W costs more than the GEMM itself.
"""

from __future__ import annotations

import torch

HALF = (torch.bfloat16, torch.float16)
_MIXED_OUTPUT = True  # torch.mm(..., out_dtype=float32) of half inputs; off once a torch refuses it


def half_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for half-precision a, b: float32 result, float32 accumulation of the exact products."""
    global _MIXED_OUTPUT
    if _MIXED_OUTPUT and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MIXED_OUTPUT = False
    return torch.mm(a.float(), b.float())


def half_addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32, a and b half precision: straight into the accumulator where torch can."""
    global _MIXED_OUTPUT
    if _MIXED_OUTPUT and acc.is_cuda:
        try:
            if acc.is_contiguous():
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError):
            _MIXED_OUTPUT = False
    acc.addmm_(a.float(), b.float())


def bf16_parts(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """``parts`` bf16 tensors summing to t: three hold a float32 exactly, two its first 16 significant bits."""
    rest = t.float()
    out = []
    for k in range(parts):
        part = rest.to(torch.bfloat16)
        out.append(part)
        if k + 1 < parts:
            rest = rest - part.float()
    return out


def split_rows(w: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """w (r x d) as its bf16 parts stacked row-wise (parts * r x d), for ``split_mm``."""
    return torch.cat(bf16_parts(w, parts), dim=0)


def split_mm(x: torch.Tensor, w_split: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """x @ w^T in float32 for bf16 x (n x d) and w given as ``split_rows(w, parts)``."""
    y = half_mm(x, w_split.T)
    r = w_split.shape[0] // parts
    return y.view(x.shape[0], parts, r).sum(dim=1)


def split_tmm(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p^T @ x in float32 for a thin float32 p (n x r) and bf16 x (n x d)."""
    r = p.shape[1]
    y = half_mm(torch.cat(bf16_parts(p, 3), dim=1).T, x)
    return y.view(3, r, x.shape[1]).sum(dim=0)


# The part pairs (i, j) of a product of two split matrices that float32 can see: i + j <= 2, the rest fall
# below float32's last bit.
_TERMS = ((0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0))


def split_right_factor(b: torch.Tensor) -> torch.Tensor:
    """b (n x r, float32) arranged for ``split_left_factor``: its parts side by side, one per product term."""
    parts = bf16_parts(b, 3)
    return torch.cat([parts[j] for _, j in _TERMS], dim=1)


def split_left_factor(a: torch.Tensor) -> torch.Tensor:
    """a (m x r, float32) as bf16 parts such that split_left_factor(a) @ split_right_factor(b)^T equals
    a @ b^T to float32 accuracy, in one bf16 GEMM (of inner size 6 r)."""
    parts = bf16_parts(a, 3)
    return torch.cat([parts[i] for i, _ in _TERMS], dim=1)


def splits_bf16(*tensors: torch.Tensor) -> bool:
    """Whether the split products apply: bf16 operands on a GPU (float16's exponent range cannot hold the
    smaller parts, and on the CPU a float32 copy is as cheap as anything else)."""
    return all(t.is_cuda and t.dtype == torch.bfloat16 for t in tensors)
