"""Weight updates added to a loaded base model through forward hooks, so that one model in memory acts as
each adapter's own model or as the merged model without touching W0."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from typing import NamedTuple

from ..deltas import DenseDelta, LoraModule, LowRankDelta
from ..precision import split_left_factor, split_mm, split_right_factor, split_rows, splits_bf16
from .layers import is_pointwise_conv


class Variant(NamedTuple):
    """Which model the base model acts as: adapter ``task``'s own (``own(i)``) or the merged one (``MERGED``).
    (A tuple: it keys the injector's variants at every block call, and hashes at C speed.)"""

    kind: str
    task: int | None = None

    def __str__(self) -> str:
        return self.kind if self.task is None else f"{self.kind} model of adapter {self.task}"


def own(task: int) -> Variant:
    return Variant("own", task)


MERGED = Variant("merged")


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
        self.variants: dict[Variant, dict[str, tuple]] = {}
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

    def set_variant(self, key: Variant, updates: dict[str, LoraModule | LowRankDelta | DenseDelta]) -> None:
        """Register a variant's updates; tensors move to each layer's device once, here."""
        self.variants[key] = self._prepare(updates)

    def update_variant(self, key: Variant, updates: dict[str, LoraModule | LowRankDelta | DenseDelta]) -> None:
        """Replace some layers' updates of a registered variant (a block-level fit, once per step)."""
        self.variants[key] = {**self.variants[key], **self._prepare(updates)}

    def _prepare(self, updates: dict[str, LoraModule | LowRankDelta | DenseDelta]) -> dict[str, tuple]:
        prepared = {}
        for name, update in updates.items():
            weight = self.layers[name].weight
            # Updates run in float32 at least (as PEFT runs LoRA branches), float64 for a float64 model.
            to = {"device": weight.device, "dtype": torch.promote_types(weight.dtype, torch.float32)}
            if isinstance(update, (LoraModule, LowRankDelta)):
                A, B = update.A.to(**to), update.B.to(**to)
                scale = update.scale if isinstance(update, LoraModule) else 1.0
                prepared[name] = ("lowrank", A, B, scale)
                if splits_bf16(weight) and not (A.requires_grad or B.requires_grad):
                    # A and s*B as exact bf16 parts: float32 products on bf16 tensor cores (factors being fitted
                    # keep the plain path, which autograd follows)
                    prepared[name] = ("split", split_rows(A), split_right_factor(B * scale), prepared[name])
            else:
                prepared[name] = ("dense", update.D.to(**to), None, 1.0)
        return prepared

    @contextlib.contextmanager
    def use(self, key: Variant | None, overrides: dict[str, torch.Tensor] | None = None):
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
