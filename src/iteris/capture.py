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
        self.overrides: dict[str, dict[str, torch.Tensor]] = {}
        self._active: dict[str, tuple] = {}
        self._originals: dict[str, torch.Tensor] = {}
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

    def set_variant(
        self,
        key: str,
        updates: dict[str, LoraModule | LowRankDelta | DenseDelta],
        overrides: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Register updates for a variant; tensors move to each layer's device once, here."""
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
        self.overrides[key] = dict(overrides or {})

    @contextlib.contextmanager
    def use(self, key: str | None):
        """Activate a variant (None: the plain base model) for the duration of the block."""
        self._active = self.variants[key] if key is not None else {}
        swapped = self._swap_in(self.overrides.get(key, {}) if key is not None else {})
        try:
            yield
        finally:
            self._active = {}
            self._restore(swapped)

    def _swap_in(self, overrides: dict[str, torch.Tensor]) -> list[str]:
        for path, value in overrides.items():
            param = self.model.get_parameter(path)
            self._originals.setdefault(path, param.detach().clone())
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
        return list(overrides)

    def _restore(self, paths: list[str]) -> None:
        with torch.no_grad():
            for path in paths:
                self.model.get_parameter(path).copy_(self._originals[path])

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


def find_groups(
    model: nn.Module, layers: dict[str, nn.Module], probe: Batch
) -> list[LayerGroup]:
    """Group layers by the identity of the tensor they read, observed on one probe forward pass."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def make(name):
        def pre_hook(module, args):
            seen[name] = args[0]  # holding the reference keeps ids unique for the whole pass

        return pre_hook

    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(make(name)))
    try:
        run_forward(model, probe)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in seen]
    if missing:
        raise IterisError(
            f"target layers {missing[:3]} never ran on the calibration inputs; they cannot be merged "
            "from data (merge them with a data-free method, or drop them from the adapters)"
        )
    by_tensor: dict[int, LayerGroup] = {}
    groups: list[LayerGroup] = []
    for name in layers:
        tensor = seen[name]
        group = by_tensor.get(id(tensor))
        if group is None:
            group = LayerGroup(name=name, members=[], in_features=tensor.shape[-1])
            by_tensor[id(tensor)] = group
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

    def _rows(self, group: LayerGroup, x: torch.Tensor) -> torch.Tensor:
        """The token rows of a layer input, padding dropped."""
        if x.ndim == 2:
            return x
        if x.ndim != 3:
            raise IterisError(f"layer '{group.name}' receives a {x.ndim}-d input; expected (batch, tokens, features)")
        mask = self._masks.get(x.shape[1])
        if mask is None or mask.shape[0] != x.shape[0]:
            raise IterisError(
                f"cannot tell which tokens of layer '{group.name}' are padding (input {tuple(x.shape)})"
            )
        return x[mask]

    def _hook(self, group: LayerGroup):
        def pre_hook(module, args):
            if self._mode is None:
                return
            rows = self._rows(group, args[0]).to(self.stats_dtype)
            if self._mode == "stash":
                self._stash.setdefault(group.name, []).append(rows)
            elif self._mode == "single":
                self._accumulate(group, rows, rows, same=True)
            else:  # "paired": rows are the merged model's, the stash holds the adapter's own
                own = self._stash[group.name].pop(0)  # a layer may run several times per pass
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
                    with self.injector.use(own_variant):
                        self._mode = "single"
                        run_forward(self.model, batch)
                else:
                    with self.injector.use(own_variant):
                        self._mode = "stash"
                        run_forward(self.model, batch)
                    with self.injector.use(merged_variant):
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
