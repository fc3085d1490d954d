"""Write merged LoRAs as PEFT adapter directories (or full models); ``placement`` decides where, atomically."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .adapters import PREFIX, LoraAdapter
from .deltas import LowRankDelta
from .errors import IterisError
from .families.loading import load_base_model, load_tokenizer
from .finite import check_parameters


def adapter_state_dict(deltas: dict[str, LowRankDelta], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, delta in deltas.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = delta.A.detach().float().cpu().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = delta.B.detach().float().cpu().contiguous()
    for key, value in extras.items():
        state[f"{PREFIX}{key}"] = value.detach().cpu().contiguous()
    return state


def adapter_config(
    deltas: dict[str, LowRankDelta], adapters: list[LoraAdapter], base_model: str, extras: dict[str, torch.Tensor]
):
    """A LoraConfig with scaling 1 on every layer: lora_alpha equals each layer's rank."""
    from peft import LoraConfig

    ranks = {name: d.rank for name, d in deltas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in ranks.items() if k != r}
    first = adapters[0].config
    modules_to_save = sorted({key.rsplit(".", 1)[0] for key in extras}) or None
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        task_type=first.get("task_type"),
        base_model_name_or_path=base_model,
        modules_to_save=modules_to_save,
    )


def write_adapter(
    directory: Path,
    deltas: dict[str, LowRankDelta],
    adapters: list[LoraAdapter],
    base_model: str,
    extras: dict[str, torch.Tensor],
) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    adapter_config(deltas, adapters, base_model, extras).save_pretrained(str(directory))
    save_file(adapter_state_dict(deltas, extras), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_merged_model(
    directory: Path, adapter_dir: Path, base_model: str, task_type: str | None, extras: dict, tokenizer_path: str,
    trust_remote_code: bool = False,
):
    """Fold the written adapter into the base weights with PEFT and save a plain transformers model."""
    from peft import PeftModel

    base = load_base_model(base_model, task_type, extras, dtype="auto", device="cpu", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    check_parameters(merged, "the merged model")
    merged.save_pretrained(str(directory))
    try:
        load_tokenizer(tokenizer_path, trust_remote_code).save_pretrained(str(directory))
    except IterisError:
        pass  # a model without a tokenizer directory still saves


def write_report(directory: Path, report: dict) -> None:
    (directory / "merge_report.json").write_text(json.dumps(report, indent=2, default=str, allow_nan=False) + "\n")
