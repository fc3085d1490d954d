"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It"), data-free.

A linear layer's update spans, approximately, the inputs of its own task, so each task's update stands in
for its data: the merged update minimises sum_i ||(dW - dW_i) dW_i^T||_F^2 / ||dW_i||_F^2, from the sum of
the updates, by Adam (the authors' 300 steps at learning rate 1e-5). For LoRAs the loss and its gradient
2 (dW A_i^T - B_i A_i A_i^T) (B_i^T B_i) A_i / ||dW_i||^2 come from the factors, so no d_out x d_out product
is formed; Adam's elementwise steps make the result full rank: a dense update, cut to rank sum r_i (or
``--rank``) with its error reported, or folded whole with ``--merge-into-base``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import DenseDelta
from ..errors import IterisError
from .base import MergeContext, param, register
from .subspace import weighted_factors


def wudi_update(Bs: list[torch.Tensor], As: list[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    """The merged update from each task's factors (update i = Bs[i] @ As[i]), by the authors' Adam loop."""
    merged = torch.nn.Parameter(sum(B @ A for B, A in zip(Bs, As)))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    BtB = [B.T @ B for B in Bs]
    AAt = [A @ A.T for A in As]
    scales = [2.0 / float((G * H).sum()) for G, H in zip(BtB, AAt)]  # 2 / ||B A||_F^2 = 2 / <B^T B, A A^T>
    for _ in range(iterations):
        grad = torch.zeros_like(merged)
        for B, A, G, H, c in zip(Bs, As, BtB, AAt, scales):
            grad.add_(((merged.detach() @ A.T - B @ H) @ G) @ A, alpha=c)
        merged.grad = grad
        optimizer.step()
    return merged.detach()


@dataclass
class WudiParams:
    iterations: int = param(300, "Adam steps per layer (the authors' default)")
    lr: float = param(1e-5, "Adam's learning rate (the authors': 1e-5 for vision, 2e-5 for language models)")

    def validate(self):
        if self.iterations < 0:
            raise IterisError("wudi: iterations must be >= 0")
        if self.lr <= 0:
            raise IterisError("wudi: lr must be > 0")


@register("wudi", WudiParams,
          "WUDI (Cheng et al., ICML 2025): minimises each task's interference on its own update's span, by Adam "
          "(dense; SVD to rank sum r_i, error reported)")
def wudi(ctx: MergeContext):
    out = {}
    for name in ctx.targets:
        pairs = [(lora, w) for lora, w in zip(ctx.loras(name), ctx.weights) if lora is not None]
        dtype = torch.promote_types(pairs[0][0].A.dtype, torch.float32)  # (the authors' float32; float64 stays)
        Bs, As = weighted_factors([l for l, _ in pairs], [w for _, w in pairs], ctx.device, dtype)
        with torch.enable_grad():  # (Adam's step reads no graph, but the merge runs under no_grad)
            out[name] = DenseDelta(D=wudi_update(Bs, As, ctx.params.iterations, ctx.params.lr).cpu())
    return out
