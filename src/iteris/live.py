"""Merging inside a loaded ``PeftModel``: PEFT's ``add_weighted_adapter`` habit, with calibration data."""

from __future__ import annotations

import enum
from pathlib import Path

from .adapters import LoraAdapter, adapter_from_state
from .config import CalibrationConfig
from .data import load_records
from .errors import IterisError
from .families.text import drawn_token_samples
from .families.transformers import fit_positions
from .merge import merge_loaded
from .output import adapter_config, adapter_state_dict
from .schema import build


def add_merged_adapter(peft_model, adapters: list[str], data: list | None = None, *, tokenizer=None,
                       method: str = "iteris", adapter_name: str = "merged", weights: list[float] | None = None,
                       calibration: dict | None = None, progress: bool = False, **parameters) -> dict:
    """Merge adapters already loaded in ``peft_model`` into a new adapter of it, in place; returns the report.

    ``data``: per adapter, a data file (as a merge config's ``data:``), a list of texts, or a list of token id
    lists; texts need ``tokenizer``. ``calibration``: a merge config's calibration settings (samples,
    max_length, seed, batch_size, ...), drawn and tokenized exactly as ``iteris merge`` does, so both give the
    same adapter where the merge calibrates on the prompts alone (``calibration.generate: false``; on a GPU
    IterIS's merge adds each adapter's continuations by default). ``parameters``: the method's. The new
    adapter is added, not activated: ``peft_model.set_adapter(adapter_name)`` to use it.
    """
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    if not isinstance(peft_model, PeftModel):
        raise IterisError(f"add_merged_adapter takes a peft.PeftModel with the adapters loaded, got "
                          f"{type(peft_model).__name__}; for adapter directories use iteris.merge")
    loaded = list(peft_model.peft_config)
    if not adapters or len(set(adapters)) != len(adapters):
        raise IterisError(f"adapters must name loaded adapters, each once (loaded: {loaded}), got {adapters!r}")
    unknown = [a for a in adapters if a not in loaded]
    if unknown:
        raise IterisError(f"adapters {unknown} are not loaded in this PeftModel (loaded: {loaded}); load them with "
                          "peft_model.load_adapter(path, adapter_name=...)")
    if adapter_name in loaded:
        raise IterisError(f"the PeftModel already has an adapter named '{adapter_name}'; choose another adapter_name "
                          "or peft_model.delete_adapter it first")
    cal = build(CalibrationConfig, dict(calibration or {}), "calibration")
    cal.validate()
    if cal.generate is True:
        raise IterisError("calibration.generate is for iteris.merge; add_merged_adapter merges on the data given")
    cal.generate = False  # (auto: the data given is what the merge sees)
    lora = [_loaded_adapter(peft_model, name, get_peft_model_state_dict) for name in adapters]
    model = peft_model.get_base_model()
    from .methods import get_method

    needs_data = get_method(method).needs_calibration
    samples = _token_samples(data, adapters, cal, tokenizer, model) if needs_data else [[] for _ in adapters]
    pad_id = _pad_id(tokenizer, model)
    with peft_model.disable_adapter():  # the base model's own outputs; the merged LoRA is hooked on its layers
        deltas, report = merge_loaded(model, lora, samples, method=method, parameters=parameters, weights=weights,
                                      pad_id=pad_id, calibration=cal, progress=progress)
    base = peft_model.peft_config[adapters[0]].base_model_name_or_path
    peft_model.add_adapter(adapter_name, adapter_config(deltas, lora, base, {}))
    result = set_peft_model_state_dict(peft_model, adapter_state_dict(deltas, {}), adapter_name=adapter_name)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing:
        raise IterisError(f"PEFT did not take the merged factors {missing[:3]}: a PEFT version this was not made for")
    report["adapter_name"] = adapter_name
    return report


def _loaded_adapter(peft_model, name: str, state_dict_of) -> LoraAdapter:
    config = _plain(peft_model.peft_config[name].to_dict())
    state = {k: v.detach() for k, v in state_dict_of(peft_model, adapter_name=name).items()}
    adapter = adapter_from_state(name, Path(f"<loaded adapter '{name}'>"), config, state)
    if adapter.extra_tensors:
        modules = sorted({k.rsplit(".", 1)[0] for k in adapter.extra_tensors})
        raise IterisError(f"adapter '{name}' also trains whole modules {modules} (modules_to_save); add_merged_adapter "
                          "merges LoRA layers only: merge such adapters from their directories with iteris.merge")
    return adapter


def _plain(value):
    """A PEFT config as its saved JSON holds it (sets as lists, enums as their values)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _token_samples(data, adapters: list[str], cal: CalibrationConfig, tokenizer, model) -> list[list]:
    from .engine.forward import TokenSample
    from .families.loading import max_positions

    if data is None or len(data) != len(adapters):
        raise IterisError(f"this method needs calibration data: give `data` one entry per adapter ({len(adapters)}), "
                          f"got {0 if data is None else len(data)}")
    fit_positions(cal, max_positions(model.config))
    out = []
    for name, entry in zip(adapters, data):
        if isinstance(entry, (str, Path)):
            records, source = load_records(entry), str(entry)
        elif isinstance(entry, list) and entry and all(isinstance(x, list) for x in entry):
            out.append([TokenSample(input_ids=[int(t) for t in ids]) for ids in entry if ids])
            continue
        elif isinstance(entry, list) and entry and all(isinstance(x, str) for x in entry):
            records, source = [{cal.field: t} for t in entry], f"the texts given for '{name}'"
        else:
            raise IterisError(f"data for adapter '{name}': give a data file, a list of texts or a list of token id "
                              f"lists, got {type(entry).__name__}")
        if tokenizer is None:
            raise IterisError("texts need a tokenizer: add_merged_adapter(..., tokenizer=AutoTokenizer.from_pretrained(...))")
        out.append(drawn_token_samples(tokenizer, records, cal, source, model, name))
    return out


def _pad_id(tokenizer, model) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0
