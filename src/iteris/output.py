"""Write merged LoRAs as PEFT adapter directories (or full models), atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from .adapters import PREFIX, LoraAdapter
from .deltas import LowRankDelta
from .errors import IterisError


def check_output_dir(out: str | Path, force: bool) -> Path:
    """Refuse to clobber a user's non-empty directory unless told to, before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IterisError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise IterisError(f"output directory '{out}' is not empty; pass --force (force=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool):
    """Yield a temporary sibling directory; it replaces ``out`` only if the block succeeds."""
    out = check_output_dir(out, force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    directory: Path, adapter_dir: Path, base_model: str, task_type: str | None, extras: dict, tokenizer_path: str
):
    """Fold the written adapter into the base weights with PEFT and save a plain transformers model."""
    from peft import PeftModel

    from .models import load_base_model, load_tokenizer

    base = load_base_model(base_model, task_type, extras, dtype="auto", device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(directory))
    try:
        load_tokenizer(tokenizer_path).save_pretrained(str(directory))
    except IterisError:
        pass  # a model without a tokenizer directory still saves


def write_report(directory: Path, report: dict) -> None:
    (directory / "merge_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
