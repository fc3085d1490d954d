"""The merge configuration (``merge.yaml``): parsed and checked before any long work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import IterisError


@dataclass
class CalibrationConfig:
    samples: int = 50  # per adapter; fewer are used (and reported) if the file holds fewer
    max_length: int = 256  # tokens per sample after truncation
    field: str = "text"  # the sample text's column / key
    prompt_field: str | None = None  # with response_field: prompt + separator + response
    response_field: str | None = None
    target_field: str | None = "target"  # encoder-decoder: the decoder's text, when the record has it
    separator: str = "\n"
    seed: int = 42  # which samples are drawn
    batch_size: int = 8
    generate: bool = False  # causal LMs: append each adapter's own greedy continuation to the sample
    max_new_tokens: int = 64  # for generated decoder targets / continuations
    stats_dtype: str = "auto"  # statistics' accumulation dtype: auto = float64 on CPU, float32 on GPU (solves: float64)
    walk: str = "auto"  # blocks: one block at a time (memory flat in depth); model: whole passes; auto: blocks where possible
    offload_states: bool = False  # keep the block-boundary hidden states in CPU memory (GPU memory flat in samples)
    overlap: str = "auto"  # solve each block while the next is captured (global schedule); auto: on a GPU
    offload_stats: bool = False  # keep finished statistics in CPU memory; a layer group's return to the GPU for its solve
    # several processes (torchrun): adapters = each process captures whole adapters (only finished statistics
    # travel, to the process solving their layer), or with fewer adapters than processes each adapter its own
    # group of processes; samples = each a share of every adapter's samples (raw sums reduced); auto = adapters
    # where either number divides the other
    split: str = "auto"
    # several processes: blocks = each block's weights sharded over them (FSDP2; for models larger than one GPU);
    # off = each holds the whole model; auto = blocks where the checkpoint takes over 40% of one GPU's memory
    shard: str = "auto"
    # diffusion pipelines: each adapter's prompts are sampled by the pipeline itself (its scheduler, its
    # classifier-free guidance) and the denoiser's calls at the recorded steps are the calibration samples
    steps: int = 20  # num_inference_steps of the sampling runs
    timesteps: int | list[int] = 4  # how many of the steps are recorded (evenly spread), or their indices
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # one sampling run per prompt batch and seed
    guidance_scale: float | None = None  # None: the pipeline's default
    height: int | None = None  # image size of the sampling runs; None: the pipeline's default
    width: int | None = None

    def validate(self) -> None:
        for name in ("samples", "max_length", "batch_size", "max_new_tokens"):
            _positive_int(f"calibration.{name}", getattr(self, name))
        if self.stats_dtype not in ("auto", "float32", "float64"):
            raise IterisError("calibration.stats_dtype must be auto, float32 or float64")
        if self.walk not in ("auto", "blocks", "model"):
            raise IterisError(f"calibration.walk must be auto, blocks or model, got {self.walk!r}")
        if self.overlap not in ("auto", "on", "off"):
            raise IterisError(f"calibration.overlap must be auto, on or off, got {self.overlap!r}")
        if self.shard not in ("auto", "blocks", "off"):
            raise IterisError(f"calibration.shard must be auto, blocks or off, got {self.shard!r}")
        if self.split not in ("auto", "adapters", "samples"):
            raise IterisError(f"calibration.split must be auto, adapters or samples, got {self.split!r}")
        for name in ("offload_states", "offload_stats"):
            if not isinstance(getattr(self, name), bool):
                raise IterisError(f"calibration.{name} must be true or false, got {getattr(self, name)!r}")
        _positive_int("calibration.steps", self.steps)
        if isinstance(self.timesteps, list):
            if not self.timesteps or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.timesteps):
                raise IterisError(f"calibration.timesteps must be a count or a list of step indices, got {self.timesteps!r}")
        else:
            _positive_int("calibration.timesteps", self.timesteps)
        if not isinstance(self.seeds, list) or not self.seeds or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in self.seeds
        ):
            raise IterisError(f"calibration.seeds must be a non-empty list of integers, got {self.seeds!r}")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _positive_int(f"calibration.{name}", getattr(self, name))

    def resolved_stats_dtype(self, device: str) -> str:
        """auto: float64 on the CPU (exact, and the CPU has no faster path), float32 on a GPU."""
        if self.stats_dtype != "auto":
            return self.stats_dtype
        return "float64" if device == "cpu" else "float32"


DEVICE_MAPS = (None, "auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class AdapterSpec:
    name: str
    path: str
    data: str | None = None
    weight: float = 1.0
    field: str | None = None  # overrides calibration.field for this adapter's data
    samples: int | None = None
    trigger: str | None = None  # diffusion: put before every prompt that lacks it (a LoRA's trigger word)


@dataclass
class MergeConfig:
    base_model: str
    adapters: list[AdapterSpec]
    model_type: str = "auto"  # auto (a diffusers pipeline directory is detected) | transformers | diffusion
    method: str = "iteris"
    parameters: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tokenizer: str | None = None  # defaults to base_model
    device: str = "auto"
    device_map: str | None = None  # auto | balanced | balanced_low_0 | sequential: spread the model over the GPUs
    dtype: str = "auto"  # model dtype for the forward passes
    rank: int | None = None  # compress the merged LoRA to this rank by SVD (error reported)
    merge_into_base: bool = False  # save a full model instead of an adapter
    modules_to_save: str = "auto"  # auto | per_adapter | drop | <adapter name>
    progress: bool = True

    def validate(self) -> None:
        """Checks that hold for any source of values (YAML, dict, keyword overrides)."""
        self.calibration.validate()
        if not isinstance(self.parameters, dict):
            raise IterisError("'parameters' must be a mapping of the method's parameters")
        if self.rank is not None:
            _positive_int("rank", self.rank)
        if self.model_type not in ("auto", "transformers", "diffusion"):
            raise IterisError(f"model_type must be auto, transformers or diffusion, got {self.model_type!r}")
        if self.device_map not in DEVICE_MAPS:
            raise IterisError(f"device_map must be one of {[m for m in DEVICE_MAPS if m]} (or unset), got {self.device_map!r}")
        if self.device_map and self.device not in ("auto", "cuda"):
            raise IterisError(f"device_map spreads the model over every visible GPU; leave device: auto (got {self.device!r})")
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise IterisError(f"adapter names must be unique, got {names}")
        for index, a in enumerate(self.adapters):
            if isinstance(a.weight, bool) or not isinstance(a.weight, (int, float)) or a.weight != a.weight:
                raise IterisError(f"adapters[{index}]: 'weight' must be a number, got {a.weight!r}")
            if a.samples is not None:
                _positive_int(f"adapters[{index}].samples", a.samples)
        policies = ("auto", "per_adapter", "drop")
        if self.modules_to_save not in policies and self.modules_to_save not in names:
            raise IterisError(
                f"modules_to_save must be one of {list(policies)} or an adapter name {names}, got '{self.modules_to_save}'"
            )

    def resolve_paths(self, root: Path) -> None:
        """Relative paths in a YAML file are relative to the file, as a user reading it would expect."""

        def fix(p):
            if p is None:
                return None
            candidate = root / p
            return str(candidate) if not Path(p).is_absolute() and candidate.exists() else p

        self.base_model = fix(self.base_model)
        self.tokenizer = fix(self.tokenizer)
        for a in self.adapters:
            a.path = fix(a.path)
            a.data = fix(a.data)


def build_section(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise IterisError(f"{where} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise IterisError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise IterisError(f"{where}: {exc}") from None


def _positive_int(where: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise IterisError(f"{where} must be a positive integer, got {value!r}")


def parse_config(data: dict, root: Path | None = None) -> MergeConfig:
    if not isinstance(data, dict):
        raise IterisError("the merge config must be a mapping with base_model, method and adapters")
    data = dict(data)
    for key in ("base_model", "adapters"):
        if key not in data:
            raise IterisError(f"the merge config has no '{key}'; see the README for a complete example")
    adapters_raw = data.pop("adapters")
    if not isinstance(adapters_raw, list) or len(adapters_raw) < 1:
        raise IterisError("'adapters' must be a list of {name, path, data, weight} entries")
    adapters = []
    for index, entry in enumerate(adapters_raw):
        if isinstance(entry, dict) and "name" not in entry and "path" in entry:
            entry = {"name": Path(str(entry["path"])).name, **entry}
        adapters.append(build_section(AdapterSpec, entry, f"adapters[{index}]"))
    calibration = build_section(CalibrationConfig, data.pop("calibration", None) or {}, "calibration")
    config = build_section(MergeConfig, {**data, "adapters": adapters, "calibration": calibration}, "merge config")
    config.validate()
    if root is not None:
        config.resolve_paths(root)
    return config


def load_config(source) -> MergeConfig:
    """A MergeConfig from a path to YAML, a dict, or a MergeConfig."""
    if isinstance(source, MergeConfig):
        return source
    if isinstance(source, dict):
        return parse_config(source)
    path = Path(source)
    if not path.is_file():
        raise IterisError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise IterisError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_config(data, root=path.resolve().parent)
