"""The merge configuration (``merge.yaml``): parsed and checked before any long work starts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .errors import IterisError
from .files import load_yaml
from .placement import hub_cache
from .schema import build, short


@dataclass
class CalibrationConfig:
    samples: int = 50  # per adapter; fewer are used (and reported) if the file holds fewer
    max_length: int = 256  # tokens per sample after truncation
    field: str = "text"  # the sample text's column / key
    prompt_field: str | None = None  # with response_field: prompt + separator + response
    response_field: str | None = None  # with prompt_field (encoder-decoder: the decoder's text)
    target_field: str | None = "target"  # encoder-decoder: the decoder's text, when the record has it
    separator: str = "\n"  # between prompt and response
    seed: int = 42  # which samples are drawn
    batch_size: int = 8  # samples per forward pass (padding never counts in the statistics)
    # causal LMs: append each adapter's own greedy continuation to its samples (the merge then sees the tokens
    # it will write, not only the prompts); auto: where the method asks for it (IterIS where it refines: a GPU)
    # and the data holds no responses of its own
    generate: bool | Literal["auto"] = "auto"
    max_new_tokens: int = 64  # for generated decoder targets / continuations
    stats_dtype: Literal["auto", "float32", "float64"] = "auto"  # statistics' accumulation dtype: auto = float64 on CPU, float32 on GPU (solves: float64)
    walk: Literal["auto", "blocks", "model"] = "auto"  # blocks: one block at a time (memory flat in depth); model: whole passes; auto: blocks where possible
    offload_states: bool = False  # keep the block-boundary hidden states in CPU memory (GPU memory flat in samples)
    overlap: Literal["auto", "on", "off"] = "auto"  # solve each block while the next is captured (global schedule); auto: on a GPU
    offload_stats: bool = False  # keep finished statistics in CPU memory; a layer group's return to the GPU for its solve
    # several processes (torchrun): adapters = each process captures whole adapters (only finished statistics
    # travel, to the process solving their layer), or with fewer adapters than processes each adapter its own
    # group of processes; samples = each a share of every adapter's samples (raw sums reduced); auto = adapters
    # where either number divides the other
    split: Literal["auto", "adapters", "samples"] = "auto"
    # several processes: blocks = each block's weights sharded over them (FSDP2; for models larger than one GPU);
    # off = each holds the whole model; auto = blocks where the checkpoint takes over 40% of one GPU's memory
    shard: Literal["auto", "blocks", "off"] = "auto"
    # diffusion pipelines: each adapter's prompts are sampled by the pipeline itself (its scheduler, its
    # classifier-free guidance) and the denoiser's calls at the recorded steps are the calibration samples
    steps: int = 20  # num_inference_steps of the sampling runs
    timesteps: int | list[int] = 4  # how many of the steps are recorded (evenly spread), or their indices
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # one sampling run per prompt batch and seed
    guidance_scale: float | None = None  # None: the pipeline's default
    height: int | None = None  # image size of the sampling runs; None: the pipeline's default
    width: int | None = None

    def validate(self) -> None:
        """What the types alone do not say (they are checked by ``schema.build``)."""
        for name in ("samples", "max_length", "batch_size", "max_new_tokens", "steps"):
            positive_int(f"calibration.{name}", getattr(self, name))
        if isinstance(self.timesteps, list):
            if not self.timesteps or any(t < 0 for t in self.timesteps):
                raise IterisError(f"calibration.timesteps must be a count or a list of step indices, got {short(self.timesteps)}")
        else:
            positive_int("calibration.timesteps", self.timesteps)
        if not self.seeds:
            raise IterisError("calibration.seeds must be a non-empty list of integers")
        for name in ("height", "width", "guidance_scale"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise IterisError(f"calibration.{name} must be positive, got {getattr(self, name)!r}")

    def resolved_generate(self, params, device: str, causal: bool) -> bool:
        """auto: on for a causal LM (walked block by block, in one process: ``causal``) where the method's
        parameters ask for continuations on this device, unless the data already holds responses."""
        if self.generate != "auto":
            return self.generate
        if self.response_field or self.walk == "model":
            return False
        wants = getattr(params, "wants_responses", None)
        return bool(causal and wants is not None and wants(device))

    def resolved_stats_dtype(self, device: str) -> str:
        """auto: float64 on the CPU (exact, and the CPU has no faster path), float32 on a GPU."""
        if self.stats_dtype != "auto":
            return self.stats_dtype
        return "float64" if device == "cpu" else "float32"


DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]
Dtype = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64"]


@dataclass
class AdapterSpec:
    name: str  # letters, digits, -, _ and . (it can name an output sub-directory)
    path: str  # a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    data: str | None = None  # calibration data: JSONL / JSON, text, CSV / TSV, Parquet or a save_to_disk directory
    weight: float = 1.0  # this adapter's weight in the merge
    field: str | None = None  # overrides calibration.field for this adapter's data
    samples: int | None = None  # overrides calibration.samples for this adapter
    trigger: str | None = None  # diffusion: put before every prompt that lacks it (a LoRA's trigger word)


@dataclass
class MergeConfig:
    base_model: str  # the model every adapter was trained from: a directory or a Hub id
    adapters: list[AdapterSpec]  # two or more (see the adapters: entries)
    model_type: Literal["auto", "transformers", "diffusion"] = "auto"  # auto (a diffusers pipeline directory is detected) | transformers | diffusion
    method: str = "iteris"  # any name `iteris methods` lists
    parameters: dict = field(default_factory=dict)  # the method's (Methods: parameters)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # see calibration:
    tokenizer: str | None = None  # defaults to base_model
    device: str = "auto"  # cpu, cuda, cuda:1 (auto: cuda if available)
    device_map: DeviceMap | None = None  # auto | balanced | balanced_low_0 | sequential: spread the model over the GPUs
    dtype: Dtype = "auto"  # model dtype for the forward passes
    rank: int | None = None  # compress the merged LoRA to this rank by SVD (error reported)
    merge_into_base: bool = False  # save a full model instead of an adapter
    modules_to_save: str = "auto"  # auto | per_adapter | drop | <adapter name>
    progress: bool = True  # progress bars
    # code shipped beside a model (its config's auto_map) runs only when this says so
    trust_remote_code: bool = False

    def validate(self) -> None:
        """Checks that hold for any source of values (YAML, dict, keyword overrides)."""
        self.calibration.validate()
        if self.rank is not None:
            positive_int("rank", self.rank)
        for key in ("base_model", "method", "device"):
            if not getattr(self, key).strip():
                raise IterisError(f"{key} is empty")
        check_device(self.device)
        if self.device_map and self.device not in ("auto", "cuda"):
            raise IterisError(f"device_map spreads the model over every visible GPU; leave device: auto (got {self.device!r})")
        if not self.adapters:
            raise IterisError("'adapters' must list at least one {name, path, data, weight} entry")
        names = [a.name for a in self.adapters]
        if len({n.lower() for n in names}) != len(names):  # (they name directories: unique on any file system)
            raise IterisError(f"adapter names must be unique (ignoring case), got {short(names)}")
        for index, a in enumerate(self.adapters):
            check_name(a.name, f"adapters[{index}].name")
            if not a.path.strip():
                raise IterisError(f"adapters[{index}].path is empty")
            if a.samples is not None:
                positive_int(f"adapters[{index}].samples", a.samples)
        policies = ("auto", "per_adapter", "drop")
        if self.modules_to_save not in policies and self.modules_to_save not in names:
            raise IterisError(
                f"modules_to_save must be one of {list(policies)} or an adapter name {names}, got '{self.modules_to_save}'"
            )

    # the YAML file the config was read from (not a key of it): an input like the others
    config_file = None

    def inputs(self) -> list[str]:
        """Every path the merge reads, which its output must never touch (the hub's cache, where a model is
        named by its hub id)."""
        paths = [self.base_model, self.tokenizer, self.config_file]
        paths += [p for a in self.adapters for p in (a.path, a.data)]
        return [p for p in paths if p] + hub_inputs(self.base_model, self.tokenizer)

    def resolve_paths(self, root: Path) -> None:
        """Relative paths in a YAML file are relative to the file, as a user reading it would expect: never to
        the working directory, which would pick up another model without a word. A base model or tokenizer
        found nowhere is left as written (a hub id)."""
        self.base_model = resolve_path(self.base_model, root, "base_model", may_be_hub_id=True)
        self.tokenizer = resolve_path(self.tokenizer, root, "tokenizer", may_be_hub_id=True)
        for i, a in enumerate(self.adapters):
            a.path = resolve_path(a.path, root, f"adapters[{i}].path")
            a.data = resolve_path(a.data, root, f"adapters[{i}].data")


def hub_inputs(*models: str | None) -> list[str]:
    remote = [m for m in models if m and not Path(m).exists()]
    cache = hub_cache() if remote else None
    return [cache] if cache else []


def resolve_path(value: str | None, root: Path, key: str, may_be_hub_id: bool = False) -> str | None:
    if value is None or Path(value).is_absolute():
        return value
    beside = root / value
    if beside.exists():
        return str(beside)
    if Path(value).exists():
        raise IterisError(
            f"{key}: '{value}' is not beside the config ({root}); paths in a config are relative to it, and "
            f"'{value}' exists only relative to the working directory. Write '{Path(value).resolve()}' instead"
        )
    if may_be_hub_id:
        return value
    return str(beside)  # (reported as not found where it is read)


def check_name(name: str, where: str) -> None:
    """Adapter names name output sub-directories: one plain path component, never a way out of ``--out``."""
    if not name or not name.strip():
        raise IterisError(f"{where} is empty; give each adapter a name")
    bad = [c for c in name if c in '/\\:*?"<>|' or ord(c) < 32]
    if bad or name in (".", "..") or name.startswith(".") or name != name.strip() or len(name) > 100:
        raise IterisError(
            f"{where} {short(name)} is not a plain name: use letters, digits, '-', '_' and '.', not starting with "
            "'.', at most 100 characters (it names a directory of the output)"
        )
    if name.lower() in _WRITTEN:
        raise IterisError(f"{where} {name!r} is the name of a file the output holds; choose another name")


# files written into an output, which an adapter's sub-directory may not be named after
_WRITTEN = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "merge_report.json", "readme.md",
            "pytorch_lora_weights.safetensors", "config.json", "model.safetensors", "results.json", "results.md"}


def check_device(device: str) -> None:
    """auto, cpu, cuda, cuda:N (or another torch device type with a backend here); never meta."""
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise IterisError(f"device {short(device)} is not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "meta":
        raise IterisError("device: meta holds no numbers; use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise IterisError(f"device '{device}' requested but no CUDA GPU is visible; use device: cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise IterisError(f"device '{device}': only {torch.cuda.device_count()} GPU(s) are visible")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise IterisError(f"device '{device}' is not available here; use auto, cpu, cuda or cuda:N")


def positive_int(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IterisError(f"{where} must be a positive integer, got {short(value)}")


def parse_config(data: dict, root: Path | None = None) -> MergeConfig:
    """Every value through one typed path (``schema.build``), then the checks types cannot express."""
    if not isinstance(data, dict):
        raise IterisError("the merge config must be a mapping with base_model, method and adapters")
    data = dict(data)
    for key in ("base_model", "adapters"):
        if key not in data:
            raise IterisError(f"the merge config has no '{key}'; see the README for a complete example")
    adapters = data["adapters"]
    if not isinstance(adapters, list) or not adapters:
        raise IterisError("'adapters' must be a list of {name, path, data, weight} entries")
    named = []
    for index, entry in enumerate(adapters):
        if isinstance(entry, dict) and "name" not in entry and isinstance(entry.get("path"), str):
            entry = {"name": Path(entry["path"]).name, **entry}
            check_name(entry["name"], f"adapters[{index}].name (taken from its path; set name: to choose another)")
        named.append(entry)
    if data.get("calibration") is None:
        data.pop("calibration", None)
    config = build(MergeConfig, {**data, "adapters": named}, "")
    config.validate()
    if root is not None:
        config.resolve_paths(root)
    return config


def with_overrides(cfg: MergeConfig, overrides: dict) -> MergeConfig:
    """A new config with top-level keys replaced (None leaves a key as it is), checked as the file was."""
    data = asdict(cfg)
    for key, value in overrides.items():
        if key not in data or key == "adapters":
            raise IterisError(f"unknown option '{key}'; the keys of a merge config other than 'adapters' can be overridden")
        if value is None:
            continue
        if key == "calibration" and isinstance(value, dict):
            value = {**data["calibration"], **value}
        elif dataclasses.is_dataclass(value):
            value = asdict(value)
        data[key] = value
    new = parse_config(data)
    new.config_file = cfg.config_file
    return new


def load_config(source) -> MergeConfig:
    """A MergeConfig from a path to YAML, a dict, or a MergeConfig (checked again: a dataclass can be built
    with any values)."""
    if isinstance(source, MergeConfig):
        checked = parse_config(asdict(source))
        checked.config_file = source.config_file
        return checked
    if isinstance(source, dict):
        return parse_config(source)
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise IterisError(f"a merge config is a path to a YAML file, a dict or a MergeConfig, got {short(source)}")
    path = Path(source)
    if not path.is_file():
        raise IterisError(f"config file '{path}' not found")
    config = parse_config(load_yaml(path), root=path.resolve().parent)
    config.config_file = str(path)
    return config
