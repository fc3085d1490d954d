"""Hidden states kept at a block boundary between visits of the walk: one per batch, per adapter's own
model and per merged model. The cache decides where they live (in place, or in pinned CPU memory)."""

from __future__ import annotations

import torch

from .blocks import BlockCall


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t in CPU memory; from a GPU into pinned memory, copied without stalling the GPU queue (pinned blocks
    are reused only once their copies are done)."""
    if not t.is_cuda:
        return t.to("cpu")
    kept = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return kept.copy_(t, non_blocking=True)


def in_place(t: torch.Tensor) -> torch.Tensor:
    return t


class HiddenStates:
    """``own[i][j]`` and ``merged[i][j]``: what the current block receives for batch j of task i, in the
    adapter's own model and in the merged model (either list empty where that model is not run)."""

    def __init__(self, offload: bool):
        # where a state is kept between blocks: in place, or (offload) in CPU memory; a plain function, so that
        # what holds it (the collector, for remembered projections) does not keep these states alive
        self.store = to_host if offload else in_place
        self.own: list[list[BlockCall]] = []
        self.merged: list[list[BlockCall]] = []

    def keep_all(self) -> None:
        for calls in self.own + self.merged:
            for call in calls:
                call.hidden = self.store(call.hidden)

    def merged_as_own(self) -> HiddenStates:
        """A view in which each adapter's own model starts from the merged model's states (the same tensors)."""
        view = HiddenStates(offload=False)
        view.store, view.own = self.store, self.merged
        return view
