"""The engine: the loaded base model, its target layers and every adapter's calibration samples, swept by a
schedule (``walk.py``) that hands each layer group's complete statistics to a method's solve.

Where the model is a plain chain of blocks (decoder and encoder stacks), a sweep walks it one block at a
time (DESIGN.md §3.7), so memory does not grow with depth; other models (encoder-decoders) run whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ..adapters import LoraAdapter
from ..deltas import DenseDelta, LowRankDelta
from ..errors import IterisError
from ..finite import NonFiniteStatistics
from ..solve import weight_norm_sq
from . import sharding
from .blocks import find_stack
from .capture import StatsCollector
from .diagnose import explain
from .exchange import StatsExchange
from .forward import Batcher, TokenSample, input_device
from .inject import MERGED, DeltaInjector
from .layers import LayerGroup, base_weight, find_groups
from .stats import GroupStats, map_tensors
from .sweep import Sweep

Delta = LowRankDelta | DenseDelta
# A method's solve of one layer group: (the group, each task's complete statistics of it, on the solving
# device) -> {member layer: merged delta}.
GroupSolve = Callable[[LayerGroup, list[GroupStats]], dict[str, Delta]]


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs (the engine's share of ``CalibrationConfig``)."""

    batch_size: int = 8
    stats_dtype: torch.dtype = torch.float64
    walk: str = "auto"  # auto, blocks or model
    offload_states: bool = False
    offload_stats: bool = False
    overlap: str = "auto"  # auto, on or off
    split: str = "auto"  # several processes: auto, adapters or samples
    progress: bool = False

    @classmethod
    def of(cls, cal, device: str, **changes) -> EngineOptions:
        """From a ``CalibrationConfig``, for a model whose inputs go to ``device`` (``changes``: other fields)."""
        return cls(**{"batch_size": cal.batch_size, "stats_dtype": getattr(torch, cal.resolved_stats_dtype(device)),
                      "walk": cal.walk, "offload_states": cal.offload_states, "offload_stats": cal.offload_stats,
                      "overlap": cal.overlap, "split": cal.split, **changes})


class Sweeps(Protocol):
    """What a method sees of the engine (``MergeContext.engine``)."""

    capture_seconds: float
    fit_seconds: float
    walks_blocks: bool  # the model runs as a plain chain of blocks (the schedules that visit blocks can run)
    solve_seconds: float

    def sweep(self, schedule, solve: GroupSolve, label: str = "") -> dict[str, Delta]: ...

    def set_merged(self, deltas: dict[str, Delta]) -> None: ...

    def base_weight(self, name: str) -> torch.Tensor: ...

    def adapted_weight_norms(self, name: str) -> list[float]: ...


class Engine:
    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], injector: DeltaInjector,
                 adapters: list[LoraAdapter], task_samples: list[list], batcher: Batcher, options: EngineOptions,
                 own_overrides: list[dict] | None = None, merged_overrides: list[dict] | None = None, ranks=None,
                 sharded: bool = False):
        self.ranks = ranks  # ranks.Ranks when several processes share the merge
        self.options = options
        self.adapters = adapters
        self.task_names = [a.name for a in adapters]
        # which ranks capture each adapter (one: whole; several: a share each; None: all, summed by reduce)
        self.holders: list[tuple[int, ...] | None] | None = None
        probe_sample = task_samples[0][:1]
        if ranks is not None:
            self.holders = ranks.holders([_size(s) for s in task_samples], options.split)
            task_samples = [ranks.shard(s, f"adapter '{n}'", among=h)
                            for s, n, h in zip(task_samples, self.task_names, self.holders)]
        self.model, self.layers, self.injector, self.batcher = model, layers, injector, batcher
        self.task_samples = task_samples
        self.device = input_device(model)  # where batches go; a spread model's blocks may sit on other GPUs
        self.gpus = sorted({p.device for p in model.parameters() if p.is_cuda}, key=str)
        self.capture_seconds = 0.0
        self.solve_seconds = 0.0
        self.fit_seconds = 0.0  # block-level fits (DistilledSweep)
        n = len(adapters)
        self.own_overrides = [self._on_model(o) for o in (own_overrides or [{}] * n)]
        self.merged_overrides = [self._on_model(o) for o in (merged_overrides or [{}] * n)]
        # overlap: a block's solve runs on a worker thread (and, on a GPU, a side stream) while the next
        # block is captured; "on" forces it on the CPU too (same answer, for tests)
        # (one GPU only: on a spread model each GPU's solves already queue behind its own captures)
        self.overlap = len(self.gpus) <= 1 and (options.overlap == "on"
                                                or (options.overlap == "auto" and self.device.startswith("cuda")))
        self.remembered: list[list[dict]] | None = None  # [task][batch] -> group -> projected own rows
        # tokens of every task together: the size of a sample-space solve (unknown for recorded calls, whose
        # layers see different numbers of rows: decided while capturing)
        self.total_tokens = (sum(len(s.input_ids) for samples in task_samples for s in samples)
                             if all(isinstance(s, TokenSample) for t in task_samples for s in t) else None)
        probe = next(iter(batcher(probe_sample, 1)))
        self.groups = find_groups(model, layers, probe)
        self.stack = None if options.walk == "model" else find_stack(model, layers, probe)
        if self.stack is None and options.walk == "blocks":
            raise IterisError(
                f"{type(model).__name__} does not run its target layers as one plain chain of blocks, so it "
                "cannot be walked block by block; set calibration.walk: auto (or model)"
            )
        # blocks sharded over the processes (families/sharded.py): gathered per visit of the walk, which must walk them
        self.sharded = sharded
        self._weight_norms: dict[str, list[float]] | None = None
        if sharded:
            if self.stack is None:
                raise IterisError(f"{type(model).__name__} cannot be walked block by block, and a model sharded over "
                                  "processes is only run that way; set calibration.shard: off")
            for block in sharding.fsdp_units(model):  # a probe that stopped inside a block left it gathered
                sharding.release(block)
        # (hooks last: nothing above may refuse the model once they are on it)
        self.collector = StatsCollector(layers, self.groups, options.stats_dtype)
        self.exchange = StatsExchange(ranks, self.collector) if ranks is not None else None

    def _on_model(self, overrides: dict) -> dict:
        """modules_to_save tensors moved once, not at every block call."""
        out = {}
        for path, value in overrides.items():
            current = self.model.get_parameter(path)
            if type(current).__name__ == "DTensor":
                raise IterisError(f"'{path}' (an adapter's modules_to_save) lies in a block sharded over processes, "
                                  "where it cannot be swapped per adapter; set calibration.shard: off")
            out[path] = value.to(device=current.device, dtype=current.dtype)
        return out

    @property
    def walks_blocks(self) -> bool:
        return self.stack is not None

    def base_weight(self, name: str) -> torch.Tensor:
        if self.sharded:
            raise IterisError("a model sharded over processes has no whole base weight in any one of them; "
                              "with_pretrain_matrix needs one: set calibration.shard: off")
        return base_weight(self.layers[name]).detach()

    def adapted_weight_norms(self, name: str) -> list[float]:
        """||W0 + dW_i||_F^2 for each adapter's LoRA on a layer (||W0||^2 where it has none)."""
        if self._weight_norms is not None:  # (a sharded model: taken by every process at a sweep's start)
            return self._weight_norms[name]
        loras = [a.modules.get(name) for a in self.adapters]
        base = self.base_weight(name)
        base = base.to(torch.promote_types(base.dtype, torch.float32))  # once per layer, not once per adapter
        base_sq = weight_norm_sq(base, None)
        return [weight_norm_sq(base, lora, base_sq) for lora in loras]

    def set_merged(self, deltas: dict[str, Delta]) -> None:
        self.injector.set_variant(MERGED, deltas)

    def projections(self, task: int) -> dict[str, dict[str, torch.Tensor]]:
        """Adapter ``task``'s A per group and member: what its projected cross terms are taken on."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, lora in self.adapters[task].modules.items():
            out.setdefault(self.collector.group_of[name], {})[name] = lora.A
        return out

    def onload(self, group: str, st: GroupStats) -> GroupStats:
        """A group's statistics where its layer is (a copy, if they were offloaded): what a solve reads."""
        if not self.options.offload_stats:
            return st
        device = self.layers[group].weight.device
        return map_tensors(dataclasses.replace(st, proj=dict(st.proj), own_proj=dict(st.own_proj)),
                           lambda t: t.to(device, non_blocking=True))

    def sweep(self, schedule, solve: GroupSolve, label: str = "") -> dict[str, Delta]:
        """Every task's statistics for every layer group, gathered as ``schedule`` (``GlobalSweep``,
        ``SequentialSweep``) walks the model and handed group by group to ``solve``; returns its deltas."""
        schedule.check(self)
        if self.sharded and self._weight_norms is None:  # every process at once, while all of them are here
            self._weight_norms = sharding.adapted_weight_norms(
                self.layers, {n: [a.modules.get(n) for a in self.adapters] for n in self.layers}, self.ranks)
        spec = schedule.spec
        if self.ranks is not None:
            spec = spec.replace(rows=None)  # kept inputs are not summed over processes: Grams then
        try:
            return schedule.walk(Sweep(self, spec, solve, label))
        except NonFiniteStatistics as exc:
            raise IterisError(explain(self, exc, label)) from None

    def close(self) -> None:
        self.remembered = None
        self.collector.remove()
        self.injector.remove()


def _size(samples: list) -> int:
    """An adapter's share of the capture work: its tokens (its samples, for recorded calls)."""
    return sum(s.tokens if isinstance(s, TokenSample) else 1 for s in samples)
