"""Forward hooks that reduce what each target layer receives to statistics, one task at a time.

Each batch runs the adapter's own model and, for a paired capture, the merged model on the same tokens;
the hooks pair their inputs row by row and accumulate ``GroupStats`` (``stats.py`` does the arithmetic).
Only one batch of features is alive at a time, so memory does not grow with the number of samples.
Layers that read the same tensor (q/k/v, gate/up, ...) form one group and share one Gram.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IterisError
from ..precision import HALF, split_mm, split_rows, split_tmm, splits_bf16
from .cache import in_place
from .forward import Batch, StopForward
from .layers import LayerGroup, channels_last, token_rows
from .spec import CaptureSpec
from .stats import GroupStats, add_gram, add_product, cross_norm, mirror_gram


class StatsCollector:
    """Accumulates ``GroupStats`` for one task at a time through forward hooks.

    ``start`` says which groups to gather and what to gather (a ``CaptureSpec``); each batch then runs the
    adapter's own model (``own_pass``) and, for a paired capture, the merged model on the same tokens
    (``merged_pass``); ``finish`` returns the task's statistics. A run may stop early at a named group:
    its forward pass ends there, since nothing after it is wanted. Several processes: ``exchange``
    (``exchange.StatsExchange``) moves each finished task's statistics to the rank that solves them.
    """

    def __init__(self, layers: dict[str, nn.Module], groups: list[LayerGroup], stats_dtype: torch.dtype = torch.float32):
        self.layers = layers
        self.groups = groups
        self.stats_dtype = stats_dtype
        self.group_of = {m: g.name for g in groups for m in g.members}
        self.group_by_name = {g.name: g for g in groups}
        self.spec = CaptureSpec()
        self._paired = self._cross = False
        self._row_mode: str | None = None
        self.active: set[str] = set()
        # group -> (members, their ranks, their A stacked, A's exact bf16 parts or None)
        self.projections: dict[str, tuple[list[str], list[int], torch.Tensor, tuple | None]] = {}
        self.out_sq: dict[str, torch.Tensor] = {}  # member -> ||X W^T||^2 (0-dim float64)
        self.parts: dict[str, dict[str, list[torch.Tensor]]] = {}  # group -> kept rows, batch by batch
        self.exchange = None  # exchange.StatsExchange with several processes
        self._batch: Batch | None = None  # the batch running now: which rows are real tokens
        self._mode: str | None = None  # "single" (own rows alone), "stash" (own rows, kept) or "paired"
        self._stop_at: str | None = None
        self._stash: dict[str, list[torch.Tensor]] = {}
        self._stats: dict[str, GroupStats] = {}
        self._rows_tokens: int | None = None
        self._remember: dict[str, list[torch.Tensor]] | None = None
        self._recall: dict[str, list[torch.Tensor]] | None = None
        self._recall_pos: dict[str, int] = {}
        self._store = in_place
        # Registered after the injector's hooks, so output hooks see the adapter's update already added.
        self._handles = [layers[g.name].register_forward_pre_hook(self._input_hook(g)) for g in groups]
        self._handles += [m.register_forward_hook(self._output_hook(name)) for name, m in layers.items()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def device_of(self, group: str) -> torch.device:
        return self.layers[group].weight.device

    def _input_hook(self, group: LayerGroup):
        def pre_hook(module, args):
            if self._mode is None:
                return
            if group.name == self._stop_at:
                raise StopForward
            if group.name not in self.active:
                return
            rows = token_rows(channels_last(module, args[0]), self._batch, group.name)
            if self._mode == "stash":
                self._stash.setdefault(group.name, []).append(rows)
            elif self._mode == "single" or self._recall is not None:
                # own rows alone, or merged rows whose own counterparts were remembered projected on A
                self._accumulate(group, rows, rows)
            else:  # "paired": rows are the merged model's, the stash holds the adapter's own
                self._accumulate(group, *self._paired_rows(group, rows))

        return pre_hook

    def _paired_rows(self, group: LayerGroup, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the adapter's own rows, Xh) for the merged model's ``rows`` of one call of the group's layers."""
        stash = self._stash.get(group.name)
        if not stash:
            raise IterisError(f"layer '{group.name}' ran more often in the merged model than in the adapter's")
        own = stash.pop(0)  # a layer may run several times per pass
        if own.shape != rows.shape:
            raise IterisError(f"layer '{group.name}' saw a different number of tokens in the two models")
        gamma = self.spec.gamma
        if gamma != 0.0:
            rows = (1.0 - gamma) * rows.to(self.stats_dtype) + gamma * own.to(self.stats_dtype)
        return own, rows

    def _output_hook(self, name: str):
        group = self.group_of[name]

        def hook(module, args, output):
            if not self.spec.out_norms or self._mode not in ("single", "stash") or group not in self.active:
                return None
            rows = token_rows(channels_last(module, output), self._batch, name)
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
            bias = getattr(module, "bias", None)
            if bias is not None:  # the weight's share of the output: ||X W^T||, as the adaptive weight is defined
                rows = rows - bias.to(rows.dtype)
            term = rows.square().sum(dtype=torch.float64)
            acc = self.out_sq.get(name)
            self.out_sq[name] = term if acc is None else acc.add_(term)
            return None

        return hook

    def _accumulate(self, group: LayerGroup, own: torch.Tensor, mixed: torch.Tensor) -> None:
        st, parts = self._target(group, mixed.shape[0])
        if parts is None:
            add_gram(st.gram, mixed)
        else:
            # half-precision rows stay so (exact; a later Gram of them takes the half-precision GEMM path)
            parts["mixed"].append(self._keep(mixed))
            if self._cross:
                parts["own"].append(self._keep(own))
        st.tokens += mixed.shape[0]
        projection = self.projections.get(group.name)
        if not self._paired:
            # cross terms are the Gram itself; projections are taken from it at the end
            if self._remember is not None and projection is not None:
                self._remember.setdefault(group.name, []).append(self._store(self._project(projection, own)))
            return
        if st.cross is not None:
            add_product(st.cross, own, mixed)
        if projection is not None:
            self._add_projected(group, st, parts, projection, own, mixed)

    def _target(self, group: LayerGroup, new_rows: int) -> tuple[GroupStats, dict | None]:
        """The group's statistics, and its kept rows while rows are kept rather than a Gram."""
        st = self._stats.get(group.name)
        mode = self._row_mode
        if st is None:
            st = self.blank()
            self._stats[group.name] = st
            expected = self._rows_tokens
            if mode == "always" or (mode == "auto" and (expected is None or expected < group.in_features)):
                self.parts[group.name] = {"mixed": [], "own": [], "proj": []}
            else:
                self._allocate(group, st)
        parts = self.parts.get(group.name)
        if parts is not None and mode == "auto" and st.tokens + new_rows >= group.in_features:
            # as many tokens as features: the Gram is now the smaller statistic
            self._allocate(group, st)
            if parts["mixed"]:
                add_gram(st.gram, torch.cat(parts["mixed"]))
                if st.cross is not None:
                    add_product(st.cross, torch.cat(parts["own"]), torch.cat(parts["mixed"]))
            del self.parts[group.name]
            parts = None
        return st, parts

    def _add_projected(self, group, st: GroupStats, parts, projection, own: torch.Tensor, mixed: torch.Tensor) -> None:
        """A X^T Xh, accumulated (the adapter's A stacked over the group's members)."""
        if self._recall is None:
            projected = self._project(projection, own)
        else:  # the k-th call of this layer in the pass pairs with the k-th remembered one
            k = self._recall_pos.get(group.name, 0)
            self._recall_pos[group.name] = k + 1
            projected = self._recall[group.name][k].to(own.device, non_blocking=True)
        if parts is not None:
            parts["proj"].append(projected)
        if projected.dtype == torch.float32 and splits_bf16(mixed):
            term = split_tmm(projected, mixed)
        else:
            term = projected.T @ mixed.to(projected.dtype)
        acc = st.proj.get("")
        st.proj[""] = term if acc is None else acc.add_(term)

    def _keep(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.clone() if rows.dtype in HALF or rows.dtype == self.stats_dtype else rows.to(self.stats_dtype)

    def _allocate(self, group: LayerGroup, st: GroupStats) -> None:
        d = group.in_features
        device = self.device_of(group.name)
        st.gram = torch.zeros(d, d, dtype=self.stats_dtype, device=device)
        if self.spec.accumulates_cross:
            st.cross = torch.zeros(d, d, dtype=self.stats_dtype, device=device)

    @staticmethod
    def _project(projection: tuple, rows: torch.Tensor) -> torch.Tensor:
        """rows A^T (tokens x sum r) in the statistics' dtype; bf16 rows on a GPU against A's exact bf16
        parts, rather than through a float32 copy of the rows."""
        A, A_split = projection[2], projection[3]
        if A_split is not None and splits_bf16(rows):
            return split_mm(rows, A_split)
        return rows.to(A.dtype) @ A.T

    def blank(self) -> GroupStats:
        """Empty statistics of the current task (filled by its batches, or by what other processes send)."""
        return GroupStats(gram=None, cross=None, same_inputs=not self.spec.paired)

    def start(self, groups: list[str], projections: dict[str, dict[str, torch.Tensor]], spec: CaptureSpec,
              stop_at: str | None = None, store=None, rows_tokens: int | None = None) -> None:
        """Begin one task's statistics for ``groups``.

        ``projections``: group -> member -> A (r x d_in) whose projected cross terms are wanted.
        ``stop_at``: a group whose input ends every pass (nothing beyond it is needed).
        ``store``: where remembered projections are kept (a function placing a tensor: GPU or CPU).
        ``rows_tokens``: the tokens of all tasks together where known: rows "auto" keeps rows only while
        that many stay below d_in.
        """
        self.spec = spec
        # (read by the hooks on every call: plain attributes)
        self._paired, self._cross, self._row_mode = spec.paired, spec.accumulates_cross, spec.row_mode
        self._store = store or in_place
        self._stats = {}
        self.out_sq = {}
        self.active = set(groups)
        self._stop_at = stop_at
        self._rows_tokens = rows_tokens
        self.parts = {}
        self.projections = {}
        for g, members in projections.items():
            if g not in self.active or not members:
                continue
            device = self.device_of(g)
            names = list(members)
            A = torch.cat([members[m].to(device=device, dtype=self.stats_dtype) for m in names])
            A_split = split_rows(A) if A.dtype == torch.float32 and splits_bf16(self.layers[g].weight) else None
            self.projections[g] = (names, [members[m].shape[0] for m in names], A, A_split)

    def _run(self, mode: str, forward) -> object:
        self._mode = mode
        try:
            return forward()
        except StopForward:
            return None
        finally:
            self._mode = None

    def own_pass(self, forward, batch: Batch, remember: dict[str, list[torch.Tensor]] | None = None):
        """The adapter's own model on one batch (``forward`` runs it, its variant already active).

        ``remember`` (own-only runs): filled with each group's rows projected on the adapter's A, all a
        later paired run needs of this model when gamma = 0 and no cross term is wanted."""
        self._batch = batch
        self._remember = remember
        try:
            return self._run("stash" if self.spec.paired else "single", forward)
        finally:
            self._remember = None

    def merged_pass(self, forward, batch: Batch, recall: dict[str, list[torch.Tensor]] | None = None):
        """The merged model on the batch the last ``own_pass`` ran on, or, given ``recall`` (what
        ``own_pass(remember=...)`` kept of this batch: the adapter's own rows projected on A), alone."""
        self._batch = batch
        self._recall, self._recall_pos = recall, {}
        try:
            return self._run("paired", forward)
        finally:
            self._stash.clear()
            self._recall = None

    def finish(self, holders: tuple[int, ...] | None = None) -> dict[str, GroupStats]:
        """The task's statistics. Several processes: those of the groups this rank solves, complete (see
        ``StatsExchange``; ``holders``: the ranks that captured this task, None: every rank a share)."""
        stats, self._stats = self._stats, {}
        self._stash.clear()
        self._batch = None
        exchange = self.exchange
        shares = exchange is not None and holders is not None and len(holders) > 1
        if exchange is not None and holders is None:
            exchange.sum_over_ranks(stats)
        for group_name, st in stats.items():
            own_rows = self._complete(group_name, st)
            if shares:
                continue  # the cross term's norm is taken of the sum of the shares, where it is solved
            if self.spec.wants_cross_norm:
                st.cross_norm = cross_norm(st, own_rows)  # stays on the device
            if not self.spec.keeps_cross:
                st.cross = None  # only its norm was needed: free d_in^2 per group now
        for name, value in self.out_sq.items():
            stats[self.group_of[name]].out_sq[name] = float(value)
        if shares:
            exchange.sum_shares_where_solved(stats, holders)
        elif exchange is not None and holders is not None:
            exchange.pass_to_owners(stats, holders[0])
        self.projections = {}
        self.out_sq = {}
        self._store = in_place
        return stats

    def _complete(self, group_name: str, st: GroupStats) -> torch.Tensor | None:
        """The Gram mirrored (or the kept rows joined) and the projections split per member; returns the
        adapter's own kept rows, if any (for the cross term's norm)."""
        parts = self.parts.pop(group_name, None)
        own_rows = own_proj = None
        if parts is None:
            mirror_gram(st.gram)
        else:
            st.rows = torch.cat(parts["mixed"]).to(self.stats_dtype)
            own_rows = torch.cat(parts["own"]).to(self.stats_dtype) if parts["own"] else None
            own_proj = torch.cat(parts["proj"]) if parts["proj"] else None
        if group_name in self.projections:
            members, ranks, A, _ = self.projections[group_name]
            if st.same_inputs and st.rows is not None:
                own_proj = st.rows @ A.T
                whole = own_proj.T @ st.rows
            else:
                whole = A @ st.gram if st.same_inputs else st.proj.pop("")
            st.proj = dict(zip(members, whole.split(ranks)))
            if st.rows is not None:
                st.own_proj = dict(zip(members, own_proj.split(ranks, dim=1)))
        return own_rows
