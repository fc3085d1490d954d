"""ProDistill (Xu et al., ICML 2025, "Scalable Model Merging with Progressive Layerwise Distillation").

Block by block in depth order, element-wise merging coefficients lambda_i (one per weight, per task) are
fitted by Adam so that the merged block, dW = sum_i lambda_i * dW_i, on the merged model's input to it,
gives what task i's own block gives on its own input (the squared error summed, one step per batch of one
task); then the merged model's states move on through the fitted block. The authors' defaults: lambda
starts at 0.5, Adam at 0.01, 50 epochs. The result is dense (element-wise products of the LoRAs): cut to rank
sum r_i (or ``--rank``) with its error reported, or folded whole with ``--merge-into-base``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..deltas import DenseDelta
from ..engine import BlockFit, CaptureSpec, DistilledSweep
from ..errors import IterisError
from .base import MergeContext, param, register
from .blockfit import fit_block


@dataclass
class ProDistillParams:
    epochs: int = param(50, "passes over every task's calibration batches, per block (the authors' default)")
    lr: float = param(0.01, "Adam's learning rate on the coefficients (the authors' default)")
    init: float = param(0.5, "every coefficient's starting value (the authors' 0.5)")
    seed: int = param(0, "the order the batches are visited in")

    def validate(self):
        if self.epochs < 0 or self.lr <= 0:
            raise IterisError("prodistill: epochs must be >= 0 and lr > 0")


@register("prodistill", ProDistillParams,
          "ProDistill (ICML 2025): element-wise coefficients fitted block by block so that the merged block "
          "matches each adapter's own (dense; SVD to rank sum r_i, error reported)", needs_calibration=True)
def prodistill(ctx: MergeContext):
    p = ctx.params

    def fit(data: BlockFit) -> dict:
        updates = {name: [(i, (w * lora.delta(data.dtype)).to(data.device))
                          for i, (lora, w) in enumerate(zip(ctx.loras(name), ctx.weights)) if lora is not None]
                   for name in data.layers}
        coefs = {name: [torch.full_like(d, p.init, requires_grad=True) for _, d in tasks]
                 for name, tasks in updates.items()}

        def build():
            return {name: DenseDelta(D=sum(c * d for c, (_, d) in zip(coefs[name], tasks)))
                    for name, tasks in updates.items()}

        report = fit_block(data, [c for cs in coefs.values() for c in cs], build, p.epochs * len(data.pairs), p.lr,
                           [1.0] * len(ctx.adapters), balanced=False, relative_lr=False, seed=p.seed)
        ctx.report.setdefault("block_fit", {})[data.layers[0]] = {"loss_before": report.before,
                                                                 "loss_after": report.after}
        with torch.no_grad():
            return {name: DenseDelta(D=d.D.detach()) for name, d in build().items()}

    return ctx.engine.sweep(DistilledSweep(CaptureSpec(projections=False), fit, start="none"), None,
                            label="prodistill")
