"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"), layer-wise.

dW_l = sum_i lambda_{i,l} * w_i * dW_{i,l}: one coefficient per task and target layer, fitted by Adam so that
the merged model's predictions on each task's unlabeled inputs (with that task's own classifier head) have the
least entropy, summed over tasks; each step takes one batch of every task, and the coefficients are kept in
[0, 1] after it. The authors' defaults: lambda starts at 0.3, Adam at 1e-3, 500 steps. Their inputs are the
test set's (test-time adaptation); here they are the calibration inputs every data-aware method gets.

The result is exact: sum_i lambda_i w_i s_i B_i A_i is a LoRA of rank sum r_i. Classifiers only: the entropy
is taken over a head's classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import LowRankDelta
from ..engine import ModelFit, WholeModelFit
from ..errors import IterisError
from .base import MergeContext, param, register

CLASSIFIERS = ("SEQ_CLS",)


@dataclass
class AdaMergingParams:
    steps: int = param(500, "Adam steps, each on one calibration batch of every task (the authors' 500)")
    lr: float = param(1e-3, "Adam's learning rate on the coefficients (the authors' default)")
    init: float = param(0.3, "every coefficient's starting value (the authors' prior 0.3)")

    def validate(self):
        if self.steps < 0 or self.lr <= 0 or not 0 <= self.init <= 1:
            raise IterisError("adamerging: steps must be >= 0, lr > 0 and init in [0, 1]")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the predicted class distributions."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def adamerging_fit(ctx: MergeContext, data: ModelFit) -> dict:
    p = ctx.params
    layers = {name: [(i, lora) for i, lora in enumerate(ctx.loras(name)) if lora is not None] for name in data.layers}
    layers = {name: tasks for name, tasks in layers.items() if tasks}
    to = {"device": data.device, "dtype": data.dtype}
    A = {name: torch.cat([lora.A.to(**to) for _, lora in tasks]) for name, tasks in layers.items()}
    B = {name: [(ctx.weights[i] * lora.scale) * lora.B.to(**to) for i, lora in tasks] for name, tasks in layers.items()}
    coefs = {name: torch.full((len(tasks),), p.init, **to, requires_grad=True) for name, tasks in layers.items()}

    def build() -> dict:
        return {name: LowRankDelta(B=torch.cat([c * b for c, b in zip(coefs[name], B[name])], dim=1), A=A[name])
                for name in layers}

    def loss(step: int) -> torch.Tensor:
        deltas = build()
        return sum(entropy(data.output(deltas, i, step % n)) for i, n in enumerate(data.batches))

    optimizer = torch.optim.Adam(list(coefs.values()), lr=p.lr, fused=data.device.type == "cuda")
    with torch.no_grad():
        before = float(loss(0))
    for step in range(p.steps):
        optimizer.zero_grad(set_to_none=True)
        loss(step).backward()
        optimizer.step()
        with torch.no_grad():
            for c in coefs.values():
                c.clamp_(0.0, 1.0)
    with torch.no_grad():
        after = float(loss(0))
        ctx.report["adamerging"] = {"entropy_first_batches_before": before, "entropy_first_batches_after": after,
                                    "coefficients": {n: c.tolist() for n, c in coefs.items()}}
        return {name: LowRankDelta(B=d.B.detach(), A=d.A) for name, d in build().items()}


@register("adamerging", AdaMergingParams,
          "AdaMerging (ICLR 2024), layer-wise: one coefficient per task and layer, fitted so that the merged "
          "classifiers' predictions on the calibration inputs have the least entropy (exact, rank sum r_i; "
          "classifier adapters only)", needs_calibration=True)
def adamerging(ctx: MergeContext):
    kinds = {a.task_type for a in ctx.adapters}
    if not kinds <= set(CLASSIFIERS):
        raise IterisError(f"adamerging minimises the entropy of a classifier's predictions, so it needs classifier "
                          f"adapters (task_type {', '.join(CLASSIFIERS)}, each with its head); these are "
                          f"{sorted(map(str, kinds))}. Use iteris or regmean for other models")
    return ctx.engine.sweep(WholeModelFit(lambda data: adamerging_fit(ctx, data)), None, label="adamerging")
