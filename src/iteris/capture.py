"""Run models and gather the statistics of what their layers receive, batch by batch.

Two kinds of forward hooks sit on the target layers:

* ``DeltaInjector`` adds a weight update to a layer's output, so one loaded base model can act as the
  model of adapter i (``W0 + dW_i`` everywhere) or as the current merged model, without touching W0.
* ``StatsCollector`` reduces each layer's inputs to statistics: the Gram of the inputs the merged model
  sees, and their cross terms with the inputs the adapter's own model sees on the same tokens. Only one
  batch of features is alive at a time, so memory does not grow with the number of samples.

Layers that read the same tensor (q/k/v, gate/up, ...) form one group and share one Gram.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import LoraModule
from .deltas import DenseDelta, LowRankDelta
from .errors import IterisError
from .models import Batch, StopForward, channels_last, is_pointwise_conv, run_forward
from .precision import (
    HALF, half_addmm_, split_left_factor, split_mm, split_right_factor, split_rows, split_tmm, splits_bf16,
)


@contextlib.contextmanager
def _tf32_if_half(x: torch.Tensor):
    """TF32 for the update of a bf16/fp16 layer: its input is exact in TF32 and its output is rounded to
    half precision anyway, so the float32 GEMMs need not run at a tenth of the tensor-core rate."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class DeltaInjector:
    """Makes the loaded base model behave as a chosen variant (an adapter, or the merged model)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model = model
        self.layers = layers
        self.variants: dict[str, dict[str, tuple]] = {}
        self._active: dict[str, tuple] = {}
        self._handles = [m.register_forward_hook(self._hook(name, is_pointwise_conv(m))) for name, m in layers.items()]

    def _hook(self, name: str, conv: bool):
        def hook(module, args, output):
            update = self._active.get(name)
            if update is None:
                return None
            x = args[0]
            kind, first, second, scale = update
            if conv:  # a 1x1 convolution: the update acts on each pixel's channels
                x = x.movedim(1, -1)
                if kind == "split":
                    kind, first, second, scale = scale
            if kind == "split":
                if x.dtype == output.dtype == torch.bfloat16 and output.is_contiguous():
                    # (x A^T) B^T added into the bf16 output by the GEMM itself: one rounding, as PEFT's
                    # float32 branch has, and no float32 copy of x or of the update
                    xa = split_mm(x.reshape(-1, x.shape[-1]), first)
                    output.view(-1, output.shape[-1]).addmm_(split_left_factor(xa), second.T)
                    return output
                kind, first, second, scale = scale  # the plain update, for inputs the split one does not fit
            with _tf32_if_half(x):
                h = x.to(first.dtype)
                if kind == "lowrank":
                    h = (h @ first.T) @ second.T
                else:
                    h = h @ first.T
            if scale != 1.0:
                h = h * scale
            return output.add_(h.movedim(-1, 1) if conv else h)  # computed in float32, rounded once to the layer's dtype

        return hook

    def set_variant(self, key: str, updates: dict[str, LoraModule | LowRankDelta | DenseDelta]) -> None:
        """Register a variant's updates; tensors move to each layer's device once, here."""
        prepared = {}
        for name, update in updates.items():
            weight = self.layers[name].weight
            # Updates run in float32 at least (as PEFT runs LoRA branches), float64 for a float64 model.
            to = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
            if isinstance(update, (LoraModule, LowRankDelta)):
                A, B = update.A.to(**to), update.B.to(**to)
                scale = update.scale if isinstance(update, LoraModule) else 1.0
                prepared[name] = ("lowrank", A, B, scale)
                if splits_bf16(weight):
                    # A and s*B as exact bf16 parts: float32 products on bf16 tensor cores
                    prepared[name] = ("split", split_rows(A), split_right_factor(B * scale), prepared[name])
            else:
                prepared[name] = ("dense", update.D.to(**to), None, 1.0)
        self.variants[key] = prepared

    @contextlib.contextmanager
    def use(self, key: str | None, overrides: dict[str, torch.Tensor] | None = None):
        """Activate a variant (None: the plain base model), with whole parameters replaced by
        ``overrides`` (PEFT modules_to_save copies), for the duration of the block."""
        self._active = self.variants[key] if key is not None else {}
        originals = self._swap_in(overrides or {})
        try:
            yield
        finally:
            self._active = {}
            self._restore(originals)

    def _swap_in(self, overrides: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        """Replace the Parameter objects themselves, never their storage: a tied partner (an embedding
        sharing lm_head's weight) must keep its own values, as it does in PEFT."""
        originals = {}
        for path, value in overrides.items():
            module_path, _, attr = path.rpartition(".")
            module = self.model.get_submodule(module_path)
            current = getattr(module, attr)
            originals[path] = current
            setattr(module, attr, nn.Parameter(value.to(device=current.device, dtype=current.dtype), requires_grad=False))
        return originals

    def _restore(self, originals: dict[str, nn.Parameter]) -> None:
        for path, param in originals.items():
            module_path, _, attr = path.rpartition(".")
            setattr(self.model.get_submodule(module_path), attr, param)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class LayerGroup:
    """Target layers that read one and the same input tensor."""

    name: str
    members: list[str]
    in_features: int


def token_rows(
    x: torch.Tensor, masks: dict[int, torch.Tensor], where: str, full: frozenset[int] = frozenset(),
    unmasked_rows: bool = False,
) -> torch.Tensor:
    """The rows of a layer input that are real tokens, padding dropped.

    (batch, tokens, d): the mask whose length matches. (batch * tokens, d), as some layers receive a
    flattened batch: the flattened mask. (batch, d), a pooled input: every row. Anything else (tokens
    routed to experts, say) cannot be paired token by token between two models, so it is refused.
    ``unmasked_rows`` (image patches, recorded pipeline calls): an input no mask fits is all real rows.
    """
    if x.ndim == 3:
        mask = masks.get(x.shape[1])
        if mask is not None and mask.shape[0] == x.shape[0]:
            # (a model spread over GPUs: the batch's masks sit on the first one)
            return x.reshape(-1, x.shape[-1]) if x.shape[1] in full else x[mask.to(x.device)]
    elif x.ndim == 2:
        for length, mask in masks.items():
            if x.shape[0] == mask.numel():
                return x if length in full else x[mask.to(x.device).reshape(-1)]
        if any(x.shape[0] == mask.shape[0] for mask in masks.values()):
            return x
    if unmasked_rows and x.ndim >= 2:
        return x.reshape(-1, x.shape[-1])
    raise IterisError(
        f"layer '{where}' receives an input of shape {tuple(x.shape)}, which is neither (batch, tokens, features) "
        "nor a flattened or pooled batch; its tokens cannot be told apart from padding or paired between "
        "models (is it a routed expert?). Leave it out of the merge, or use a data-free method"
    )


def find_groups(model: nn.Module, layers: dict[str, nn.Module], probe: Batch) -> list[LayerGroup]:
    """Group layers that read the very same tensors, call by call, on one probe forward pass."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    first_call: dict[str, int] = {}
    handles = []

    def make(name):
        def pre_hook(module, args):
            seen[name].append(args[0])  # holding the references keeps ids unique for the whole pass
            first_call.setdefault(name, len(first_call))

        return pre_hook

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(make(name)))
    try:
        run_forward(model, probe)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if not seen[n]]
    if missing:
        raise IterisError(
            f"target layers {missing[:3]} never ran on the calibration inputs; they cannot be merged "
            "from data (merge them with a data-free method, or drop them from the adapters)"
        )
    by_inputs: dict[tuple[int, ...], LayerGroup] = {}
    groups: list[LayerGroup] = []
    for name in layers:
        for x in seen[name]:
            # refuse unpairable inputs now
            token_rows(channels_last(layers[name], x), probe.masks, name, unmasked_rows=probe.unmasked_rows)
        key = tuple(id(x) for x in seen[name])
        group = by_inputs.get(key)
        if group is None:
            group = LayerGroup(name=name, members=[], in_features=channels_last(layers[name], seen[name][0]).shape[-1])
            by_inputs[key] = group
            groups.append(group)
        group.members.append(name)
    # In the order the forward pass reaches them: the sequential schedule solves them in this order.
    return sorted(groups, key=lambda g: min(first_call[m] for m in g.members))


@dataclass
class GroupStats:
    """One task's statistics for one layer group (float32/float64, on the layer's device).

    gram:   Xh^T Xh, Xh = (1 - gamma) X~ + gamma X (X~: merged model's inputs, X: the adapter's own).
    cross:  X^T Xh, kept only when asked for (its Frobenius norm, or W0 X^T Xh, is needed).
    proj:   A_m X^T Xh for each member m given a projection.
    out_sq: ||X W_m^T||_F^2 per member, W_m the layer's weight in the adapter's own model (what the
            layer outputs there), when asked for: the denominator of the adaptive weight.
    rows, own_proj: where rows were asked for and the tasks' tokens together are fewer than d_in, Xh itself
            (tokens x d_in, then ``gram`` is None) and X A_m^T per member (tokens x r_m): a solve in
            sample space (DESIGN.md §3.4) needs them; ``full_gram()`` still gives the Gram.
    """

    gram: torch.Tensor | None
    cross: torch.Tensor | None
    proj: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int | torch.Tensor = 0  # (a 0-dim tensor where summed over or sent between processes)
    same_inputs: bool = False  # X~ == X (no merged model yet): cross == gram
    cross_norm: torch.Tensor | None = None  # ||X^T Xh||_F (0-dim float64), when the cross term was gathered
    out_sq: dict[str, float] = field(default_factory=dict)
    rows: torch.Tensor | None = None
    own_proj: dict[str, torch.Tensor] = field(default_factory=dict)
    # as received from another process: the Gram's upper block triangle, packed (``pack_gram``), d_in
    packed: torch.Tensor | None = None
    packed_dim: int = 0

    def full_gram(self) -> torch.Tensor:
        if self.gram is None and self.packed is not None:
            self.gram = unpack_gram(self.packed, self.packed_dim)
            self.packed = None
        elif self.gram is None:
            self.gram = self.rows.T @ self.rows
        return self.gram

    @property
    def cross_or_gram(self) -> torch.Tensor | None:
        return self.full_gram() if self.same_inputs else self.cross


def add_product(acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """acc += left^T right, without losing what half-precision features hold.

    bf16/fp16 features from a half-precision model multiply at the half-precision GEMM rate straight into
    the float32 accumulator (cuBLAS accumulates in float32): exactly the float32 product of those features,
    at twice the TF32 rate. Anything else is cast to the accumulator's dtype first.
    """
    if acc.dtype == torch.float32 and left.dtype in HALF and right.dtype == left.dtype:
        half_addmm_(acc, left.T, right)
    else:
        acc.addmm_(left.T.to(acc.dtype), right.to(acc.dtype))


def _gram_blocks(d: int) -> list[slice]:
    """Column blocks of a Gram: only blocks on and above the diagonal are computed (k(k+1)/2 of k^2)."""
    k = 1 if d <= 2048 else 2 if d <= 8192 else 4
    edges = [round(i * d / k) for i in range(k + 1)]
    return [slice(edges[i], edges[i + 1]) for i in range(k)]


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x, upper block triangle only (``mirror_gram`` completes it): a Gram is symmetric, so
    computing the lower blocks would spend up to half the GEMM work on copies."""
    blocks = _gram_blocks(acc.shape[0])
    if len(blocks) == 1:
        add_product(acc, x, x)
        return
    for i, a in enumerate(blocks):
        for b in blocks[i:]:
            add_product(acc[a, b], x[:, a], x[:, b])


def upper_blocks(acc: torch.Tensor) -> list[torch.Tensor]:
    """The blocks ``add_gram`` computes (on and above the diagonal): all a Gram's information."""
    blocks = _gram_blocks(acc.shape[0])
    return [acc[a, b] for i, a in enumerate(blocks) for b in blocks[i:]]


def packed_size(d: int) -> int:
    return sum(b.numel() for b in upper_blocks(torch.empty(d, d, device="meta")))


def pack_gram(acc: torch.Tensor) -> torch.Tensor:
    """A Gram's upper blocks in one flat tensor: what travels between processes (5/8 of it for d_in > 8192;
    for d_in <= 2048, one block: the Gram itself, not a copy)."""
    blocks = upper_blocks(acc)
    if len(blocks) == 1:
        return acc.view(-1)
    packed = torch.empty(packed_size(acc.shape[0]), dtype=acc.dtype, device=acc.device)
    offset = 0
    for block in blocks:
        packed[offset : offset + block.numel()].view(block.shape).copy_(block)
        offset += block.numel()
    return packed


def unpack_gram(packed: torch.Tensor, d: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """The Gram from ``pack_gram``'s output, mirrored (``into``: its upper blocks overwritten, not mirrored)."""
    if into is None and len(_gram_blocks(d)) == 1:
        return packed.view(d, d)
    acc = torch.empty(d, d, dtype=packed.dtype, device=packed.device) if into is None else into
    offset = 0
    for block in upper_blocks(acc):
        block.copy_(packed[offset : offset + block.numel()].view(block.shape))
        offset += block.numel()
    if into is None:
        mirror_gram(acc)
    return acc


def mirror_gram(acc: torch.Tensor) -> None:
    blocks = _gram_blocks(acc.shape[0])
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            acc[b, a].copy_(acc[a, b].T)


def _add_shares(target: GroupStats, mine: GroupStats | None, parts: list, members: list[str], cross: bool,
                want_norm: bool, keep_cross: bool, out_norms: bool) -> None:
    """One task's statistics of a group from its shares (this rank's, if it captured one, and those received,
    each with its scalars tensor: tokens, then output norms), summed into ``target`` (``mine`` or a blank)."""
    for part, scalars in parts:  # received on the main stream, read here (maybe on a solve's side stream)
        for t in [part.packed, part.cross, scalars, *part.proj.values()]:
            if t is not None and t.is_cuda:
                t.record_stream(torch.cuda.current_stream(t.device))
    gram = mine.full_gram() if mine is not None else None
    for part, _ in parts:
        whole = unpack_gram(part.packed, part.packed_dim)
        gram = whole if gram is None else gram.add_(whole)
        part.packed = None  # one share's Gram at a time
    target.gram, target.packed = gram, None
    proj = dict(mine.proj) if mine is not None else {}
    for part, _ in parts:
        for m, t in part.proj.items():
            proj[m] = t if m not in proj else proj[m] + t
    target.proj = proj
    total = mine.cross if mine is not None else None
    for part, _ in parts:
        if part.cross is not None:
            total = part.cross if total is None else total.add_(part.cross)
    tokens = mine.tokens if mine is not None else 0
    out_sq = dict(mine.out_sq) if mine is not None else {}
    for _, scalars in parts:
        tokens = tokens + scalars[0]
        if out_norms:
            for m, value in zip(members, scalars[1:]):
                out_sq[m] = out_sq.get(m, 0.0) + value
    target.tokens, target.out_sq = tokens, out_sq
    target.cross = total if cross else None
    if want_norm:
        target.cross_norm = StatsCollector._cross_norm(target, None)  # (unpaired: of the Gram)
    if not keep_cross:
        target.cross = None


class StatsCollector:
    """Accumulates ``GroupStats`` for one task at a time through forward hooks.

    ``start`` says which groups to gather and what to gather; each batch then runs the adapter's own model
    (``own_pass``) and, unless the merged model is the adapter's own, the merged model on the same tokens
    (``merged_pass``); ``finish`` returns the task's statistics. A run may stop early at a named group:
    its forward pass ends there, since nothing after it is wanted.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        groups: list[LayerGroup],
        injector: DeltaInjector,
        stats_dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.layers = layers
        self.groups = groups
        self.injector = injector
        self.stats_dtype = stats_dtype
        self._masks: dict[int, torch.Tensor] = {}
        self._full: frozenset[int] = frozenset()
        self._unmasked_rows = False
        self._mode: str | None = None
        self._active: set[str] = set()
        self._stop_at: str | None = None
        self._stash: dict[str, list[torch.Tensor]] = {}
        self._stats: dict[str, GroupStats] = {}
        self._projections: dict[str, tuple[list[str], torch.Tensor]] = {}
        self._gamma = 0.0
        self._want_cross = self._keep_cross = self._paired = self._out_norms = False
        self._out_sq: dict[str, torch.Tensor] = {}
        self._rows_mode: str | None = None  # None, "auto" (rows while tokens < d_in) or "always"
        self._parts: dict[str, dict[str, list[torch.Tensor]]] = {}  # group -> kept rows, batch by batch
        self._rows_tokens: int | None = None
        self._remember: dict[str, list[torch.Tensor]] | None = None
        self._recall: dict[str, list[torch.Tensor]] | None = None
        self._recall_pos: dict[str, int] = {}
        self._store = lambda t: t
        self._group_of = {m: g.name for g in groups for m in g.members}
        self._group_by_name = {g.name: g for g in groups}
        # several processes (distributed.Ranks): each rank's raw statistics are summed into the rank that solves
        # their group, ``owner`` (group -> rank) being set for the groups gathered; the other ranks drop them
        self.ranks = None
        self.owner: dict[str, int] = {}
        self.in_flight: list = []  # statistics sent or being received: Ranks.settle before they are used
        self.received: list[GroupStats] = []  # statistics that arrive (or are summed) only once settled
        # Registered after the injector's hooks, so output hooks see the adapter's update already added.
        self._handles = [layers[g.name].register_forward_pre_hook(self._input_hook(g)) for g in groups]
        self._handles += [m.register_forward_hook(self._output_hook(name)) for name, m in layers.items()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _input_hook(self, group: LayerGroup):
        def pre_hook(module, args):
            if self._mode is None:
                return
            if group.name == self._stop_at:
                raise StopForward
            if group.name not in self._active:
                return
            rows = token_rows(channels_last(module, args[0]), self._masks, group.name, self._full, self._unmasked_rows)
            if self._mode == "stash":
                self._stash.setdefault(group.name, []).append(rows)
            elif self._mode == "single" or self._recall is not None:
                # own rows alone, or merged rows whose own counterparts were remembered projected on A
                self._accumulate(group, rows, rows)
            else:  # "paired": rows are the merged model's, the stash holds the adapter's own
                stash = self._stash.get(group.name)
                if not stash:
                    raise IterisError(f"layer '{group.name}' ran more often in the merged model than in the adapter's")
                own = stash.pop(0)  # a layer may run several times per pass
                if own.shape != rows.shape:
                    raise IterisError(f"layer '{group.name}' saw a different number of tokens in the two models")
                if self._gamma != 0.0:
                    rows = (1.0 - self._gamma) * rows.to(self.stats_dtype) + self._gamma * own.to(self.stats_dtype)
                self._accumulate(group, own, rows)

        return pre_hook

    def _output_hook(self, name: str):
        group = self._group_of[name]

        def hook(module, args, output):
            if not self._out_norms or self._mode not in ("single", "stash") or group not in self._active:
                return None
            rows = token_rows(channels_last(module, output), self._masks, name, self._full, self._unmasked_rows)
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
            bias = getattr(module, "bias", None)
            if bias is not None:  # the weight's share of the output: ||X W^T||, as the adaptive weight is defined
                rows = rows - bias.to(rows.dtype)
            term = rows.square().sum(dtype=torch.float64)
            acc = self._out_sq.get(name)
            self._out_sq[name] = term if acc is None else acc.add_(term)
            return None

        return hook

    def _accumulate(self, group: LayerGroup, own: torch.Tensor, mixed: torch.Tensor) -> None:
        st = self._stats.get(group.name)
        if st is None:
            st = self._blank()
            self._stats[group.name] = st
            expected = self._rows_tokens
            if self._rows_mode == "always" or (self._rows_mode == "auto" and (expected is None or expected < group.in_features)):
                self._parts[group.name] = {"mixed": [], "own": [], "proj": []}
            else:
                self._allocate(group, st)
        parts = self._parts.get(group.name)
        if parts is not None and self._rows_mode == "auto" and st.tokens + mixed.shape[0] >= group.in_features:
            # as many tokens as features: the Gram is now the smaller statistic
            self._allocate(group, st)
            if parts["mixed"]:
                add_gram(st.gram, torch.cat(parts["mixed"]))
                if st.cross is not None:
                    add_product(st.cross, torch.cat(parts["own"]), torch.cat(parts["mixed"]))
            del self._parts[group.name]
            parts = None
        if parts is None:
            add_gram(st.gram, mixed)
        else:
            # half-precision rows stay so (exact; a later Gram of them takes the half-precision GEMM path)
            parts["mixed"].append(self._keep(mixed))
            if self._want_cross and self._paired:
                parts["own"].append(self._keep(own))
        st.tokens += mixed.shape[0]
        projection = self._projections.get(group.name)
        if not self._paired:
            # cross terms are the Gram itself; projections are taken from it at the end
            if self._remember is not None and projection is not None:
                self._remember.setdefault(group.name, []).append(self._store(self._project(projection, own)))
            return
        if st.cross is not None:
            add_product(st.cross, own, mixed)
        if projection is not None:
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
        device = self.layers[group.name].weight.device
        st.gram = torch.zeros(d, d, dtype=self.stats_dtype, device=device)
        if self._want_cross and self._paired:
            st.cross = torch.zeros(d, d, dtype=self.stats_dtype, device=device)

    @staticmethod
    def _project(projection: tuple, rows: torch.Tensor) -> torch.Tensor:
        """rows A^T (tokens x sum r) in the statistics' dtype; bf16 rows on a GPU against A's exact bf16
        parts, rather than through a float32 copy of the rows."""
        A, A_split = projection[2], projection[3]
        if A_split is not None and splits_bf16(rows):
            return split_mm(rows, A_split)
        return rows.to(A.dtype) @ A.T

    def start(
        self,
        groups: list[str],
        projections: dict[str, dict[str, torch.Tensor]],
        paired: bool,
        gamma: float = 0.0,
        want_cross: bool = False,
        keep_cross: bool = False,
        out_norms: bool = False,
        stop_at: str | None = None,
        store=None,
        rows: str | None = None,
        rows_tokens: int | None = None,
    ) -> None:
        """Begin one task's statistics for ``groups``.

        ``projections``: group -> member -> A (r x d_in) whose projected cross terms are wanted.
        ``want_cross`` gathers ||X^T Xh||_F; ``keep_cross`` also keeps X^T Xh itself (d_in x d_in).
        ``out_norms`` gathers each member's output norm in the adapter's own model.
        ``stop_at``: a group whose input ends every pass (nothing beyond it is needed).
        ``store``: where remembered projections are kept (a function placing a tensor: GPU or CPU).
        ``rows``: keep each group's inputs themselves rather than their Gram, "auto" while a task has fewer
        tokens than d_in, or "always" (never with ``keep_cross``); ``rows_tokens``, the tokens of all tasks
        together where known: "auto" keeps rows only while that many stay below d_in.
        """
        self._store = store or (lambda t: t)
        self._stats = {}
        self._out_sq = {}
        self._active = set(groups)
        self._stop_at = stop_at
        self._paired = paired
        self._gamma = gamma
        self._want_cross = want_cross or keep_cross
        self._keep_cross = keep_cross
        self._rows_mode = None if keep_cross else rows
        self._rows_tokens = rows_tokens
        self._parts = {}
        self._out_norms = out_norms
        self._projections = {}
        for g, members in projections.items():
            if g not in self._active or not members:
                continue
            device = self.layers[g].weight.device
            names = list(members)
            A = torch.cat([members[m].to(device=device, dtype=self.stats_dtype) for m in names])
            A_split = split_rows(A) if A.dtype == torch.float32 and splits_bf16(self.layers[g].weight) else None
            self._projections[g] = (names, [members[m].shape[0] for m in names], A, A_split)

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
        self._masks, self._full, self._unmasked_rows = batch.masks, batch.full, batch.unmasked_rows
        self._remember = remember
        try:
            return self._run("stash" if self._paired else "single", forward)
        finally:
            self._remember = None

    def merged_pass(self, forward, batch: Batch, recall: dict[str, list[torch.Tensor]] | None = None):
        """The merged model on the batch the last ``own_pass`` ran on, or, given ``recall`` (what
        ``own_pass(remember=...)`` kept of this batch: the adapter's own rows projected on A), alone."""
        self._masks, self._full, self._unmasked_rows = batch.masks, batch.full, batch.unmasked_rows
        self._recall, self._recall_pos = recall, {}
        try:
            return self._run("paired", forward)
        finally:
            self._stash.clear()
            self._recall = None

    def finish(self, holders: tuple[int, ...] | None = None) -> dict[str, GroupStats]:
        """The task's statistics. Several processes: those of the groups this rank solves, complete: summed over
        all ranks (``holders`` None: each captured a share of the samples), sent by the one rank that captured
        the whole task, or (several ``holders``, a share each) sent by each and summed where solved, once they
        have arrived (``Ranks.settle``)."""
        stats, self._stats = self._stats, {}
        self._stash.clear()
        self._masks = {}
        shares = self.ranks is not None and holders is not None and len(holders) > 1
        if self.ranks is not None and holders is None:
            self._sum_over_ranks(stats)
        for group_name, st in stats.items():
            parts = self._parts.pop(group_name, None)
            own_rows = own_proj = None
            if parts is None:
                mirror_gram(st.gram)
            else:
                st.rows = torch.cat(parts["mixed"]).to(self.stats_dtype)
                own_rows = torch.cat(parts["own"]).to(self.stats_dtype) if parts["own"] else None
                own_proj = torch.cat(parts["proj"]) if parts["proj"] else None
            if group_name in self._projections:
                members, ranks, A, _ = self._projections[group_name]
                if st.same_inputs and st.rows is not None:
                    own_proj = st.rows @ A.T
                    whole = own_proj.T @ st.rows
                else:
                    whole = A @ st.gram if st.same_inputs else st.proj.pop("")
                st.proj = dict(zip(members, whole.split(ranks)))
                if st.rows is not None:
                    st.own_proj = dict(zip(members, own_proj.split(ranks, dim=1)))
            if shares:
                continue  # the cross term's norm is taken of the sum of the shares, where it is solved
            if self._want_cross:
                st.cross_norm = self._cross_norm(st, own_rows)  # stays on the device
            if not self._keep_cross:
                st.cross = None  # only its norm was needed: free d_in^2 per group now
        for name, value in self._out_sq.items():
            stats[self._group_of[name]].out_sq[name] = float(value)
        if shares:
            self._sum_shares_where_solved(stats, holders)
        elif self.ranks is not None and holders is not None:
            self._pass_to_owners(stats, holders[0])
        self._projections = {}
        self._out_sq = {}
        return stats

    def _sum_shares_where_solved(self, stats: dict[str, GroupStats], holders: tuple[int, ...]) -> None:
        """A task captured in shares by several ranks: each share's statistics (cross term still whole) sent to
        the rank solving the group, summed there after arrival, then its cross term's norm taken."""
        me = self.ranks.rank
        sends, recvs, sums = [], [], []
        cross = self._want_cross and self._paired
        want_norm, keep_cross = self._want_cross, self._keep_cross
        for name in sorted(self._active):
            owner = self.owner[name]
            if me in holders and me != owner:
                sends += [(t, owner) for t in self._wire(stats.pop(name), name, share=True)]
            elif me == owner:
                parts = []
                for peer in holders:
                    if peer == me:
                        continue
                    part = self._blank()
                    wire = self._wire(part, name, blank=True, share=True)
                    recvs += [(t, peer) for t in wire]
                    parts.append((part, wire[-1]))
                mine = stats.get(name)
                target = mine if mine is not None else self._blank()
                stats[name] = target
                self.received.append(target)
                members = self._group_by_name[name].members
                sums.append(lambda t=target, m=mine, p=parts, ms=members, on=self._out_norms: _add_shares(
                    t, m, p, ms, cross, want_norm, keep_cross, on))
        self.in_flight += self.ranks.exchange(sends, recvs) + sums

    def _pass_to_owners(self, stats: dict[str, GroupStats], holder: int) -> None:
        """A task captured whole on rank ``holder``: each of its groups' finished statistics sent to the rank
        that solves the group (and dropped here), received there into statistics of the same layout."""
        me = self.ranks.rank
        sends, recvs, received = [], [], []
        for name in sorted(self._active):
            owner = self.owner[name]
            if owner == holder:
                continue
            if me == holder:
                sends += [(t, owner) for t in self._wire(stats.pop(name), name)]
            elif me == owner:
                st = self._blank()
                stats[name] = st
                wire = self._wire(st, name, blank=True)
                recvs += [(t, holder) for t in wire]
                received.append((st, name, wire[-1]))
        self.in_flight += self.ranks.exchange(sends, recvs)
        self.received += [st for st, _, _ in received]
        for st, name, scalars in received:  # kept as 0-dim tensors: read (a host sync) only where solved
            st.tokens, rest = scalars[0], list(scalars[1:])
            if self._want_cross:
                st.cross_norm = rest.pop(0)
            if self._out_norms:
                st.out_sq = dict(zip(self._group_by_name[name].members, rest))

    def _blank(self) -> GroupStats:
        """Empty statistics of the current task (filled by its batches, or by what other processes send)."""
        return GroupStats(gram=None, cross=None, same_inputs=not self._paired)

    def _wire(self, st: GroupStats, name: str, blank: bool = False, share: bool = False) -> list[torch.Tensor]:
        """A finished group's statistics as the tensors that travel, in a fixed order; ``blank``: empty ones of
        that layout (set on ``st``) to receive into. The scalars (tokens, ||X^T Xh||, output norms) go as one.
        ``share``: one share of a task's samples: the cross term travels whole (its norm is taken of the sum)."""
        group = self._group_by_name[name]
        device = self.layers[name].weight.device
        d, dtype = group.in_features, self.stats_dtype
        # (an unpaired sweep's cross term is its Gram)
        cross = (self._want_cross if share else self._keep_cross) and self._paired
        norm = self._want_cross and not share
        if blank:  # the Gram arrives packed, and is unpacked where it is solved (full_gram)
            st.packed = torch.empty(packed_size(d), dtype=dtype, device=device)
            st.packed_dim = d
            if cross:
                st.cross = torch.empty(d, d, dtype=dtype, device=device)
            if name in self._projections:
                members, ranks = self._projections[name][:2]
                st.proj = {m: torch.empty(r, d, dtype=dtype, device=device) for m, r in zip(members, ranks)}
        n_scalars = 1 + norm + (len(group.members) if self._out_norms else 0)
        if blank:
            scalars = torch.empty(n_scalars, dtype=torch.float64, device=device)
        else:
            values = [torch.tensor(float(st.tokens), dtype=torch.float64, device=device)]
            if norm:
                values.append(st.cross_norm.to(device=device, dtype=torch.float64).reshape(()))
            if self._out_norms:
                values += [torch.tensor(st.out_sq[m], dtype=torch.float64, device=device) for m in group.members]
            scalars = torch.stack(values)
        tensors = [st.packed if blank else pack_gram(st.gram)] + ([st.cross] if cross else []) + list(st.proj.values())
        return [t if t.dtype == dtype else t.to(dtype) for t in tensors] + [scalars]

    def _sum_over_ranks(self, stats: dict[str, GroupStats]) -> None:
        """The raw sums (Grams, cross terms, projected cross terms, output norms, token counts) over all
        ranks, before anything is derived from them; every rank gathered the same groups."""
        if self._parts:
            raise IterisError("inputs kept for a sample-space solve cannot be summed over processes")
        for g in sorted(stats):  # one group at a time: one packed copy of a Gram alive
            st = stats[g]
            tokens = torch.tensor([float(st.tokens)], dtype=torch.float64, device=st.gram.device)
            out_norms = [self._out_sq[n] for n in sorted(self._out_sq) if self._group_of[n] == g]
            # of the Gram only the blocks computed so far (add_gram's upper triangle: mirrored once summed)
            packed = pack_gram(st.gram)
            self.ranks.sum_to({self.owner[g]: [packed] + [t for t in (st.cross, st.proj.get("")) if t is not None]
                               + out_norms + [tokens]})
            if self.owner[g] != self.ranks.rank:  # another rank solves this group: its partial sums are not needed
                del stats[g]
                for n in [n for n in self._out_sq if self._group_of[n] == g]:
                    del self._out_sq[n]
            else:
                if packed.data_ptr() != st.gram.data_ptr():
                    unpack_gram(packed, st.gram.shape[0], into=st.gram)
                st.tokens = tokens[0]  # a 0-dim tensor: read (a host sync) only where solved

    @staticmethod
    def _cross_norm(st: GroupStats, own_rows: torch.Tensor | None) -> torch.Tensor:
        """||X^T Xh||_F, 0-dim float64; from kept rows through the tokens x tokens products, since
        ||X^T Xh||_F^2 = <X X^T, Xh Xh^T>."""
        if st.rows is None:
            return torch.linalg.vector_norm(st.cross_or_gram, dtype=torch.float64)
        mixed = st.rows.double()
        mixed_products = mixed @ mixed.T
        if st.same_inputs:
            return torch.linalg.vector_norm(mixed_products)
        own = own_rows.double()
        return ((own @ own.T) * mixed_products).sum().clamp_min(0).sqrt()
