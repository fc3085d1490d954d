"""Target layers as the engine sees them: which modules can be merged, their weights, the rows of their
inputs that are real tokens, and the groups of layers that read one and the same input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import IterisError
from .forward import Batch, run_forward


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 convolution (stride 1, no padding or groups): a linear layer over each pixel's channels, as the
    projections of Stable Diffusion 1.x's transformer blocks are."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.groups == 1 and module.dilation == (1, 1))


def is_mergeable_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or is_pointwise_conv(module)


def channels_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input or output with its features on the last axis (a 1x1 convolution's are on axis 1)."""
    return x.movedim(1, -1) if is_pointwise_conv(module) else x


def base_weight(module: nn.Module) -> torch.Tensor:
    """W0 as (d_out x d_in), whichever way the layer stores it (GPT-2 Conv1D keeps the transpose, a 1x1
    convolution two trailing unit axes)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    if is_pointwise_conv(module):
        return module.weight.flatten(1)
    return module.weight


def resolve_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    layers = {}
    for name in names:
        try:
            module = model.get_submodule(name)
            if hasattr(module, "get_base_layer"):  # a layer PEFT wrapped: the merged update sits on what it wraps
                module = module.get_base_layer()
        except AttributeError:
            raise IterisError(
                f"the adapters target '{name}', which {type(model).__name__} does not have; the adapters were "
                "trained on another model or another task_type (head class)"
            ) from None
        if not is_mergeable_layer(module):
            raise IterisError(
                f"'{name}' is a {type(module).__name__}; only linear layers (nn.Linear, Conv1D, 1x1 nn.Conv2d) can be merged"
            )
        layers[name] = module
    return layers


def check_layer_shapes(layers: dict[str, nn.Module], adapters) -> None:
    for adapter in adapters:
        for name, lora in adapter.modules.items():
            d_out, d_in = base_weight(layers[name]).shape
            if (lora.out_features, lora.in_features) != (d_out, d_in):
                raise IterisError(
                    f"adapter '{adapter.name}' has a {lora.out_features}x{lora.in_features} update for '{name}', "
                    f"but the base model's layer is {d_out}x{d_in}: wrong base model"
                )


@dataclass
class LayerGroup:
    """Target layers that read one and the same input tensor."""

    name: str
    members: list[str]
    in_features: int


def token_rows(x: torch.Tensor, batch: Batch, where: str) -> torch.Tensor:
    """The rows of a layer input that are real tokens, padding dropped.

    (batch, tokens, d): the mask whose length matches. (batch * tokens, d), as some layers receive a
    flattened batch: the flattened mask. (batch, d), a pooled input: every row. Anything else (tokens
    routed to experts, say) cannot be paired token by token between two models, so it is refused.
    ``batch.unmasked_rows`` (image patches, recorded pipeline calls): an input no mask fits is all real rows.
    """
    masks, full = batch.masks, batch.full
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
    if batch.unmasked_rows and x.ndim >= 2:
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
            token_rows(channels_last(layers[name], x), probe, name)
        key = tuple(id(x) for x in seen[name])
        group = by_inputs.get(key)
        if group is None:
            group = LayerGroup(name=name, members=[], in_features=channels_last(layers[name], seen[name][0]).shape[-1])
            by_inputs[key] = group
            groups.append(group)
        group.members.append(name)
    # In the order the forward pass reaches them: the sequential schedule solves them in this order.
    return sorted(groups, key=lambda g: min(first_call[m] for m in g.members))
