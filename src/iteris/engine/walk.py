"""Schedules: how a sweep walks the model. A method picks one per sweep; a new schedule is a new class here
beside these, built on the sweep's primitives (``capture``, ``propagate``, ``solve``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .. import finite
from ..errors import IterisError
from .cache import HiddenStates
from .distill import BlockFit, ModelFit, frozen, own_energy
from .layers import LayerGroup
from .spec import CaptureSpec
from .sweep import Sweep


def _require_blocks(engine, why: str, instead: str) -> None:
    """Schedules that visit blocks one by one refuse models that are not a plain chain of blocks."""
    if not engine.walks_blocks:
        raise IterisError(f"{why}, and {type(engine.model).__name__} does not run its target layers as one plain "
                          f"chain of blocks; use {instead}")


@dataclass(frozen=True)
class GlobalSweep:
    """The paper's schedule: the merged model stays as set for the whole sweep; every block's groups are one
    stage, solved (on a worker, on a GPU) while the next block is captured. Models that are not a plain chain
    of blocks run whole, every group in one stage."""

    spec: CaptureSpec

    def check(self, engine) -> None:
        pass

    def walk(self, sweep: Sweep) -> dict:
        engine = sweep.engine
        if not engine.walks_blocks:
            return sweep.whole_model()
        spec = sweep.spec
        if spec.remember and not spec.paired:
            engine.remembered = [[{} for _ in task] for task in sweep.task_batches]
            sweep.remember = engine.remembered
        sweep.recall = spec.paired and engine.remembered is not None and not spec.needs_own_models
        states = sweep.open_states(("merged",) if sweep.recall else ("own", "merged") if spec.paired else ("own",))
        sweep.overlap_solves()
        sweep.defer_sharing()

        def visit(block, groups: list[LayerGroup]) -> None:
            sweep.solve(groups, sweep.capture(block, groups, states, advance=("own", "merged")))

        return sweep.walk_blocks(visit)


@dataclass(frozen=True)
class SequentialSweep:
    """One sweep in depth order (DESIGN.md §3.6): every layer group is a stage, solved and installed in the
    merged model at once, so later stages see the inputs of the already-merged layers before them."""

    spec: CaptureSpec

    def __post_init__(self):
        object.__setattr__(self, "spec", self.spec.replace(paired=True))  # every stage pairs with the merged model

    def check(self, engine) -> None:
        _require_blocks(engine, "the sequential schedule walks the model block by block", "schedule: global")

    def walk(self, sweep: Sweep) -> dict:
        engine = sweep.engine
        engine.set_merged({})
        states = sweep.open_states(("own", "merged"))

        def visit(block, groups: list[LayerGroup]) -> None:
            _solve_in_order(sweep, block, groups, states)
            sweep.propagate(block, states)

        return sweep.walk_blocks(visit)


def _solve_in_order(sweep: Sweep, block, groups: list[LayerGroup], states: HiddenStates) -> None:
    """A block's groups, each a stage solved and installed before the next is captured; the adapters' own
    states move on to the block's output."""
    stages = [[g] for g in groups] or [[]]  # (a block with no target layer still moves the states on)
    for s, stage in enumerate(stages):
        last = s == len(stages) - 1
        captured = sweep.capture(block, stage, states, advance=("own",) if last else (),
                                 stop_at=None if last else stages[s + 1][0].name)
        sweep.solve(stage, captured)
        if stage:
            sweep.engine.set_merged(sweep.result)


@dataclass(frozen=True)
class MergedInputSweep:
    """Block by block in depth order, each adapter's own block run on the merged model's input to it: its
    layers' statistics are those of their inputs inside the adapter's block as the merged model feeds it
    (RegMean++). The block's groups are solved together and installed before the merged states move on."""

    spec: CaptureSpec

    def __post_init__(self):
        object.__setattr__(self, "spec", self.spec.replace(paired=False))  # the adapters' own blocks alone

    def check(self, engine) -> None:
        _require_blocks(engine, "this method runs each block on the merged model's input to it", "regmean")

    def walk(self, sweep: Sweep) -> dict:
        engine = sweep.engine
        engine.set_merged({})
        states = sweep.open_states(("merged",))
        own_on_merged = states.merged_as_own()

        def visit(block, groups: list[LayerGroup]) -> None:
            sweep.solve(groups, sweep.capture(block, groups, own_on_merged, advance=()))
            if groups:
                engine.set_merged(sweep.result)
            sweep.propagate(block, states)

        return sweep.walk_blocks(visit)


@dataclass(frozen=True)
class DistilledSweep:
    """Block by block in depth order: each block's groups solved in closed form as ``SequentialSweep`` solves
    them (``start="sequential"``; ``"none"``: nothing solved, the fit starts from its own values), then
    handed with the block to ``fit``, which returns the block's deltas fitted so that the merged block, on
    the merged model's input to it, gives what each adapter's own block gives on its own input; those are
    installed before the merged states move on (progressive layer-wise distillation, ProDistill's order)."""

    spec: CaptureSpec
    fit: Callable[[BlockFit], dict]
    start: Literal["sequential", "none"] = "sequential"

    def __post_init__(self):
        object.__setattr__(self, "spec", self.spec.replace(paired=True))

    def check(self, engine) -> None:
        _require_blocks(engine, "a block-level fit walks the model block by block", "a closed-form schedule")
        if engine.ranks is not None:
            raise IterisError("a block-level fit runs in one process; merge without torchrun")

    def walk(self, sweep: Sweep) -> dict:
        engine = sweep.engine
        engine.set_merged({})
        states = sweep.open_states(("own", "merged"))

        def visit(block, groups: list[LayerGroup]) -> None:
            own_inputs = [[call.hidden for call in task] for task in states.own]
            if self.start == "sequential":
                _solve_in_order(sweep, block, groups, states)
            else:
                sweep.capture(block, [], states, advance=("own",))
            if groups:
                layers = [name for g in groups for name in g.members]
                device = sweep.block_device(block)
                dtype = torch.promote_types(engine.layers[layers[0]].weight.dtype, torch.float32)
                fit = BlockFit(layers, {n: sweep.result[n] for n in layers if n in sweep.result},
                               [(i, j) for i, task in enumerate(sweep.task_batches) for j in range(len(task))],
                               own_energy(own_inputs, states, sweep.task_batches, device), block, device, dtype,
                               engine, sweep.task_batches, states)
                fitted = _run_fit(engine, self.fit, fit, fit.frozen_block(), f"{sweep.label} (block fit)")
                sweep.result.update(fitted)
                engine.set_merged(sweep.result)
            sweep.propagate(block, states)

        return sweep.walk_blocks(visit)


@dataclass(frozen=True)
class WholeModelFit:
    """No statistics and no walk: ``fit`` gets the merged model's outputs on every task's calibration batches
    (``ModelFit``) and returns the merged deltas (AdaMerging's test-time adaptation)."""

    fit: Callable[[ModelFit], dict]
    spec: CaptureSpec = CaptureSpec(projections=False)

    def check(self, engine) -> None:
        if engine.ranks is not None:
            raise IterisError("a whole-model fit runs in one process; merge without torchrun")

    def walk(self, sweep: Sweep) -> dict:
        engine = sweep.engine
        layers = list(engine.layers)
        weight = engine.layers[layers[0]].weight
        fit = ModelFit(layers, [len(t) for t in sweep.task_batches], weight.device,
                       torch.promote_types(weight.dtype, torch.float32), engine, sweep.task_batches)
        try:
            return _run_fit(engine, self.fit, fit, frozen(engine.model), f"{sweep.label} (model fit)")
        finally:
            engine.set_merged({})


def _run_fit(engine, fit: Callable, data, weights_frozen, where: str) -> dict:
    """A method's fit, with the model's own weights out of autograd (``weights_frozen``) and autograd on; its
    deltas checked finite, its seconds counted."""
    start = time.perf_counter()
    with weights_frozen, torch.enable_grad():
        fitted = fit(data)
    finite.check_deltas(fitted, where)
    engine.fit_seconds += time.perf_counter() - start
    return fitted
