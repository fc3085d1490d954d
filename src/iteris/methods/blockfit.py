"""The optimiser loop shared by the block-level fits (IterIS's refinement, ProDistill): Adam on some tensors
that build a block's deltas, one step per calibration batch, the batches of all tasks shuffled together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..engine import BlockFit


@dataclass
class FitReport:
    before: float  # the block's loss over every batch at the start
    after: float  # and at the end (the start values are kept where it did not fall)
    kept_start: bool


def block_loss(data: BlockFit, build: Callable[[], dict], task: int, batch: int, weight: float,
               balanced: bool) -> torch.Tensor:
    """One batch's residual: balanced, the mean over its tokens of ||merged - own||^2 over the task's own
    energy (so every task counts alike, whatever its prompts' length); else the plain sum of squares."""
    residual = (data.output(build(), task, batch) - data.target(task, batch)).pow(2).sum(-1)
    return weight * (residual.mean() if balanced else residual.sum())


def fit_block(data: BlockFit, params: list[torch.Tensor], build: Callable[[], dict], steps: int, lr: float,
              weights: list[float], balanced: bool, relative_lr: bool, seed: int = 0) -> FitReport:
    """``steps`` Adam steps on ``params`` (in place), each on one batch. ``relative_lr``: each tensor's step
    size is ``lr`` times its root mean square at the start (factors of any scale move alike)."""
    if balanced:
        weights = [w / e if e > 0 else w for w, e in zip(weights, data.energy)]

    def total() -> float:
        with torch.no_grad():
            return sum(float(block_loss(data, build, i, j, weights[i], balanced)) for i, j in data.pairs)

    start = [p.detach().clone() for p in params]
    before = total()
    groups = [{"params": [p], "lr": lr * _rms(p) if relative_lr else lr} for p in params]
    # fused on a GPU: one kernel per tensor group instead of a dozen (the steps are launch-bound there)
    optimizer = torch.optim.Adam(groups, fused=bool(params) and params[0].is_cuda)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with torch.enable_grad():
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(data.pairs), generator=generator).tolist()
            task, batch = data.pairs[order.pop()]
            optimizer.zero_grad(set_to_none=True)
            block_loss(data, build, task, batch, weights[task], balanced).backward()
            optimizer.step()
    after = total() if steps else before
    kept_start = not after <= before  # (a NaN keeps the start too)
    if kept_start:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    return FitReport(before, before if kept_start else after, kept_start)


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().pow(2).mean().sqrt()) or 1.0
