"""Running a method on one model (a transformers model, or one component of a pipeline): the engine built
where the method needs data, the method's raw result checked finite, and its LoRA factors. Shared by every
family and by ``merge_loaded``."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .adapters import LoraAdapter, target_modules
from .deltas import DenseDelta, LowRankDelta
from .engine import Engine, EngineOptions
from .engine.forward import Batcher
from .engine.inject import DeltaInjector, own
from .finite import check_deltas
from .methods import MergeContext, MethodSpec


@dataclass
class Unit:
    """One model a merge runs on, as its family prepared it: a transformers model, or one component of a
    pipeline. ``model`` is None where a data-free method needs nothing loaded."""

    name: str
    adapters: list[LoraAdapter]
    report: dict  # where the method's findings and timings go
    device: str = "cpu"  # where element-wise methods do their arithmetic
    model: nn.Module | None = None
    layers: dict[str, nn.Module] = field(default_factory=dict)
    injector: DeltaInjector | None = None  # each adapter's own model already set as a variant
    samples: list[list] | None = None
    batcher: Batcher | None = None
    options: EngineOptions | None = None
    own_overrides: list[dict] | None = None
    merged_overrides: list[dict] | None = None
    ranks: object = None
    sharded: bool = False
    # the rank a dense result is cut to (None: kept whole); default sum(r_i) of the layer's adapters
    dense_rank: Callable[[str], int | None] | None = None
    engine: Engine | None = None
    holders: list | None = None  # several processes: which ranks captured each adapter

    def loras(self, name: str) -> list:
        return [a.modules.get(name) for a in self.adapters]

    def inject(self, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """The model and its target layers, with a hook that makes it each adapter's own model on demand."""
        self.model, self.layers = model, layers
        self.injector = DeltaInjector(model, layers)
        for i, adapter in enumerate(self.adapters):
            self.injector.set_variant(own(i), adapter.modules)

    def build_engine(self) -> Engine:
        self.engine = Engine(self.model, self.layers, self.injector, self.adapters, self.samples, self.batcher,
                             self.options, self.own_overrides, self.merged_overrides, self.ranks, self.sharded)
        self.holders = self.engine.holders
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        elif self.injector is not None:
            self.injector.remove()
        self.injector = None


def run_unit(spec: MethodSpec, params, weights: list[float], unit: Unit, rank: int | None,
             progress: bool) -> tuple[dict[str, LowRankDelta], dict[str, float]]:
    """The method on one unit: its merged LoRA factors (on the CPU) and each layer's compression error."""
    try:
        engine = unit.engine or (unit.build_engine() if spec.needs_calibration else None)
        ctx = MergeContext(adapters=unit.adapters, weights=weights, targets=target_modules(unit.adapters),
                           params=params, engine=engine, progress=progress, device=unit.device)
        raw = run_method(spec, ctx, unit.report)
    finally:
        unit.close()
    start = time.perf_counter()
    dense_rank = unit.dense_rank or (lambda n: sum(lora.rank for lora in unit.loras(n) if lora is not None))
    deltas, errors = to_lora(raw, rank, default_rank=dense_rank)
    unit.report["timings"]["compress"] = time.perf_counter() - start
    return deltas, errors


@torch.no_grad()  # a user's model may come with trainable parameters: no autograd graph for the captures
def run_method(spec: MethodSpec, ctx: MergeContext, report: dict) -> dict:
    start = time.perf_counter()
    raw = spec.fn(ctx)
    check_deltas(raw, spec.name)
    report["timings"]["merge"] = time.perf_counter() - start
    if ctx.engine is not None:
        report["timings"]["capture"] = ctx.engine.capture_seconds
        report["timings"]["solve"] = ctx.engine.solve_seconds
        if ctx.engine.fit_seconds:
            report["timings"]["fit"] = ctx.engine.fit_seconds
    report.update(ctx.report)
    return raw


def to_lora(raw: dict, rank: int | None, default_rank) -> tuple[dict[str, LowRankDelta], dict[str, float]]:
    """LoRA factors for every layer: exact for factored results unless ``rank`` asks for compression;
    dense results (TIES, DARE, with_pretrain_matrix) are truncated to ``rank`` or ``default_rank(layer)``."""
    deltas, errors = {}, {}
    for name, delta in raw.items():
        k = rank if rank is not None else (default_rank(name) if isinstance(delta, DenseDelta) else None)
        lora, errors[name] = delta.to_lora(k)
        deltas[name] = LowRankDelta(B=lora.B.cpu(), A=lora.A.cpu())  # results leave the GPU free
    check_deltas(deltas, "the merged LoRA factors", written_as=torch.float32)
    return deltas, errors


def peak_memory() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"cpu_max_rss_mb": rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak
