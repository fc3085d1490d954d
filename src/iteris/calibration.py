"""The loaded base model plus every adapter's calibration tokens: what data-aware methods run on."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .adapters import LoraAdapter
from .capture import DeltaInjector, GroupStats, StatsCollector, find_groups
from .deltas import DenseDelta, LowRankDelta
from .models import TokenSample, base_weight, batches, make_batch


class Calibration:
    def __init__(
        self,
        model,
        layers: dict,
        injector: DeltaInjector,
        task_samples: list[list[TokenSample]],
        task_names: list[str],
        pad_id: int,
        batch_size: int,
        stats_dtype: torch.dtype,
        progress: bool,
        own_overrides: list[dict],
        merged_overrides: list[dict],
    ):
        self.model = model
        self.layers = layers
        self.task_samples = task_samples
        self.task_names = task_names
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.device = str(next(model.parameters()).device)
        self.progress = progress
        self.merged_overrides = merged_overrides
        self.capture_seconds = 0.0
        self.injector = injector  # holds each adapter's own model as variant "own:<i>"
        probe = make_batch(task_samples[0][:1], pad_id, self.device)
        self.groups = find_groups(model, layers, probe)
        self.group_of = {m: g.name for g in self.groups for m in g.members}
        self.collector = StatsCollector(model, layers, self.groups, self.injector, stats_dtype)
        self._own_overrides = own_overrides

    def base_weight(self, name: str) -> torch.Tensor:
        return base_weight(self.layers[name]).detach()

    def _projections(self, adapter: LoraAdapter) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, lora in adapter.modules.items():
            out.setdefault(self.group_of[name], {})[name] = lora.A
        return out

    def _run(
        self, i: int, merged: str | None, projections, gamma: float, want_cross: bool, keep_cross: bool, label: str
    ):
        n_batches = -(-len(self.task_samples[i]) // self.batch_size)
        bar = tqdm(
            total=n_batches,
            desc=f"{label}: capture {self.task_names[i]}",
            disable=not self.progress,
            leave=False,
            unit="batch",
        )
        start = time.perf_counter()
        try:
            return self.collector.collect(
                batches(self.task_samples[i], self.batch_size, self.pad_id, self.device),
                own_variant=f"own:{i}",
                merged_variant=merged,
                projections=projections,
                own_overrides=self._own_overrides[i],
                merged_overrides=self.merged_overrides[i],
                gamma=gamma,
                want_cross=want_cross,
                keep_cross=keep_cross,
                progress=bar,
            )
        finally:
            self.capture_seconds += time.perf_counter() - start
            bar.close()

    def own_statistics(
        self, adapters: list[LoraAdapter], projections: bool, label: str, want_cross: bool = False
    ) -> list[dict[str, GroupStats]]:
        """Each adapter's model on its own samples (X_i^T X_i per layer group, and A_i X_i^T X_i)."""
        return [
            self._run(i, None, self._projections(a) if projections else {}, 0.0, want_cross, False, label)
            for i, a in enumerate(adapters)
        ]

    def set_merged(self, deltas: dict[str, LowRankDelta | DenseDelta]) -> None:
        self.injector.set_variant("merged", deltas)

    def paired_statistics(
        self, i: int, adapter: LoraAdapter, gamma: float, want_cross: bool, label: str, keep_cross: bool = False
    ) -> dict[str, GroupStats]:
        """The merged model and adapter i's model on task i's samples, paired token by token."""
        return self._run(i, "merged", self._projections(adapter), gamma, want_cross, keep_cross, label)

    def close(self) -> None:
        self.collector.remove()
        self.injector.remove()
