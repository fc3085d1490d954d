"""What a fit sees. A block-level fit (``walk.DistilledSweep``): for every calibration batch, the merged model's
input to one block, and what the adapter's own block gives on its own input there. A whole-model fit
(``walk.WholeModelFit``): the merged model's outputs on each task's batches. A method fits the merged deltas
to those; the engine only runs the model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache import HiddenStates
from .forward import Batch
from .inject import MERGED
from .layers import token_rows


@dataclass
class BlockFit:
    """One block's fitting data. ``pairs`` lists (task, batch) indices; ``start`` holds the block's merged
    deltas as solved so far (empty where nothing was solved); ``energy[i]`` is the mean squared change that
    adapter i's own block makes to a token (what a task's residual is measured against)."""

    layers: list[str]
    start: dict
    pairs: list[tuple[int, int]]
    energy: list[float]
    block: nn.Module
    device: torch.device
    dtype: torch.dtype  # what fitted tensors are kept in: float32, float64 for a float64 model
    _engine: object
    _batches: list[list[Batch]]
    _inputs: HiddenStates  # merged: the block's inputs; own: the own blocks' outputs (already advanced)
    _row_index: dict = field(default_factory=dict)  # (task, batch, shape) -> flat indices of the real tokens

    def output(self, deltas: dict, task: int, batch: int) -> torch.Tensor:
        """The merged block's output rows (real tokens, in ``dtype``) on its input, with ``deltas`` installed for
        the block's layers; differentiable in the deltas' tensors where autograd is on."""
        e = self._engine
        e.injector.update_variant(MERGED, deltas)
        call = self._inputs.merged[task][batch]
        with e.injector.use(MERGED, e.merged_overrides[task]):
            out = call.forward(self.block, call.hidden.to(self.device, non_blocking=True))
        return self._rows(out, task, batch)

    def target(self, task: int, batch: int) -> torch.Tensor:
        """Adapter ``task``'s own block output rows for the batch (real tokens, in ``dtype``)."""
        return self._rows(self._inputs.own[task][batch].hidden.to(self.device, non_blocking=True), task, batch)

    def _rows(self, out: torch.Tensor, task: int, batch: int) -> torch.Tensor:
        """Gathered by indices found once per batch: a boolean mask would make the GPU wait for the host at
        every step, and the fit's steps are many and small."""
        key = (task, batch, tuple(out.shape[:-1]))
        index = self._row_index.get(key)
        if index is None:
            positions = torch.arange(out[..., 0].numel(), device=out.device).view(*out.shape[:-1], 1)
            index = token_rows(positions, self._batches[task][batch], "a block's output").reshape(-1)
            self._row_index[key] = index
        return out.reshape(-1, out.shape[-1]).index_select(0, index).to(self.dtype)

    def frozen_block(self):
        """The block's own weights out of autograd while fitting. The merged variant keeps the last deltas tried
        until the schedule installs the fitted ones."""
        return frozen(self.block)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """A module's own weights out of autograd while deltas are fitted (a loaded model's parameters want grads)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class ModelFit:
    """A whole-model fit's data: ``batches[i]`` is how many calibration batches task i has; ``output`` runs the
    merged model (with task i's own modules_to_save, a classifier's head) on one of them."""

    layers: list[str]
    batches: list[int]
    device: torch.device
    dtype: torch.dtype
    _engine: object
    _batches: list[list[Batch]]
    _installed: dict | None = None  # the deltas the merged variant holds (one step runs every task on them)

    def output(self, deltas: dict, task: int, batch: int) -> torch.Tensor:
        """The model's output (``logits``, in ``dtype``) with ``deltas`` as the merged model's updates;
        differentiable in the deltas' tensors where autograd is on."""
        e = self._engine
        if deltas is not self._installed:
            e.injector.set_variant(MERGED, deltas)
            self._installed = deltas
        with e.injector.use(MERGED, e.merged_overrides[task]):
            out = e.model(**self._batches[task][batch].for_merged().inputs)
        return getattr(out, "logits", out).to(self.dtype)


def own_energy(inputs: list[list[torch.Tensor]], outputs: HiddenStates, batches: list[list[Batch]],
               device: torch.device) -> list[float]:
    """Per task, the mean over real tokens of ||own output - own input||^2 at one block."""
    energy = []
    for task, (before, after) in enumerate(zip(inputs, outputs.own)):
        total, count = 0.0, 0
        for j, (x, call) in enumerate(zip(before, after)):
            diff = token_rows(call.hidden.to(device).float() - x.to(device).float(), batches[task][j], "a block's output")
            total += float(diff.pow(2).sum())
            count += diff.shape[0]
        energy.append(total / max(count, 1))
    return energy
