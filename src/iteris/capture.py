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
from .models import Batch, run_forward


class DeltaInjector:
    """Makes the loaded base model behave as a chosen variant (an adapter, or the merged model)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model = model
        self.layers = layers
        self.variants: dict[str, dict[str, tuple]] = {}
        self._active: dict[str, tuple] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            update = self._active.get(name)
            if update is None:
                return None
            x = args[0]
            kind, first, second, scale = update
            h = x.to(first.dtype)
            if kind == "lowrank":
                h = (h @ first.T) @ second.T
            else:
                h = h @ first.T
            if scale != 1.0:
                h = h * scale
            return output + h.to(output.dtype)

        return hook

    def set_variant(self, key: str, updates: dict[str, LoraModule | LowRankDelta | DenseDelta]) -> None:
        """Register a variant's updates; tensors move to each layer's device once, here."""
        prepared = {}
        for name, update in updates.items():
            weight = self.layers[name].weight
            # Updates run in float32 at least (as PEFT runs LoRA branches), float64 for a float64 model.
            to = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
            if isinstance(update, LoraModule):
                prepared[name] = ("lowrank", update.A.to(**to), update.B.to(**to), update.scale)
            elif isinstance(update, LowRankDelta):
                prepared[name] = ("lowrank", update.A.to(**to), update.B.to(**to), 1.0)
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


def token_rows(x: torch.Tensor, masks: dict[int, torch.Tensor], where: str) -> torch.Tensor:
    """The rows of a layer input that are real tokens, padding dropped.

    (batch, tokens, d): the mask whose length matches. (batch * tokens, d), as some layers receive a
    flattened batch: the flattened mask. (batch, d), a pooled input: every row. Anything else (tokens
    routed to experts, say) cannot be paired token by token between two models, so it is refused.
    """
    if x.ndim == 3:
        mask = masks.get(x.shape[1])
        if mask is not None and mask.shape[0] == x.shape[0]:
            return x[mask]
    elif x.ndim == 2:
        for mask in masks.values():
            if x.shape[0] == mask.numel():
                return x[mask.reshape(-1)]
        if any(x.shape[0] == mask.shape[0] for mask in masks.values()):
            return x
    raise IterisError(
        f"layer '{where}' receives an input of shape {tuple(x.shape)}, which is neither (batch, tokens, features) "
        "nor a flattened or pooled batch; its tokens cannot be told apart from padding or paired between "
        "models (is it a routed expert?). Leave it out of the merge, or use a data-free method"
    )


def find_groups(model: nn.Module, layers: dict[str, nn.Module], probe: Batch) -> list[LayerGroup]:
    """Group layers that read the very same tensors, call by call, on one probe forward pass."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = []

    def make(name):
        def pre_hook(module, args):
            seen[name].append(args[0])  # holding the references keeps ids unique for the whole pass

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
            token_rows(x, probe.masks, name)  # refuse unpairable inputs now, before any long work
        key = tuple(id(x) for x in seen[name])
        group = by_inputs.get(key)
        if group is None:
            group = LayerGroup(name=name, members=[], in_features=seen[name][0].shape[-1])
            by_inputs[key] = group
            groups.append(group)
        group.members.append(name)
    return groups


@dataclass
class GroupStats:
    """One task's statistics for one layer group (all float32/float64 on the model's device).

    gram:  Xh^T Xh, Xh = (1 - gamma) X~ + gamma X (X~: merged model's inputs, X: the adapter's own).
    cross: X^T Xh, kept only when asked for (its Frobenius norm, or W0 X^T Xh, is needed).
    proj:  A_m X^T Xh for each member m given a projection.
    """

    gram: torch.Tensor
    cross: torch.Tensor | None
    proj: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    same_inputs: bool = False  # X~ == X (no merged model yet): cross == gram
    cross_norm: float | None = None  # ||X^T Xh||_F, when the cross term was gathered

    @property
    def cross_or_gram(self) -> torch.Tensor | None:
        return self.gram if self.same_inputs else self.cross


class StatsCollector:
    """Accumulates ``GroupStats`` for one task at a time through forward pre-hooks."""

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
        self._mode: str | None = None
        self._stash: dict[str, list[torch.Tensor]] = {}
        self._stats: dict[str, GroupStats] = {}
        self._projections: dict[str, dict[str, torch.Tensor]] = {}
        self._gamma = 0.0
        self._want_cross = False
        self._handles = [
            layers[g.name].register_forward_pre_hook(self._hook(g)) for g in groups
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, group: LayerGroup):
        def pre_hook(module, args):
            if self._mode is None:
                return
            rows = token_rows(args[0], self._masks, group.name).to(self.stats_dtype)
            if self._mode == "stash":
                self._stash.setdefault(group.name, []).append(rows)
            elif self._mode == "single":
                self._accumulate(group, rows, rows, same=True)
            else:  # "paired": rows are the merged model's, the stash holds the adapter's own
                stash = self._stash.get(group.name)
                if not stash:
                    raise IterisError(f"layer '{group.name}' ran more often in the merged model than in the adapter's")
                own = stash.pop(0)  # a layer may run several times per pass
                if own.shape != rows.shape:
                    raise IterisError(f"layer '{group.name}' saw a different number of tokens in the two models")
                mixed = rows if self._gamma == 0.0 else (1.0 - self._gamma) * rows + self._gamma * own
                self._accumulate(group, own, mixed, same=False)

        return pre_hook

    def _accumulate(self, group: LayerGroup, own: torch.Tensor, mixed: torch.Tensor, same: bool) -> None:
        st = self._stats.get(group.name)
        if st is None:
            d = group.in_features
            dev = own.device
            st = GroupStats(
                gram=torch.zeros(d, d, dtype=self.stats_dtype, device=dev),
                cross=torch.zeros(d, d, dtype=self.stats_dtype, device=dev) if (self._want_cross and not same) else None,
                same_inputs=same,
            )
            self._stats[group.name] = st
        st.gram.addmm_(mixed.T, mixed)
        st.tokens += mixed.shape[0]
        if same:
            return  # cross terms are the Gram itself; projections are taken from it at the end
        if st.cross is not None:
            st.cross.addmm_(own.T, mixed)
        projections = self._projections.get(group.name, {})
        for member, A in projections.items():
            acc = st.proj.get(member)
            term = (own @ A.T).T @ mixed
            st.proj[member] = term if acc is None else acc.add_(term)

    def collect(
        self,
        batches,
        own_variant: str,
        merged_variant: str | None,
        projections: dict[str, dict[str, torch.Tensor]],
        own_overrides: dict[str, torch.Tensor] | None = None,
        merged_overrides: dict[str, torch.Tensor] | None = None,
        gamma: float = 0.0,
        want_cross: bool = False,
        keep_cross: bool = False,
        progress=None,
    ) -> dict[str, GroupStats]:
        """Statistics of one task's samples.

        ``merged_variant`` None means the merged model is the adapter's own model (iteration 0): one pass.
        Otherwise each batch runs through the adapter's model (features stashed) and then through the
        merged model on the same tokens, so rows pair up token by token.
        ``projections``: group -> member -> A (r x d_in) whose projected cross terms are wanted.
        ``want_cross`` gathers ||X^T Xh||_F; ``keep_cross`` also keeps X^T Xh itself (d_in x d_in).
        """
        self._stats = {}
        self._gamma = gamma
        self._want_cross = want_cross or keep_cross
        self._projections = {
            g: {m: A.to(device=self.layers[m].weight.device, dtype=self.stats_dtype) for m, A in members.items()}
            for g, members in projections.items()
        }
        try:
            for batch in batches:
                self._masks = batch.masks
                if merged_variant is None:
                    with self.injector.use(own_variant, own_overrides):
                        self._mode = "single"
                        run_forward(self.model, batch)
                else:
                    with self.injector.use(own_variant, own_overrides):
                        self._mode = "stash"
                        run_forward(self.model, batch)
                    with self.injector.use(merged_variant, merged_overrides):
                        self._mode = "paired"
                        run_forward(self.model, batch)
                    self._stash.clear()
                self._mode = None
                if progress is not None:
                    progress.update(1)
        finally:
            self._mode = None
            self._stash.clear()
            self._masks = {}
        stats, self._stats = self._stats, {}
        for group_name, st in stats.items():
            if st.same_inputs:
                st.proj = {m: A @ st.gram for m, A in self._projections.get(group_name, {}).items()}
            if self._want_cross:
                st.cross_norm = float(torch.linalg.matrix_norm(st.cross_or_gram.double()))
            if not keep_cross:
                st.cross = None  # only its norm was needed: free d_in^2 per group now
        self._projections = {}
        return stats
