"""Diffusers LoRA files: read as diffusers reads them (its own, PEFT's and kohya/A1111 formats, with the
scales it would apply) into one ``LoraAdapter`` per pipeline component, and the merged LoRA written as
diffusers writes it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch
from torch import nn

from ..adapters import LoraAdapter
from ..deltas import LoraModule, LowRankDelta
from ..engine.layers import is_pointwise_conv
from ..errors import IterisError
from ..files import load_pickle_tensors

DENOISERS = ("unet", "transformer", "prior")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


def lora_components(pipe) -> list[str]:
    """The pipeline's components that LoRAs may touch: text encoders first, the denoiser last."""
    names = [n for n in getattr(pipe, "_lora_loadable_modules", []) if getattr(pipe, n, None) is not None]
    if not names:
        raise IterisError(f"{type(pipe).__name__} does not load LoRAs (diffusers lists no LoRA-loadable components)")
    return sorted(names, key=lambda n: n in DENOISERS)


def lora_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in LORA_FILES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
    raise IterisError(
        f"no LoRA weights at '{path}': give a .safetensors (or .bin) file, or a directory holding "
        f"{LORA_FILES[0]} or a single .safetensors file"
    )


def _state_dict(pipe, file: Path) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers' naming, network alphas, adapter metadata): diffusers' own conversion of
    every format it reads (its own, PEFT's, kohya/A1111 ``lora_unet_...`` keys)."""

    cls = type(pipe)
    options = {"return_lora_metadata": True}
    if "return_alphas" in inspect.signature(cls.lora_state_dict).parameters:  # Flux-style loaders ask for them
        options["return_alphas"] = True
    if file.suffix == ".safetensors":
        out = cls.lora_state_dict(str(file.parent), weight_name=file.name, use_safetensors=True,
                                  local_files_only=True, **options)
    else:  # a pickle: tensors only, nothing it carries is executed
        raw = load_pickle_tensors(file, "LoRA weights")
        out = cls.lora_state_dict(raw, **options)
    # (state, alphas, metadata); loaders without network alphas (SD3-style) give (state, metadata)
    if isinstance(out, tuple) and len(out) == 3:
        state, alphas, metadata = out
    elif isinstance(out, tuple) and len(out) == 2:
        (state, metadata), alphas = out, None
    else:
        raise IterisError(f"{cls.__name__}.lora_state_dict returned an unexpected value for '{file}'")
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state):
        raise IterisError(f"'{file}' is a DoRA adapter; only plain LoRA can be merged")
    if any(k.endswith(("lora_B.bias", "lora.up.bias", "lora_up.bias")) for k in state):
        raise IterisError(f"'{file}' trains biases on its LoRA layers (lora_bias); only plain LoRA can be merged")
    return state, alphas, metadata


def _inject_text_encoder(module: nn.Module, prefix: str, state: dict, alphas, metadata, tag: str) -> bool:
    """What diffusers does for a text encoder's LoRA, with PEFT's injection called directly."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if not state:
        return False
    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")} or None
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(module, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    rank = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
    if alphas:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    config = _create_lora_config(state, alphas or None, metadata or None, rank, is_unet=False)
    inject_adapter_in_model(config, module, adapter_name=tag)
    set_peft_model_state_dict(module, state, adapter_name=tag)
    return True


def _take_lora_layers(module: nn.Module, tag: str, where: str) -> dict[str, LoraModule]:
    """Each injected layer's (A, B, scale), then the plain layers put back."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, LoraModule] = {}
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, LoraLayer) or tag not in layer.lora_A:
            continue
        base = layer.get_base_layer()
        if layer.use_dora.get(tag, False):
            raise IterisError(f"{where}: '{name}' is a DoRA layer; only plain LoRA can be merged")
        if getattr(layer, "lora_bias", {}).get(tag, False):
            raise IterisError(f"{where}: '{name}' trains a bias on its LoRA (lora_bias); only plain LoRA can be merged")
        if not (isinstance(base, nn.Linear) or is_pointwise_conv(base)):
            raise IterisError(
                f"{where}: '{name}' is a LoRA on a {type(base).__name__} "
                f"{'with a ' + 'x'.join(map(str, base.kernel_size)) + ' kernel ' if hasattr(base, 'kernel_size') else ''}"
                "; only LoRAs on linear layers and 1x1 convolutions can be merged (kohya LoCon-style LoRAs on "
                "larger convolution kernels are not supported)"
            )
        # (a 1x1 convolution's factors carry two trailing unit axes)
        A, B = layer.lora_A[tag].weight.detach().flatten(1), layer.lora_B[tag].weight.detach().flatten(1)
        at_least_32 = torch.promote_types(A.dtype, torch.float32)  # half files widen, float64 ones stay
        found[name] = LoraModule(A=A.to("cpu", at_least_32), B=B.to("cpu", at_least_32), scale=float(layer.scaling[tag]))
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # the loaders' bookkeeping, set on the instance
        if attr in module.__dict__:
            delattr(module, attr)
    return found


def read_lora(pipe, name: str, path: str | Path) -> dict[str, LoraAdapter]:
    """One adapter's LoRA per pipeline component, with the scales diffusers would apply."""
    file = lora_file(path)
    state, alphas, metadata = _state_dict(pipe, file)
    tag = "iteris_read_" + re.sub(r"\W", "_", name)  # (a module dict key: no dots)
    out = {}
    for component in lora_components(pipe):
        module = getattr(pipe, component)
        where = f"adapter '{name}' ({file}), {component}"
        if component in DENOISERS:
            if not any(k.startswith(f"{component}.") for k in state):
                continue
            module.load_lora_adapter(dict(state), network_alphas=alphas, metadata=metadata, prefix=component,
                                     adapter_name=tag)
        elif not _inject_text_encoder(module, component, state, alphas, metadata, tag):
            continue
        modules = _take_lora_layers(module, tag, where)
        if modules:
            out[component] = LoraAdapter(name=name, path=file, config={"component": component}, modules=modules)
    if not out:
        raise IterisError(
            f"adapter '{name}': '{file}' holds no LoRA weights for any of {lora_components(pipe)} of "
            f"{type(pipe).__name__}; is it a LoRA for another kind of pipeline?"
        )
    return out


def lora_metadata(deltas: dict[str, LowRankDelta]) -> dict:
    """PEFT LoraConfig fields for factors written with their scale folded in: alpha = r for every layer."""
    ranks = {name: d.rank for name, d in deltas.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: r for name, r in ranks.items() if r != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "lora_dropout": 0.0}


def write_pipeline_lora(directory: Path, pipeline_class, deltas: dict[str, dict[str, LowRankDelta]],
                        conv_layers: dict[str, set[str]] | None = None) -> None:
    """``pytorch_lora_weights.safetensors`` through the pipeline's own ``save_lora_weights``."""

    conv_layers = conv_layers or {}
    accepted = set(inspect.signature(pipeline_class.save_lora_weights).parameters)
    kwargs = {}
    for component, layers in deltas.items():
        if not layers:
            continue
        state = {}
        for name, d in layers.items():
            A, B = d.A.detach().float().cpu().contiguous(), d.B.detach().float().cpu().contiguous()
            if name in conv_layers.get(component, ()):  # as PEFT holds a 1x1 convolution's factors
                A, B = A[:, :, None, None], B[:, :, None, None]
            state[f"{name}.lora_A.weight"] = A
            state[f"{name}.lora_B.weight"] = B
        key = f"{component}_lora_layers"
        if key not in accepted:
            raise IterisError(f"{pipeline_class.__name__}.save_lora_weights cannot write LoRAs for '{component}'")
        kwargs[key] = state
        if f"{component}_lora_adapter_metadata" in accepted:
            kwargs[f"{component}_lora_adapter_metadata"] = lora_metadata(layers)
    pipeline_class.save_lora_weights(str(directory), safe_serialization=True, **kwargs)
