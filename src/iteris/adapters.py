"""Read PEFT LoRA adapter directories into plain tensors, and check that several of them can be merged.

Every LoRA delta is kept in the (d_out x d_in) convention of ``nn.Linear``: ``delta = scale * B @ A``
with ``A`` (r x d_in) and ``B`` (d_out x r). PEFT stores GPT-2 ``Conv1D`` LoRAs in the same shapes, so
only the base weight needs transposing (see ``engine.layers.base_weight``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key

from .deltas import LoraModule
from .errors import IterisError
from .files import load_json, load_pickle_tensors, short_exc
from .finite import FLOAT32_MAX, require_finite
from .schema import short

PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as exc:
            raise IterisError(f"{st} is not a readable safetensors file ({short_exc(exc)})") from None
    binf = directory / WEIGHT_FILES[1]
    if binf.is_file():
        # a .bin is a pickle, and a user's file must never run code: tensors only, checked before loading
        return load_pickle_tensors(binf, "adapter weights")
    raise IterisError(
        f"adapter directory {directory} has no {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}; "
        "point `path` at a directory written by PEFT's save_pretrained"
    )


def _check_config(name: str, directory: Path, cfg: dict) -> None:
    for key in ("peft_type", "task_type", "base_model_name_or_path"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise IterisError(f"adapter '{name}' ({directory}): {key} must be text, got {short(cfg[key])}")
    for key in ("fan_in_fan_out", "use_dora", "lora_bias", "use_rslora"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise IterisError(f"adapter '{name}' ({directory}): {key} must be true or false, got {short(cfg[key])}")
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
    cfg = load_json(cfg_file, f"adapter '{name}' config", constants=True)  # (NaN alphas named by _scaling)
    if not isinstance(cfg, dict):
        raise IterisError(f"adapter '{name}': {cfg_file} must hold a JSON object (PEFT's LoraConfig), got "
                          f"{type(cfg).__name__}")
    _check_config(name, directory, cfg)
    return adapter_from_state(name, directory, cfg, _read_weights(directory), cfg_file)


def adapter_from_state(name: str, directory: Path, cfg: dict, tensors: dict[str, torch.Tensor],
                       cfg_file: Path | None = None) -> LoraAdapter:
    """An adapter from PEFT's saved form (its config dict and state dict), read from files or from a live model
    (``peft.get_peft_model_state_dict``): one reading, the same checks either way."""
    r_default, alpha_default, rank_pattern, alpha_pattern, rslora = _scaling(name, cfg_file or directory, cfg)

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
        for kind, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise IterisError(f"adapter '{name}', module '{module_name}': {kind} is {str(t.dtype).replace('torch.', '')}; "
                                  "LoRA factors are floating-point tensors")
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
    adapter = LoraAdapter(name=name, path=directory, config=cfg, modules=modules, extra_tensors=extra)
    check_lora_values(adapter)
    return adapter


def check_lora_values(adapter: LoraAdapter) -> None:
    """Finite factors and saved modules, and updates float32 can hold: ||s B A||_F <= |s| ||B||_F ||A||_F stays
    below float32's largest number, or every merge's arithmetic overflows."""
    for module_name, lora in adapter.modules.items():
        for kind, t in (("lora_A", lora.A), ("lora_B", lora.B)):
            require_finite(t, f"adapter '{adapter.name}', module '{module_name}': {kind}", "the adapter file is damaged")
        if update_bound(lora) > FLOAT32_MAX:
            raise IterisError(
                f"adapter '{adapter.name}', module '{module_name}': its update (scale {lora.scale:.3g} times "
                f"B A) is too large for float32 arithmetic; the adapter file is damaged")
    for key, value in adapter.extra_tensors.items():
        require_finite(value, f"adapter '{adapter.name}': saved module tensor '{key}'", "the adapter file is damaged")


def update_bound(lora: LoraModule, weight: float = 1.0) -> float:
    """An upper bound on ||weight * s B A||_F, in float64."""
    return abs(weight * lora.scale) * float(lora.A.double().norm()) * float(lora.B.double().norm())


def check_weights(adapters: list[LoraAdapter], weights: list[float], least_squares: bool) -> None:
    """Adapter weights the method can use: in a least-squares merge each scales a sum of squares, so a
    negative one makes the problem indefinite; in any merge, weight times update stays within float32."""
    if least_squares:
        if any(w < 0 for w in weights):
            raise IterisError(
                f"adapter weights {weights}: a data-aware merge weighs each adapter's least-squares term, which a "
                "negative weight turns into a problem with no minimum; use weights >= 0 (a data-free method such "
                "as task_arithmetic takes negative weights)")
        if not any(w > 0 for w in weights):
            raise IterisError("every adapter weight is 0: nothing would be merged")
    for adapter, w in zip(adapters, weights):
        for module_name, lora in adapter.modules.items():
            if update_bound(lora, w) > FLOAT32_MAX:
                raise IterisError(
                    f"adapter '{adapter.name}': weight {w:g} times its update of '{module_name}' is too large for "
                    "float32 arithmetic; use a smaller weight")


# PEFT's own defaults for a config that leaves r or lora_alpha out: the adapter is then scaled as PEFT scales it
_PEFT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoraConfig)}


def _scaling(name: str, cfg_file: Path, cfg: dict):
    """r, lora_alpha, their per-module patterns and rsLoRA, checked: positive finite numbers, as PEFT needs."""
    where = f"adapter '{name}' ({cfg_file})"

    def number(key, value, integer: bool):
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
            kind = "a positive integer" if integer else "a positive finite number"
            raise IterisError(f"{where}: {key} must be {kind}, got {short(value)}")
        return value

    r = number("r", cfg.get("r", _PEFT_DEFAULTS["r"]), True)
    alpha = float(number("lora_alpha", cfg.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"]), False))
    patterns = []
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise IterisError(f"{where}: {key} must be a mapping of module names to numbers, got {short(pattern)}")
        for module, value in pattern.items():
            number(f"{key}['{module}']", value, integer)
        patterns.append(pattern)
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise IterisError(f"{where}: use_rslora must be true or false, got {short(rslora)}")
    return r, alpha, patterns[0], patterns[1], rslora


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
