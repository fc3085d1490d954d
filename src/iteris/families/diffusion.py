"""Text-to-image pipelines (diffusers): LoRAs read as diffusers reads them, calibration calls recorded from
the pipeline's own sampling loop, the merged LoRA written as diffusers writes it.

A merge covers every component the adapters touch. Text encoders come first: their inputs (the prompts'
tokens) do not depend on anything merged. The denoiser comes last; its calibration samples are its own
calls at chosen steps of each adapter's own sampling run (latents, timestep and conditioning, classifier-
free guidance batched in as the pipeline does it), and its merged model receives the merged text
encoders' conditioning for the same prompts.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import LoraAdapter, LoraModule, check_compatible, check_lora_values, check_weights, target_modules
from .config import MergeConfig
from .data import load_records, select_samples
from .deltas import LowRankDelta
from .errors import IterisError
from .files import check_pickle, load_pickle_tensors
from .finite import check_parameters
from .models import (
    CallSample, StopForward, check_checkpoint_pickles, check_layer_shapes, is_pointwise_conv, loading_error,
    resolve_device, resolve_dtype, resolve_layers,
)

DENOISERS = ("unet", "transformer", "prior")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# keyword arguments of a denoiser call that are not conditioning: what the merged model shares with the own
_NOT_CONDITIONING = frozenset({"sample", "hidden_states", "timestep", "return_dict"})


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_pipeline(path: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False):
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise IterisError("merging a diffusers pipeline needs diffusers: pip install 'iteris[diffusion]'") from None

    check_checkpoint_pickles(path)
    try:
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise loading_error(exc, "a diffusers pipeline", path) from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in lora_components(pipe):
        getattr(pipe, name).eval().requires_grad_(False)
        check_parameters(getattr(pipe, name), f"pipeline '{path}', component {name}")
    return pipe


def lora_components(pipe) -> list[str]:
    """The pipeline's components that LoRAs may touch: text encoders first, the denoiser last."""
    names = [n for n in getattr(pipe, "_lora_loadable_modules", []) if getattr(pipe, n, None) is not None]
    if not names:
        raise IterisError(f"{type(pipe).__name__} does not load LoRAs (diffusers lists no LoRA-loadable components)")
    return sorted(names, key=lambda n: n in DENOISERS)


# ------------------------------------------------------------------------------------------------ reading


def _lora_file(path: str | Path) -> Path:
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
    import inspect

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
    file = _lora_file(path)
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


# ------------------------------------------------------------------------------------------------ calibration


def recorded_steps(steps: int, timesteps) -> list[int]:
    """Which denoising steps are recorded: ``timesteps`` evenly spread ones, or the listed step indices."""
    if isinstance(timesteps, int):
        if timesteps >= steps:
            return list(range(steps))
        return sorted({round(i * (steps - 1) / max(timesteps - 1, 1)) for i in range(timesteps)})
    chosen = sorted({int(t) for t in timesteps})
    if not chosen or chosen[0] < 0 or chosen[-1] >= steps:
        raise IterisError(f"calibration.timesteps lists step indices {chosen}; they must lie in 0..{steps - 1}")
    return chosen


def _pipe_kwargs(cal) -> dict:
    kwargs = {"num_inference_steps": cal.steps, "output_type": "latent"}
    for key in ("guidance_scale", "height", "width"):
        if getattr(cal, key) is not None:
            kwargs[key] = getattr(cal, key)
    return kwargs


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


class _Steps:
    """Where a sampling run is: its loop's step (counted by the pipeline's step-end callback where it takes
    one, so that pipelines calling the denoiser more than once a step are followed; else one denoiser call a
    step) and the denoiser call's position within that step."""

    def __init__(self, pipe):
        import inspect

        self.pipe = pipe
        self.by_callback = "callback_on_step_end" in inspect.signature(type(pipe).__call__).parameters
        self.stop_after: int | None = None
        self.reset()

    def reset(self) -> None:
        self.step, self.position = 0, 0

    def run_kwargs(self) -> dict:
        return {"callback_on_step_end": self._step_end} if self.by_callback else {}

    def _step_end(self, pipe, index, timestep, callback_kwargs):
        self.step, self.position = index + 1, 0
        if self.stop_after is not None and index >= self.stop_after:
            raise StopForward  # the later steps are not wanted: no need to run them
        return {}

    def denoiser_call(self) -> tuple[int, int]:
        """(step, position within the step) of the denoiser call about to run."""
        if self.by_callback:
            self.position += 1
            return self.step, self.position - 1
        self.step += 1
        return self.step - 1, 0

    def loop_length(self, default: int) -> int:
        """Steps of the pipeline's loop: the scheduler's timesteps (two a step for second-order schedulers)."""
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) else default


@torch.no_grad()
def record_calls(pipe, components: list[str], prompt_batches: list[list[str]], cal) -> dict[str, list[tuple]]:
    """Every call the components receive while the pipeline samples each prompt batch for each seed: the
    text encoders' calls, and the denoiser's at the recorded steps of the pipeline's loop (all of a step's
    calls; the run stops after the last recorded step). Each call is tagged (prompt batch, position within
    its step)."""
    denoiser = next((c for c in components if c in DENOISERS), None)
    calls: dict[str, list[tuple]] = {c: [] for c in components}
    where = _Steps(pipe)
    state = {"batch": 0, "chosen": None}

    def recorder(component):
        def hook(module, args, kwargs):
            sample = CallSample(args=_detached(tuple(args)), kwargs=_detached(dict(kwargs)))
            if component != denoiser:
                calls[component].append((state["batch"], 0, sample))
                return
            if state["chosen"] is None:  # the scheduler's timesteps are set once the loop starts
                state["chosen"] = recorded_steps(where.loop_length(cal.steps), cal.timesteps)
                where.stop_after = state["chosen"][-1]
            step, position = where.denoiser_call()
            if step in state["chosen"]:
                calls[component].append((state["batch"], position, sample))
            if not where.by_callback and step >= state["chosen"][-1]:
                raise StopForward

        return hook

    handles = [getattr(pipe, c).register_forward_pre_hook(recorder(c), with_kwargs=True) for c in components]
    try:
        for b, prompts in enumerate(prompt_batches):
            for seed in cal.seeds:
                state["batch"] = b
                where.reset()
                with contextlib.suppress(StopForward):
                    pipe(prompt=prompts, generator=torch.Generator("cpu").manual_seed(int(seed)), **_pipe_kwargs(cal),
                         **where.run_kwargs())
    finally:
        for h in handles:
            h.remove()
    return calls


@torch.no_grad()
def conditioning(pipe, denoiser: str, prompt_batches: list[list[str]], cal) -> list[list[dict]]:
    """What the denoiser receives besides latents and timestep, per prompt batch and position within a step
    (a pipeline may call it once for the conditional and once for the unconditional branch), as the pipeline
    stands (its text encoders as currently set): the first step of sampling only."""
    out: list[list[dict]] = []
    where = _Steps(pipe)
    where.stop_after = 0

    def hook(module, args, kwargs):
        step, _ = where.denoiser_call()
        if step > 0:
            raise StopForward
        out[-1].append({k: _detached(v) for k, v in kwargs.items() if k not in _NOT_CONDITIONING})
        if not where.by_callback:
            raise StopForward

    handle = getattr(pipe, denoiser).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for prompts in prompt_batches:
            out.append([])
            where.reset()
            with contextlib.suppress(StopForward):
                pipe(prompt=prompts, generator=torch.Generator("cpu").manual_seed(int(cal.seeds[0])), **_pipe_kwargs(cal),
                     **where.run_kwargs())
    finally:
        handle.remove()
    return out


def _prompt_batches(cfg: MergeConfig) -> list[list[list[str]]]:
    out = []
    for spec in cfg.adapters:
        if not spec.data:
            raise IterisError(f"this method needs calibration prompts: set `data:` for adapter '{spec.name}'")
        records = load_records(spec.data)
        field_name = spec.field or cfg.calibration.field
        if field_name not in records[0] and "prompt" in records[0]:
            field_name = "prompt"  # what prompt files usually call it
        texts = [s.text for s in select_samples(records, cfg.calibration, spec.data, field=field_name, samples=spec.samples)]
        if spec.trigger:
            texts = [t if spec.trigger in t else f"{spec.trigger} {t}" for t in texts]
        size = cfg.calibration.batch_size
        out.append([texts[i : i + size] for i in range(0, len(texts), size)])
    return out


# ------------------------------------------------------------------------------------------------ merging


@dataclass
class PipelineMergeResult:
    """The merged LoRA of each component, ready to be written as one diffusers LoRA file."""

    deltas: dict[str, dict[str, LowRankDelta]]  # component -> layer -> factors
    report: dict
    config: MergeConfig
    pipeline_class: type
    conv_layers: dict[str, set[str]]  # component -> layers that are 1x1 convolutions (their factors are 4-D)

    @property
    def summary(self) -> str:
        return self.report.get("summary", "")

    def save(self, out: str | Path, force: bool = False) -> Path:
        from .output import write_report
        from .placement import atomic_directory

        start = time.perf_counter()
        with atomic_directory(out, force, self.config.inputs()) as tmp:
            write_pipeline_lora(tmp, self.pipeline_class, self.deltas, self.conv_layers)
            self.report["timings"]["write"] = time.perf_counter() - start
            write_report(tmp, self.report)
        return Path(out)


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
    import inspect

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


def merge_pipeline(cfg: MergeConfig, spec, params, out=None, force: bool = False) -> PipelineMergeResult:
    """``iteris merge`` for a diffusers pipeline (called by ``merge``, which has checked the config)."""
    from .merge import peak_memory, run_method, to_lora
    from .calibration import Calibration
    from .capture import DeltaInjector
    from .methods import MergeContext
    from .placement import check_output_dir

    t0 = time.perf_counter()
    if cfg.merge_into_base:
        raise IterisError("merge_into_base writes a transformers model; for a pipeline, load the merged LoRA and "
                          "call pipe.fuse_lora() (then pipe.save_pretrained)")
    if out is not None:
        check_output_dir(out, force, cfg.inputs())
    if spec.needs_calibration:
        batches = _prompt_batches(cfg)  # data errors before the pipeline loads
    for s in cfg.adapters:
        if _lora_file(s.path).suffix != ".safetensors":
            check_pickle(_lora_file(s.path), "LoRA weights")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = load_pipeline(cfg.base_model, dtype, device, cfg.trust_remote_code)
    per_adapter = [read_lora(pipe, s.name, s.path) for s in cfg.adapters]
    for per_component in per_adapter:
        for adapter in per_component.values():
            check_lora_values(adapter)
    components = [c for c in lora_components(pipe) if any(c in a for a in per_adapter)]
    weights = [float(s.weight) for s in cfg.adapters]
    adapters = {
        c: [a.get(c) or LoraAdapter(name=s.name, path=Path(s.path), config={"component": c}, modules={})
            for a, s in zip(per_adapter, cfg.adapters)]
        for c in components
    }
    report: dict = {
        "method": spec.name, "parameters": asdict(params), "base_model": cfg.base_model,
        "pipeline": type(pipe).__name__,
        "adapters": [{"name": s.name, "path": str(s.path), "weight": w,
                      "components": {c: len(adapters[c][i].modules) for c in components}}
                     for i, (s, w) in enumerate(zip(cfg.adapters, weights))],
        "layers": sum(len(target_modules(adapters[c])) for c in components),
        "components": {}, "timings": {},
    }
    layers = {}
    for c in components:
        check_compatible(adapters[c])
        check_weights(adapters[c], weights, spec.needs_calibration)
        layers[c] = resolve_layers(getattr(pipe, c), target_modules(adapters[c]))
        check_layer_shapes(layers[c], adapters[c])

    calls = {}
    injectors: dict[str, DeltaInjector] = {}
    if spec.needs_calibration:
        stats_dtype = cfg.calibration.resolved_stats_dtype(device)
        for c in components:
            injectors[c] = DeltaInjector(getattr(pipe, c), layers[c])
            for i, a in enumerate(adapters[c]):
                injectors[c].set_variant(f"own:{i}", a.modules)
        calls = {c: [] for c in components}
        try:
            for i in range(len(cfg.adapters)):
                with contextlib.ExitStack() as stack:
                    for c in components:
                        stack.enter_context(injectors[c].use(f"own:{i}"))
                    recorded = record_calls(pipe, components, batches[i], cfg.calibration)
                for c in components:
                    calls[c].append(recorded[c])
        except BaseException:
            for injector in injectors.values():
                injector.remove()
            raise
    report["timings"]["load"] = time.perf_counter() - t0

    merged: dict[str, dict[str, LowRankDelta]] = {}
    for c in components:
        if spec.needs_calibration and c in DENOISERS and merged:
            _merged_conditioning(pipe, c, layers, merged, calls[c], batches, cfg.calibration)
        entry: dict = {"layers": len(layers[c]), "timings": {}}
        calib = None
        try:
            if spec.needs_calibration:
                samples = [[call for _, _, call in task] for task in calls[c]]
                if any(not s for s in samples):
                    raise IterisError(f"{c}: an adapter's sampling run never called it; nothing to calibrate on")
                calib = Calibration(
                    getattr(pipe, c), layers[c], injectors.pop(c), samples, [s.name for s in cfg.adapters], 0, 1,
                    getattr(torch, stats_dtype), cfg.progress, [{}] * len(samples), [{}] * len(samples),
                    walk=cfg.calibration.walk, offload_states=cfg.calibration.offload_states,
                    overlap=cfg.calibration.overlap, offload_stats=cfg.calibration.offload_stats,
                )
                entry["calibration"] = {"calls": [len(s) for s in samples], "walk": "blocks" if calib.walks_blocks else "model",
                                        "layer_groups": len(calib.groups), "stats_dtype": stats_dtype}
            ctx = MergeContext(adapters=adapters[c], weights=weights, targets=target_modules(adapters[c]), params=params,
                               calibration=calib, progress=cfg.progress, device=device)
            raw = run_method(spec, ctx, entry)
        finally:
            if calib is not None:
                calib.close()
        dense_rank = lambda n, ctx=ctx: sum(l.rank for l in ctx.loras(n) if l is not None)  # noqa: E731
        merged[c], errors = to_lora(raw, cfg.rank, default_rank=dense_rank)
        entry["output"] = {"exact": all(e == 0.0 for e in errors.values()),
                           "ranks": sorted({d.rank for d in merged[c].values()}), "relative_error": errors}
        report["components"][c] = entry
    for injector in injectors.values():
        injector.remove()
    report["output"] = {"exact": all(e["output"]["exact"] for e in report["components"].values()),
                        "file": LORA_FILES[0]}
    report["peak_memory"] = peak_memory()
    report["timings"]["total"] = time.perf_counter() - t0
    report["summary"] = _summary(report)
    conv = {c: {n for n, m in layers[c].items() if is_pointwise_conv(m)} for c in components}
    result = PipelineMergeResult(deltas=merged, report=report, config=cfg, pipeline_class=type(pipe), conv_layers=conv)
    if out is not None:
        result.save(out, force=force)
    return result


def _merged_conditioning(pipe, denoiser, layers, merged, denoiser_calls, batches, cal) -> None:
    """Give each recorded denoiser call the conditioning the merged text encoders produce for its prompts."""
    from .capture import DeltaInjector

    injectors = []
    try:
        for c, deltas in merged.items():
            injector = DeltaInjector(getattr(pipe, c), layers[c])
            injector.set_variant("merged", deltas)
            injectors.append(injector)
        with contextlib.ExitStack() as stack:
            for injector in injectors:
                stack.enter_context(injector.use("merged"))
            for task_calls, task_batches in zip(denoiser_calls, batches):
                cond = conditioning(pipe, denoiser, task_batches, cal)
                for b, position, call in task_calls:
                    call.merged = cond[b][min(position, len(cond[b]) - 1)]
    finally:
        for injector in injectors:
            injector.remove()


def _summary(report: dict) -> str:
    names = ", ".join(a["name"] for a in report["adapters"])
    parts = [f"{c}: {e['layers']} layers" for c, e in report["components"].items()]
    exact = "exact" if report["output"]["exact"] else "compressed"
    return (f"{report['method']} merge of {names} into one {report['pipeline']} LoRA ({'; '.join(parts)}; {exact}) "
            f"in {report['timings']['total']:.1f} s")
