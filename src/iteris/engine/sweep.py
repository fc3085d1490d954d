"""One sweep's running state and its primitives, driven by a schedule (``walk.py``).

``capture(block, stage)`` runs every task's batches through one block with the stage's groups captured
(advancing the hidden states it is asked to); ``propagate(block)`` runs the merged model's states through a
block; ``solve(stage, captured)`` hands the statistics to the method, on this thread, on a worker beside
the next captures (``overlap.py``), or on the rank that received them (``exchange.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import finite
from . import sharding
from .blocks import BlockCall, first_block_call
from .cache import HiddenStates, to_host
from .forward import run_forward
from .inject import MERGED, own
from .layers import LayerGroup
from .overlap import OverlappedSolves
from .spec import CaptureSpec
from .stats import GroupStats, map_tensors

Advance = Literal["own", "merged"]


def _sync(devices: list[torch.device]) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


@dataclass
class Captured:
    """A stage's statistics per task, and what of them is still travelling between processes."""

    per_task: list[dict[str, GroupStats]]
    in_flight: list


class Sweep:
    def __init__(self, engine, spec: CaptureSpec, solve, label: str):
        self.engine = engine
        self.spec = spec
        self.label = label
        self.group_solve = solve
        self.exchange = engine.exchange
        self.proj = [engine.projections(i) if spec.projections else {} for i in range(len(engine.adapters))]
        self.task_batches = [list(engine.batcher(samples, engine.options.batch_size)) for samples in engine.task_samples]
        self.result: dict = {}
        self.capture_seconds = 0.0
        self.overlapped: OverlappedSolves | None = None
        self.deferred: dict[str, int] | None = None  # who solved each layer, where sharing waits for the end
        self.trailing: list = []  # with overlapped solves: the last stage's traffic between processes
        self.recall = False  # paired captures read the own rows remembered by an earlier sweep
        self.remember: list[list[dict]] | None = None  # where an own-only capture remembers them
        self._devices: dict[int, torch.device] = {}

    # ------------------------------------------------------------------------------------- whole model

    def whole_model(self) -> dict:
        """Every group in one stage, each task's batches run through the whole model."""
        e, spec = self.engine, self.spec
        groups = e.groups
        per_task = []
        bar = tqdm(total=sum(map(len, self.task_batches)), desc=f"{self.label}: capture", leave=False, unit="batch",
                   disable=not e.options.progress)
        start = time.perf_counter()
        if self.exchange is not None:
            self.exchange.assign(groups)
        for i, task in enumerate(self.task_batches):
            e.collector.start([g.name for g in groups], self.proj[i], spec, rows_tokens=e.total_tokens)
            for batch in task:
                with e.injector.use(own(i), e.own_overrides[i]):
                    e.collector.own_pass(lambda: run_forward(e.model, batch), batch)
                if spec.paired:
                    with e.injector.use(MERGED, e.merged_overrides[i]):
                        e.collector.merged_pass(lambda: run_forward(e.model, batch.for_merged()), batch)
                bar.update(1)
            per_task.append(self._finished(i))
        self._settle(self._in_flight())
        _sync(e.gpus)
        e.capture_seconds += time.perf_counter() - start
        bar.close()
        return self._timed_solve(groups, per_task)

    # ------------------------------------------------------------------------------------ block by block

    def open_states(self, kinds: tuple[Advance, ...]) -> HiddenStates:
        """What the first block receives for every batch, in each adapter's own model and in the merged
        model (those of ``kinds``)."""
        e = self.engine
        start = time.perf_counter()
        states = HiddenStates(e.options.offload_states)
        for i, task in enumerate(self.task_batches):
            if "own" in kinds:
                with e.injector.use(own(i), e.own_overrides[i]):
                    states.own.append([first_block_call(e.model, e.stack, b) for b in task])
            if "merged" in kinds:
                with e.injector.use(MERGED, e.merged_overrides[i]):
                    states.merged.append([first_block_call(e.model, e.stack, b.for_merged()) for b in task])
        states.keep_all()
        self.capture_seconds += time.perf_counter() - start
        return states

    def walk_blocks(self, visit: Callable[[nn.Module, list[LayerGroup]], None]) -> dict:
        """``visit(block, its groups)`` for every block in depth order (a sharded block gathered meanwhile);
        then the solves still in flight are collected and, where deferred, shared between processes."""
        e = self.engine
        by_block: dict[int, list[LayerGroup]] = {}
        for g in e.groups:
            by_block.setdefault(e.stack.block_of[g.name], []).append(g)
        bar = tqdm(total=len(e.stack.blocks), desc=f"{self.label}: blocks", disable=not e.options.progress,
                   leave=False, unit="block")
        try:
            for b, block in enumerate(e.stack.blocks):
                if e.sharded:
                    sharding.gather(block)
                visit(block, by_block.get(b, []))
                if e.sharded:
                    sharding.release(block)
                bar.update(1)
            self._drain()
        finally:
            if self.overlapped is not None:
                self.overlapped.close()
        bar.close()
        if self.overlapped is not None:
            # the solves ran under the captures: count as solve time only what the captures waited for (the
            # waits fall outside the capture windows)
            e.solve_seconds += self.overlapped.waited
        e.capture_seconds += self.capture_seconds
        return self.result

    def overlap_solves(self) -> None:
        """Solve each stage on a worker while the next is captured (where the engine overlaps at all)."""
        if self.engine.overlap:
            self.overlapped = OverlappedSolves(self.engine.device)

    def defer_sharing(self) -> None:
        """Several processes: share the solved layers once, at the sweep's end (the merged model stays as set
        for the whole sweep, so the solves need not wait for one another); solvers are dealt out over the
        whole sweep, not stage by stage (blocks' costs differ little, their groups' a lot)."""
        if self.exchange is not None:
            self.deferred = {}
            self.exchange.assign(self.engine.groups)

    def capture(self, block: nn.Module, stage: list[LayerGroup], states: HiddenStates, advance: tuple[Advance, ...],
                stop_at: str | None = None) -> Captured:
        """Every task's statistics of the stage's groups from one block; the states named in ``advance`` move
        on to the block's output; ``stop_at``: a group whose input ends every pass."""
        e, spec = self.engine, self.spec
        t0 = time.perf_counter()
        per_task = []
        if self.exchange is not None and self.deferred is None:
            self.exchange.assign(stage)
        # (a stage with no group runs the merged model only where its states move on)
        run_merged = spec.paired and (bool(stage) or "merged" in advance)
        for i, task in enumerate(self.task_batches):
            e.collector.start([g.name for g in stage], self.proj[i], spec, stop_at=stop_at, store=states.store,
                              rows_tokens=e.total_tokens)
            for j, batch in enumerate(task):
                if not self.recall:
                    call = states.own[i][j]
                    out = e.collector.own_pass(self._runner(block, call, own(i), e.own_overrides[i]), batch,
                                               self.remember[i][j] if self.remember else None)
                    if "own" in advance:
                        call.hidden = states.store(out)
                if run_merged:
                    call = states.merged[i][j]
                    out = e.collector.merged_pass(self._runner(block, call, MERGED, e.merged_overrides[i]), batch,
                                                  e.remembered[i][j] if self.recall else None)
                    if "merged" in advance:
                        call.hidden = states.store(out)
            per_task.append(self._finished(i))
        in_flight = self._in_flight()
        if self.overlapped is None:
            self._settle(in_flight)
            _sync(e.gpus)
        elif self.overlapped.cuda:
            # the main stream waits for the previous stage's traffic only (long done, as a rule): until then
            # the tensors it sent stay alive, so their memory is not reused under a send (on CPUs a transfer
            # is waited for once, by the solve's worker)
            self._wait(self.trailing)
            self.trailing = [entry for entry in in_flight if not callable(entry)]
        self.capture_seconds += time.perf_counter() - t0
        return Captured(per_task, in_flight)

    def propagate(self, block: nn.Module, states: HiddenStates) -> None:
        """The merged model's states through ``block`` as it now stands (its layers solved and installed)."""
        e = self.engine
        t0 = time.perf_counter()
        for i in range(len(self.task_batches)):
            for call in states.merged[i]:
                call.hidden = states.store(self._runner(block, call, MERGED, e.merged_overrides[i])())
        _sync(e.gpus)
        self.capture_seconds += time.perf_counter() - t0

    def solve(self, stage: list[LayerGroup], captured: Captured) -> None:
        """The stage's solves into ``result``: on a worker beside the next captures, or here."""
        if not stage:
            return
        if self.overlapped is not None:
            owners = self.deferred if self.deferred is not None else {}
            mine = self._mine(stage, owners)
            self.result.update(self.overlapped.submit(
                lambda: self._solve_groups(mine, captured.per_task), captured.per_task,
                before=lambda pending=captured.in_flight: self._settle(pending)))
        else:
            self.result.update(self._timed_solve(stage, captured.per_task))

    def _drain(self) -> None:
        e = self.engine
        if self.overlapped is not None:
            self.result.update(self.overlapped.finish())
            self._wait(self.trailing)
        if self.deferred is not None:
            t0 = time.perf_counter()
            self.result = self.exchange.share(self.result, self.deferred, e.groups)
            e.solve_seconds += time.perf_counter() - t0

    def _runner(self, block: nn.Module, call: BlockCall, variant, overrides):
        device = self.block_device(block)

        def forward():
            with self.engine.injector.use(variant, overrides):
                return call.run(block, call.hidden.to(device, non_blocking=True))

        return forward

    def block_device(self, block: nn.Module) -> torch.device:
        """Each block's hidden state goes to the GPU holding it (spread models' hooks move the other inputs)."""
        device = self._devices.get(id(block))
        if device is None:
            device = self._devices[id(block)] = next(block.parameters(), torch.empty(0, device=self.engine.device)).device
        return device

    # -------------------------------------------------------------------------------------------- solves

    def _mine(self, stage: list[LayerGroup], owners: dict[str, int] | None = None) -> list[LayerGroup]:
        """The stage's groups this process solves (all of them in a single process)."""
        if self.exchange is None:
            return list(stage)
        layers = set(self.exchange.mine(stage, owners))
        return [g for g in stage if g.members[0] in layers]

    def _timed_solve(self, stage: list[LayerGroup], per_task) -> dict:
        """The stage's solves; with several processes each solves the groups whose statistics it received and
        all get every result, unless sharing is deferred to the sweep's end."""
        e = self.engine
        _sync(e.gpus)
        start = time.perf_counter()
        owners: dict[str, int] = {} if self.deferred is None else self.deferred
        mine = self._mine(stage, owners)
        out = self._solve_groups(mine, per_task) if mine else {}
        if self.exchange is not None and self.deferred is None:
            out = self.exchange.share(out, owners, e.groups)
        _sync(e.gpus)
        e.solve_seconds += time.perf_counter() - start
        return out

    def _solve_groups(self, groups: list[LayerGroup], per_task: list[dict[str, GroupStats]]) -> dict:
        """The method's solve of each group, on statistics checked finite and brought where the layer is; its
        result checked finite too (one host sync each): a NaN stops in the stage where it appears."""
        e = self.engine
        if not groups:
            return {}
        if e.options.offload_stats and e.gpus:
            # statistics in CPU memory were copied there without waiting: the stream the solve runs on was made
            # to wait for those copies, so once it is idle they are done (later captures are not)
            torch.cuda.current_stream().synchronize()
        finite.check_statistics(per_task, [g.name for g in groups])
        out: dict = {}
        for g in groups:
            out.update(self.group_solve(g, [e.onload(g.name, stats[g.name]) for stats in per_task]))
        finite.check_deltas(out, self.label)
        return out

    # ----------------------------------------------------------------------------------- statistics

    def _finished(self, task: int) -> dict[str, GroupStats]:
        """The collector's statistics for one task; with offload_stats, moved to CPU memory at once, so the
        GPU holds one task's statistics while capturing and one group's while solving."""
        e = self.engine
        stats = e.collector.finish(e.holders[task] if e.holders else None)
        received = self.exchange.take_received() if self.exchange is not None else []
        if e.options.offload_stats:
            # what other processes send stays where it arrives (its solve reads it next); scalars stay on the
            # device (read on the host only where solved, and a pinned copy would not be waited for)
            arrived = {id(st) for st in received}
            for st in stats.values():
                if id(st) not in arrived:
                    map_tensors(st, lambda t: t if t.dim() == 0 else to_host(t))
        return stats

    def _in_flight(self) -> list:
        return self.exchange.take_in_flight() if self.exchange is not None else []

    def _settle(self, in_flight: list) -> None:
        """Several processes: the stage's statistics sent between ranks have arrived, for what the current
        stream runs next, and shares of one adapter's statistics are summed."""
        if in_flight:
            self.engine.ranks.settle(in_flight)

    def _wait(self, in_flight: list) -> None:
        """Several processes: the stage's transfers are done (what they sent may be reused)."""
        if in_flight:
            self.engine.ranks.wait_for(in_flight)
