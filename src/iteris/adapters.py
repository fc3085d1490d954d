"""Read PEFT LoRA adapter directories into plain tensors, and check that several of them can be merged.

Every LoRA delta is kept in the (d_out x d_in) convention of ``nn.Linear``: ``delta = scale * B @ A``
with ``A`` (r x d_in) and ``B`` (d_out x r). PEFT stores GPT-2 ``Conv1D`` LoRAs in the same shapes, so
only the base weight needs transposing (see ``models.base_weight``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from .errors import IterisError

PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoraModule:
    """One target module of one adapter: ``delta = scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def delta(self, dtype=torch.float64) -> torch.Tensor:
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LoraAdapter:
    name: str
    path: Path
    config: dict
    modules: dict[str, LoraModule]
    # Fully trained copies of whole modules (PEFT ``modules_to_save``), by parameter path.
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    st = directory / WEIGHT_FILES[0]
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    binf = directory / WEIGHT_FILES[1]
    if binf.is_file():
        # weights_only: a .bin is a pickle, and a user's file must never run code.
        return torch.load(str(binf), map_location="cpu", weights_only=True)
    raise IterisError(
        f"adapter directory {directory} has no {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}; "
        "point `path` at a directory written by PEFT's save_pretrained"
    )


def _check_config(name: str, directory: Path, cfg: dict) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise IterisError(f"adapter '{name}' ({directory}) is a {peft_type} adapter; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        raise IterisError(
            f"adapter '{name}' ({directory}) uses DoRA (use_dora: true); its magnitude vector makes the update "
            "non-linear in B@A, so it cannot be merged as a LoRA. Merge plain LoRA adapters instead"
        )
    if cfg.get("lora_bias"):
        raise IterisError(f"adapter '{name}' ({directory}) trains a bias in lora_B (lora_bias: true), which is not supported")
    if cfg.get("trainable_token_indices"):
        raise IterisError(
            f"adapter '{name}' ({directory}) trains token embeddings (trainable_token_indices), which cannot be "
            "merged yet; retrain without them or merge those tokens separately"
        )
    if cfg.get("layer_replication"):
        raise IterisError(f"adapter '{name}' ({directory}) uses layer_replication, which is not supported")


def load_adapter(name: str, path: str | Path) -> LoraAdapter:
    """Read one PEFT LoRA directory; fail early and clearly on kinds that cannot be merged."""
    directory = Path(path)
    cfg_file = directory / "adapter_config.json"
    if not cfg_file.is_file():
        raise IterisError(
            f"adapter '{name}': {cfg_file} not found; `path` must be a PEFT adapter directory "
            "(adapter_config.json + adapter_model.safetensors)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise IterisError(f"adapter '{name}': {cfg_file} is not valid JSON ({exc})") from None
    _check_config(name, directory, cfg)
    tensors = _read_weights(directory)

    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))

    a_tensors: dict[str, torch.Tensor] = {}
    b_tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise IterisError(f"adapter '{name}': unexpected tensor name '{key}' (PEFT names start with '{PREFIX}')")
        rest = key[len(PREFIX):]
        if "lora_embedding_" in rest:
            raise IterisError(
                f"adapter '{name}' has a LoRA on an embedding ('{rest}'); embedding LoRAs are not supported. "
                "Retrain without the embedding in target_modules"
            )
        if "token_adapter" in rest or "trainable_tokens" in rest:
            raise IterisError(f"adapter '{name}' carries trainable token embeddings ('{rest}'), which are not supported")
        if "lora_magnitude_vector" in rest:
            raise IterisError(f"adapter '{name}' carries DoRA magnitude vectors ('{rest}'); DoRA is not supported")
        if rest.endswith(_A_SUFFIX):
            a_tensors[rest[: -len(_A_SUFFIX)]] = value
        elif rest.endswith(_B_SUFFIX):
            b_tensors[rest[: -len(_B_SUFFIX)]] = value
        elif ".lora_" in rest:
            raise IterisError(f"adapter '{name}': unsupported LoRA tensor '{rest}'")
        else:
            extra[rest] = value

    if set(a_tensors) != set(b_tensors):
        missing = sorted(set(a_tensors) ^ set(b_tensors))
        raise IterisError(f"adapter '{name}': lora_A/lora_B pairs are incomplete for {missing[:3]}")
    if not a_tensors:
        raise IterisError(f"adapter '{name}' ({directory}) holds no LoRA weights")

    modules = {}
    for module_name, A in a_tensors.items():
        B = b_tensors[module_name]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise IterisError(
                f"adapter '{name}', module '{module_name}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                "are not a linear LoRA pair (convolution LoRAs are not supported)"
            )
        r = A.shape[0]
        expected_r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), r_default))
        if r != expected_r:
            raise IterisError(
                f"adapter '{name}', module '{module_name}': weights have rank {r} but adapter_config.json says "
                f"{expected_r}; the config and weights do not belong together"
            )
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[module_name] = LoraModule(A=A.float(), B=B.float(), scale=scale)
    return LoraAdapter(name=name, path=directory, config=cfg, modules=modules, extra_tensors=extra)


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """Adapters must come from one base: same task head kind and same shapes where they share a module."""
    if len({a.name for a in adapters}) != len(adapters):
        raise IterisError("adapter names must be unique")
    task_types = {a.task_type for a in adapters}
    if len(task_types) > 1:
        raise IterisError(f"adapters have different task_type values {sorted(map(str, task_types))}; they must share one base model class")
    bases = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    shapes: dict[str, tuple[int, int, str]] = {}
    for adapter in adapters:
        for module_name, mod in adapter.modules.items():
            shape = (mod.out_features, mod.in_features)
            seen = shapes.setdefault(module_name, (*shape, adapter.name))
            if seen[:2] != shape:
                raise IterisError(
                    f"module '{module_name}' is {seen[0]}x{seen[1]} in adapter '{seen[2]}' but "
                    f"{shape[0]}x{shape[1]} in adapter '{adapter.name}': the adapters were trained on different "
                    f"base models{' (' + ', '.join(sorted(bases)) + ')' if len(bases) > 1 else ''}"
                )
    fifo = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters}
    if len(fifo) > 1:
        raise IterisError("adapters disagree on fan_in_fan_out; they must target the same kind of layers")


def target_modules(adapters: list[LoraAdapter]) -> list[str]:
    """Union of every adapter's targets, in a stable order (a module absent from one adapter has delta 0 there)."""
    seen: dict[str, None] = {}
    for adapter in adapters:
        for name in adapter.modules:
            seen.setdefault(name, None)
    return list(seen)
