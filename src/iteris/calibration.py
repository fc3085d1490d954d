"""The loaded base model plus every adapter's calibration tokens: what data-aware methods run on.

A sweep gathers every task's statistics for every target layer and hands them, stage by stage, to the
method's solve. Where the model is a plain chain of blocks (decoder and encoder stacks), the sweep walks
it one block at a time (DESIGN.md §3.7): each model's hidden state is kept at the block boundary, one
block runs on it with hooks, its layers are solved and their statistics freed before the next block, so
memory does not grow with depth. Other models (encoder-decoders) run whole, every layer in one stage.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import finite, sharding
from .adapters import LoraAdapter
from .capture import DeltaInjector, GroupStats, LayerGroup, StatsCollector, find_groups
from .deltas import DenseDelta, LowRankDelta
from .errors import IterisError
from .models import (
    CallSample, StopForward, TokenSample, base_weight, batches, find_stack, first_block_call, input_device, make_batch,
    run_forward,
)
from .solve import weight_norm_sq

Delta = LowRankDelta | DenseDelta
# A method's solve of one stage: (layer names, per-task {group: statistics}) -> {layer: merged delta}.
StageSolve = Callable[[list[str], list[dict[str, GroupStats]]], dict[str, Delta]]


def _sync(devices: list[torch.device]) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


class Calibration:
    def __init__(
        self,
        model,
        layers: dict,
        injector: DeltaInjector,
        task_samples: list[list[TokenSample]] | list[list[CallSample]],
        task_names: list[str],
        pad_id: int,
        batch_size: int,
        stats_dtype: torch.dtype,
        progress: bool,
        own_overrides: list[dict],
        merged_overrides: list[dict],
        walk: str = "auto",
        offload_states: bool = False,
        overlap: str = "auto",
        offload_stats: bool = False,
        ranks=None,
        split: str = "auto",
        sharded: bool = False,
    ):
        self.ranks = ranks  # distributed.Ranks when several processes share the merge
        # which ranks capture each adapter (one: whole; several: a share each; None: all, summed by reduce)
        self.holders: list[tuple[int, ...] | None] | None = None
        probe_sample = task_samples[0][:1]
        if ranks is not None:
            self.holders = ranks.holders([_size(s) for s in task_samples], split)
            task_samples = [ranks.shard(s, f"adapter '{n}'", among=h) for s, n, h in zip(task_samples, task_names,
                                                                                      self.holders)]
        self.model = model
        self.layers = layers
        self.task_samples = task_samples
        self.task_names = task_names
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.device = input_device(model)  # where batches go; a spread model's blocks may sit on other GPUs
        self.gpus = sorted({p.device for p in model.parameters() if p.is_cuda}, key=str)
        self.progress = progress
        self.capture_seconds = 0.0
        self.solve_seconds = 0.0
        self.injector = injector  # holds each adapter's own model as variant "own:<i>"
        self._own_overrides = [self._on_model(o) for o in own_overrides]
        self.merged_overrides = [self._on_model(o) for o in merged_overrides]
        self.offload_states = offload_states
        self.offload_stats = offload_stats
        # overlap: a block's solve runs on a worker thread (and, on a GPU, a side stream) while the next
        # block is captured; "on" forces it on the CPU too (same answer, for tests)
        # (one GPU only: on a spread model each GPU's solves already queue behind its own captures)
        self.overlap = len(self.gpus) <= 1 and (overlap == "on" or (overlap == "auto" and self.device.startswith("cuda")))
        self._remembered: list[list[dict]] | None = None  # [task][batch] -> group -> projected own rows
        # tokens of every task together (main stream): the size of a sample-space solve
        # (unknown for recorded calls, whose layers see different numbers of rows: decided while capturing)
        self._total_tokens = (sum(len(s.input_ids) for samples in task_samples for s in samples)
                              if all(isinstance(s, TokenSample) for t in task_samples for s in t) else None)
        probe = make_batch(probe_sample, pad_id, self.device)
        self.groups = find_groups(model, layers, probe)
        self.group_of = {m: g.name for g in self.groups for m in g.members}
        self._group_by_name = {g.name: g for g in self.groups}
        self.stack = None
        if walk != "model":
            self.stack = find_stack(model, layers, probe)
            if self.stack is None and walk == "blocks":
                raise IterisError(
                    f"{type(model).__name__} does not run its target layers as one plain chain of blocks, so it "
                    "cannot be walked block by block; set calibration.walk: auto (or model)"
                )
        self.collector = StatsCollector(model, layers, self.groups, self.injector, stats_dtype)
        self.collector.ranks = ranks
        # blocks sharded over the processes (sharding.py): gathered per visit of the walk, which must walk them
        self.sharded = sharded
        self._weight_norms: dict[str, list[float]] | None = None
        if sharded:
            if self.stack is None:
                raise IterisError(f"{type(model).__name__} cannot be walked block by block, and a model sharded over "
                                  "processes is only run that way; set calibration.shard: off")
            for block in sharding.fsdp_units(model):  # a probe that stopped inside a block left it gathered
                sharding.release(block)

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

    def in_features(self, group: str) -> int:
        return self._group_by_name[group].in_features

    def base_weight(self, name: str) -> torch.Tensor:
        if self.sharded:
            raise IterisError("a model sharded over processes has no whole base weight in any one of them; "
                              "with_pretrain_matrix needs one: set calibration.shard: off")
        return base_weight(self.layers[name]).detach()

    def adapted_weight_norms(self, name: str, loras: list) -> list[float]:
        """||W0 + dW_i||_F^2 for each adapter's LoRA on a layer (None: ||W0||^2)."""
        if self._weight_norms is not None:
            return self._weight_norms[name]
        base = self.base_weight(name)
        base = base.to(torch.promote_types(base.dtype, torch.float32))  # once per layer, not once per adapter
        base_sq = weight_norm_sq(base, None)
        return [weight_norm_sq(base, lora, base_sq) for lora in loras]

    def set_merged(self, deltas: dict[str, Delta]) -> None:
        self.injector.set_variant("merged", deltas)

    def _projections(self, adapter: LoraAdapter) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, lora in adapter.modules.items():
            out.setdefault(self.group_of[name], {})[name] = lora.A
        return out

    def sweep(
        self,
        solve: StageSolve,
        adapters: list[LoraAdapter],
        *,
        paired: bool,
        projections: bool = True,
        gamma: float = 0.0,
        want_cross: bool = False,
        keep_cross: bool = False,
        out_norms: bool = False,
        sequential: bool = False,
        remember: bool = False,
        rows: str | None = None,
        label: str = "",
    ) -> dict[str, Delta]:
        """Every task's statistics for every layer, handed to ``solve`` stage by stage; returns its deltas.

        ``paired``: pair each adapter's own model with the merged model (variant "merged", set with
        ``set_merged``) token by token; otherwise the adapter's own model alone (X~ = X).
        ``sequential``: every layer group is a stage, solved in depth order, and its solution is installed
        in the merged model at once, so later stages see the inputs of the already-merged layers before
        them (DESIGN.md §3.6). Otherwise (the paper's global schedule) the merged model stays as set.
        ``remember`` (own-only sweeps): keep each adapter's inputs projected on its A (tokens x r per layer
        group), so later paired sweeps that need nothing else of them (gamma = 0, no cross term) skip
        running the adapters' own models altogether.
        ``rows``: keep each layer group's inputs instead of their Gram ("auto": where all tasks' tokens
        together are fewer than d_in; "always"), for solves in sample space.
        """
        if sequential and not self.walks_blocks:
            raise IterisError(
                f"the sequential schedule walks the model block by block, and {type(self.model).__name__} does not "
                "run its target layers as one plain chain of blocks; use schedule: global"
            )
        if sequential:
            self.set_merged({})
        if self.sharded and self._weight_norms is None:  # every process at once, while all of them are here
            self._weight_norms = sharding.adapted_weight_norms(
                self.layers, {n: [a.modules.get(n) for a in adapters] for n in self.layers}, self.ranks)
        options = dict(
            paired=paired or sequential, gamma=gamma, want_cross=want_cross, keep_cross=keep_cross, out_norms=out_norms,
            rows=rows if self.ranks is None else None,  # (kept inputs are not summed over processes: Grams then)
            rows_tokens=self._total_tokens,
        )
        proj = [self._projections(a) if projections else {} for a in adapters]
        task_batches = [
            list(batches(samples, self.batch_size, self.pad_id, self.device)) for samples in self.task_samples
        ]
        solve = self._guarded(solve, label)
        try:
            if self.walks_blocks:
                if remember and not options["paired"]:
                    self._remembered = [[{} for _ in task] for task in task_batches]
                recall = (options["paired"] and not sequential and self._remembered is not None and gamma == 0.0
                          and not want_cross and not keep_cross and projections)
                return self._sweep_blocks(solve, task_batches, proj, options, sequential, label, recall)
            return self._sweep_model(solve, task_batches, proj, options, label)
        except finite.NonFiniteStatistics as exc:
            raise IterisError(self._explain(exc, label)) from None

    def _guarded(self, solve: StageSolve, label: str) -> StageSolve:
        """A stage's solve that first checks its statistics and then its result are finite (one host sync
        each): a NaN is stopped in the stage where it appears, not carried into every later layer."""

        def checked(names: list[str], per_task):
            if self.offload_stats and self.gpus:
                # statistics in CPU memory were copied there without waiting: the stream the solve runs on
                # was made to wait for those copies, so once it is idle they are done (later captures are not)
                torch.cuda.current_stream().synchronize()
            finite.check_statistics(per_task, list(dict.fromkeys(self.group_of[n] for n in names)))
            out = solve(names, per_task)
            finite.check_deltas(out, label)
            return out

        return checked

    def _explain(self, exc: finite.NonFiniteStatistics, label: str) -> str:
        task = self.task_names[exc.task]
        found = self._non_finite_sample(exc.task, exc.group)
        what, culprit = "inputs", ""
        advice = ("Check that sample, the base model's weights (an embedding row), or the dtype (activations that "
                  "overflow in float16: use dtype: float32 or bfloat16)")
        factors = "check its lora_A and lora_B (factors of very different sizes overflow even when their product is moderate)"
        if found == ():
            what, culprit = "statistics", ", though every sample's inputs there are finite"
            advice = (f"What overflows are the statistics that involve adapter '{task}''s update (its inputs projected "
                      f"on lora_A, or the layer's outputs with the update): {factors}")
        elif found is not None:
            sample, variant, in_base = found
            model = "its own" if variant.startswith("own") else "the merged"
            culprit = f"; {getattr(sample, 'origin', None) or 'one of its samples'} gives them in {model} model"
            if in_base:
                culprit += " but not in the base model"
                advice = (f"adapter '{task}''s update overflows there: {factors}" if variant.startswith("own")
                          else "the merged update overflows there: raise alpha1/alpha2")
        return (f"{label}: the {what} of layer '{exc.group}' are not finite (NaN or Inf) on adapter '{task}''s "
                f"calibration data{culprit}. {advice}")

    def _non_finite_sample(self, task: int, group: str):
        """Error path only: the first of a task's samples whose input to ``group`` is not finite, run alone
        through the adapter's own model, then the merged one, and whether the base model alone gives it finite
        inputs there; () if every sample's inputs are finite; None where this cannot be run here."""
        if self.ranks is not None or self.sharded:
            return None
        seen: list[bool] = []

        def hook(module, args):
            seen.append(bool(torch.isfinite(args[0]).all()))
            raise StopForward

        def finite_in(variant, overrides, sample) -> bool:
            seen.clear()
            with self.injector.use(variant, overrides):
                try:
                    run_forward(self.model, make_batch([sample], self.pad_id, self.device), merged=variant == "merged")
                except StopForward:
                    pass
            return not seen or seen[0]

        handle = self.layers[group].register_forward_pre_hook(hook)
        try:
            for variant, overrides in ((f"own:{task}", self._own_overrides[task]), ("merged", self.merged_overrides[task])):
                if variant not in self.injector.variants:
                    continue
                for sample in self.task_samples[task]:
                    if not finite_in(variant, overrides, sample):
                        return sample, variant, finite_in(None, {}, sample)
        finally:
            handle.remove()
        return ()

    def _assign(self, stage: list[LayerGroup]) -> None:
        """Several processes: which rank solves (and so receives the statistics of) each group of a stage,
        balanced by the cost of its solves (members x d_in^3)."""
        if self.ranks is not None:
            self.collector.owner = self.ranks.owners({g.name: len(g.members) * g.in_features**3 for g in stage})

    def _mine(self, stage: list[LayerGroup], owners: dict[str, int] | None = None) -> list[str]:
        """The stage's layers this process solves (all of them in a single process); ``owners`` collects
        who solves each layer."""
        if self.ranks is None:
            return [m for g in stage for m in g.members]
        owner = {m: self.collector.owner[g.name] for g in stage for m in g.members}
        if owners is not None:
            owners.update(owner)
        return [m for m in owner if owner[m] == self.ranks.rank]

    def _share(self, solved: dict[str, Delta], owners: dict[str, int]) -> dict[str, Delta]:
        """Several processes: every layer's solution on every process, from the one that solved it."""
        order = [m for g in self.groups for m in g.members if m in owners]
        return self.ranks.share(solved, owners, order, lambda name: self.layers[name].weight.device)

    def _timed_solve(self, solve: StageSolve, stage: list[LayerGroup], per_task,
                     deferred: dict[str, int] | None = None) -> dict[str, Delta]:
        """The stage's solves; with several processes each solves the groups whose statistics it received and
        all get every result, unless ``deferred`` collects who solved what (the sweep shares them at its end)."""
        _sync(self.gpus)
        start = time.perf_counter()
        owners: dict[str, int] = {} if deferred is None else deferred
        mine = self._mine(stage, owners)
        out = solve(mine, per_task) if mine else {}
        if self.ranks is not None and deferred is None:
            out = self._share(out, owners)
        _sync(self.gpus)
        self.solve_seconds += time.perf_counter() - start
        return out

    def _sweep_model(self, solve, task_batches, proj, options, label) -> dict[str, Delta]:
        names = [g.name for g in self.groups]
        per_task = []
        bar = tqdm(total=sum(map(len, task_batches)), desc=f"{label}: capture", disable=not self.progress, leave=False,
                   unit="batch")
        start = time.perf_counter()
        self._assign(self.groups)
        for i, task in enumerate(task_batches):
            self.collector.start(names, proj[i], **options)
            for batch in task:
                with self.injector.use(f"own:{i}", self._own_overrides[i]):
                    self.collector.own_pass(lambda: run_forward(self.model, batch), batch)
                if options["paired"]:
                    with self.injector.use("merged", self.merged_overrides[i]):
                        self.collector.merged_pass(lambda: run_forward(self.model, batch, merged=True), batch)
                bar.update(1)
            per_task.append(self._finished(i))
        self._settle(self._in_flight())
        _sync(self.gpus)
        self.capture_seconds += time.perf_counter() - start
        bar.close()
        return self._timed_solve(solve, self.groups, per_task)

    def _store(self, hidden: torch.Tensor) -> torch.Tensor:
        """A state kept between blocks: in place, or (offload_states) in CPU memory."""
        return _to_host(hidden) if self.offload_states else hidden

    def _finished(self, task: int) -> dict[str, GroupStats]:
        """The collector's statistics for one task; with offload_stats, moved to CPU memory at once, so the
        GPU holds one task's statistics while capturing and one group's while solving."""
        stats = self.collector.finish(self.holders[task] if self.holders else None)
        if self.offload_stats:
            # what other processes send stays where it arrives (its solve reads it next); scalars stay on the
            # device (read on the host only where solved, and a pinned copy would not be waited for)
            received = {id(st) for st in self.collector.received}
            for st in stats.values():
                if id(st) not in received:
                    _map_tensors(st, lambda t: t if t.dim() == 0 else _to_host(t))
        self.collector.received = []
        return stats

    def _in_flight(self) -> list:
        """The stage's statistics still travelling between processes (taken from the collector)."""
        out, self.collector.in_flight = self.collector.in_flight, []
        return out

    def _settle(self, in_flight: list, then: bool = True) -> None:
        """Several processes: the stage's statistics sent between ranks have arrived, for what the current
        stream runs next (and, with ``then``, shares of one adapter's statistics are summed)."""
        if in_flight:
            self.ranks.settle(in_flight, then)

    def onload(self, group: str, st: GroupStats) -> GroupStats:
        """A group's statistics where its layer is (a copy, if they were offloaded): what a solve reads."""
        if not self.offload_stats:
            return st
        device = self.layers[group].weight.device
        return _map_tensors(dataclasses.replace(st, proj=dict(st.proj), own_proj=dict(st.own_proj)),
                            lambda t: t.to(device, non_blocking=True))

    def _sweep_blocks(self, solve, task_batches, proj, options, sequential, label, recall) -> dict[str, Delta]:
        stack, paired = self.stack, options["paired"]
        remember = self._remembered if not paired else None
        start = time.perf_counter()
        own, merged = [], []
        for i, task in enumerate(task_batches):
            if not recall:
                with self.injector.use(f"own:{i}", self._own_overrides[i]):
                    own.append([first_block_call(self.model, stack, b) for b in task])
            if paired:
                with self.injector.use("merged", self.merged_overrides[i]):
                    merged.append([first_block_call(self.model, stack, b, merged=True) for b in task])
        for calls in own + merged:
            for call in calls:
                call.hidden = self._store(call.hidden)
        capture = time.perf_counter() - start

        result: dict[str, Delta] = {}
        by_block: dict[int, list[LayerGroup]] = {}
        for g in self.groups:
            by_block.setdefault(stack.block_of[g.name], []).append(g)
        # each block's hidden state goes to the GPU holding it (spread models' hooks move the other inputs)
        block_device = {id(b): next(b.parameters(), torch.empty(0, device=self.device)).device for b in stack.blocks}
        bar = tqdm(total=len(stack.blocks), desc=f"{label}: blocks", disable=not self.progress, leave=False, unit="block")

        def run(block, call, variant, overrides):
            device = block_device[id(block)]

            def forward():
                with self.injector.use(variant, overrides):
                    return call.run(block, call.hidden.to(device, non_blocking=True))

            return forward

        overlapped = _OverlappedSolves(self.device) if self.overlap and not sequential else None
        # several processes, global schedule: the merged model stays as set for the whole sweep, so the solved
        # layers are shared once, at its end, and the solves need not wait for one another
        deferred = self.ranks is not None and not sequential
        owners: dict[str, int] = {}
        trailing: list = []  # with overlapped solves: the last stage's traffic between processes
        if deferred:  # solvers dealt out over the whole sweep, not stage by stage: blocks' costs differ little,
            self._assign(self.groups)  # their groups' a lot (one down_proj costs as much as all else in a block)
        try:
            for b, block in enumerate(stack.blocks):
                if self.sharded:
                    sharding.gather(block)
                groups = by_block.get(b, [])
                stages = [[g] for g in groups] if sequential else [groups]
                for s, stage in enumerate(stages):
                    last = s == len(stages) - 1
                    stop_at = None if last else stages[s + 1][0].name
                    t0 = time.perf_counter()
                    per_task = []
                    if not deferred:
                        self._assign(stage)
                    for i, task in enumerate(task_batches):
                        self.collector.start([g.name for g in stage], proj[i], stop_at=stop_at, store=self._store,
                                             **options)
                        for j, batch in enumerate(task):
                            if not recall:
                                forward = run(block, own[i][j], f"own:{i}", self._own_overrides[i])
                                out = self.collector.own_pass(forward, batch, remember[i][j] if remember else None)
                                if last:
                                    own[i][j].hidden = self._store(out)
                            if paired:
                                call = merged[i][j]
                                forward = run(block, call, "merged", self.merged_overrides[i])
                                out = self.collector.merged_pass(forward, batch, self._remembered[i][j] if recall else None)
                                if last and not sequential:
                                    call.hidden = self._store(out)
                        per_task.append(self._finished(i))
                    in_flight = self._in_flight()
                    if overlapped is None:
                        self._settle(in_flight)
                        _sync(self.gpus)
                    elif overlapped.cuda:
                        # the main stream waits for the previous stage's traffic only (long done, as a rule):
                        # until then the tensors it sent stay alive, so their memory is not reused under a send
                        # (on CPUs a transfer is waited for once, by the solve's worker)
                        self._settle(trailing, then=False)
                        trailing = [entry for entry in in_flight if not callable(entry)]
                    capture += time.perf_counter() - t0
                    if stage and overlapped is not None:
                        # the solve's stream alone waits for the statistics from the other processes: the
                        # next block's captures start at once, whatever the peers are still doing
                        result.update(overlapped.submit(solve, self._mine(stage, owners), per_task,
                                                        before=lambda pending=in_flight: self._settle(pending)))
                    elif stage:
                        new = self._timed_solve(solve, stage, per_task, owners if deferred else None)
                        result.update(new)
                        if sequential:
                            self.set_merged(result)
                    del per_task
                if sequential:
                    t0 = time.perf_counter()
                    for i in range(len(task_batches)):
                        for call in merged[i]:
                            call.hidden = self._store(run(block, call, "merged", self.merged_overrides[i])())
                    _sync(self.gpus)
                    capture += time.perf_counter() - t0
                if self.sharded:
                    sharding.release(block)
                bar.update(1)
            if overlapped is not None:
                result.update(overlapped.finish())
                self._settle(trailing, then=False)
            if deferred:
                t0 = time.perf_counter()
                result = self._share(result, owners)
                self.solve_seconds += time.perf_counter() - t0
        finally:
            if overlapped is not None:
                overlapped.close()
        bar.close()
        if overlapped is not None:
            # the solves ran under the captures: count as solve time only what the captures waited for (the
            # waits fall outside the capture windows above)
            self.solve_seconds += overlapped.waited
        self.capture_seconds += capture
        return result

    def close(self) -> None:
        self._remembered = None
        self.collector.remove()
        self.injector.remove()


def _size(samples: list) -> int:
    """An adapter's share of the capture work: its tokens (its samples, for recorded calls)."""
    return sum(s.tokens if isinstance(s, TokenSample) else 1 for s in samples)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """t in CPU memory; from a GPU into pinned memory, copied without stalling the GPU queue (pinned blocks
    are reused only once their copies are done)."""
    if not t.is_cuda:
        return t.to("cpu")
    kept = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return kept.copy_(t, non_blocking=True)


def _map_tensors(st: GroupStats, move) -> GroupStats:
    """Replace every tensor a GroupStats holds (fields and dict values) by ``move(tensor)``, in place."""
    for key, value in vars(st).items():
        if isinstance(value, torch.Tensor):
            setattr(st, key, move(value))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, torch.Tensor):
                    value[k] = move(v)
    return st


class _OverlappedSolves:
    """A sweep's stage solves, one at a time on a worker thread and (on a GPU) a side stream, so that a
    block's solve runs while the next block is captured.

    At most one solve is in flight: submitting the next waits for it (that wait, the only solve time the
    captures see, is ``waited``). Host syncs inside a solve (its factorisation checks) block only the
    worker. The statistics are marked as used on the side stream, so their memory is not reused before
    the solve has read them; the deltas, as used on the main stream afterwards."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.main = torch.cuda.current_stream(device) if self.cuda else None
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iteris-solve")
        self.pending: Future | None = None
        self.waited = 0.0

    def submit(self, solve: StageSolve, names: list[str], per_task, before=None) -> dict[str, Delta]:
        """Start this stage's solve, after ``before()`` (run on the worker, on its stream); returns the previous
        stage's deltas (empty for the first)."""
        done = self._collect()
        if self.cuda:
            self.side.wait_stream(self.main)  # the statistics are complete when the solve starts
            for stats in per_task:
                for st in stats.values():
                    _map_tensors(st, self._used_on_side)
        self.pending = self.pool.submit(self._run, solve, names, per_task, before)
        return done

    def _used_on_side(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.side.device:
            t.record_stream(self.side)
        return t

    @torch.no_grad()  # grad mode is per thread
    def _run(self, solve, names, per_task, before) -> dict[str, Delta]:
        if not self.cuda:
            if before is not None:
                before()
            return solve(names, per_task)
        with torch.cuda.stream(self.side):
            if before is not None:
                before()
            out = solve(names, per_task)
        for delta in out.values():
            for t in vars(delta).values():
                if isinstance(t, torch.Tensor) and t.device == self.main.device:
                    t.record_stream(self.main)
        return out

    def _collect(self) -> dict[str, Delta]:
        if self.pending is None:
            return {}
        start = time.perf_counter()
        out = self.pending.result()
        self.pending = None
        if self.cuda:
            self.main.wait_stream(self.side)
        self.waited += time.perf_counter() - start
        return out

    def finish(self) -> dict[str, Delta]:
        return self._collect()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

