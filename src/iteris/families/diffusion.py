"""Text-to-image pipelines (diffusers): calibration calls recorded from the pipeline's own sampling loop, one
unit per component the adapters touch (``diffusion_lora.py`` reads and writes the LoRA files).

Text encoders come first: their inputs (the prompts' tokens) do not depend on anything merged. The denoiser
comes last; its calibration samples are its own calls at chosen steps of each adapter's own sampling run
(latents, timestep and conditioning, classifier-free guidance batched in as the pipeline does it), and its
merged model receives the merged text encoders' conditioning for the same prompts.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import LoraAdapter, check_compatible, check_lora_values, check_weights, target_modules
from ..config import MergeConfig
from ..data import load_records, select_samples
from ..deltas import LowRankDelta
from ..engine import EngineOptions
from ..engine.forward import CallSample, StopForward, token_batcher
from ..engine.inject import MERGED, DeltaInjector, own
from ..engine.layers import check_layer_shapes, is_pointwise_conv, resolve_layers
from ..errors import IterisError
from ..files import check_pickle
from ..finite import check_parameters
from ..card import merge_card, write_card
from ..output import write_report
from ..plots import merge_figures
from ..placement import atomic_directory
from ..run import Unit, peak_memory
from .diffusion_lora import DENOISERS, LORA_FILES, lora_components, lora_file, read_lora, write_pipeline_lora
from .loading import check_checkpoint_pickles, loading_error, resolve_device, resolve_dtype


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


# keyword arguments of a denoiser call that are not conditioning: what the merged model shares with the own
_NOT_CONDITIONING = frozenset({"sample", "hidden_states", "timestep", "return_dict"})


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

    def save(self, out: str | Path, force: bool = False, plot: bool = False) -> Path:
        start = time.perf_counter()
        with atomic_directory(out, force, self.config.inputs()) as tmp:
            write_pipeline_lora(tmp, self.pipeline_class, self.deltas, self.conv_layers)
            self.report["timings"]["write"] = time.perf_counter() - start
            write_report(tmp, self.report)
            figures = merge_figures(self.report, tmp) if plot else []
            write_card(tmp, merge_card(self.report, self.config, library="diffusers", pipeline_tag="text-to-image",
                                       files=figures))
        return Path(out)


class PipelineJob:
    """A diffusers pipeline: one unit per component the adapters touch, text encoders first."""

    @staticmethod
    def check_files(cfg: MergeConfig, needs_calibration: bool) -> list[dict]:
        """What can be checked without loading the pipeline (a dry run): each adapter's LoRA file and its
        prompts. Reading a LoRA into the pipeline's layers needs the pipeline itself."""
        files = [lora_file(s.path) for s in cfg.adapters]
        batches = _prompt_batches(cfg) if needs_calibration else [[] for _ in cfg.adapters]
        return [{"name": s.name, "file": str(f), "prompts": sum(len(b) for b in bs)}
                for s, f, bs in zip(cfg.adapters, files, batches)]

    @staticmethod
    def check(cfg: MergeConfig) -> None:
        if cfg.merge_into_base:
            raise IterisError("merge_into_base writes a transformers model; for a pipeline, load the merged LoRA and "
                              "call pipe.fuse_lora() (then pipe.save_pretrained)")

    def __init__(self, cfg: MergeConfig, spec, params, weights: list[float], ranks=None):
        self.cfg, self.spec = cfg, spec
        self.units: list[Unit] = []
        if spec.needs_calibration:
            self.prompts = _prompt_batches(cfg)  # data errors before the pipeline loads
        for s in cfg.adapters:
            if lora_file(s.path).suffix != ".safetensors":
                check_pickle(lora_file(s.path), "LoRA weights")
        self.device = resolve_device(cfg.device)
        pipe = self.pipe = load_pipeline(cfg.base_model, resolve_dtype(cfg.dtype, self.device), self.device,
                                         cfg.trust_remote_code)
        per_adapter = [read_lora(pipe, s.name, s.path) for s in cfg.adapters]
        for per_component in per_adapter:
            for adapter in per_component.values():
                check_lora_values(adapter)
        components = [c for c in lora_components(pipe) if any(c in a for a in per_adapter)]
        adapters = {
            c: [a.get(c) or LoraAdapter(name=s.name, path=Path(s.path), config={"component": c}, modules={})
                for a, s in zip(per_adapter, cfg.adapters)]
            for c in components
        }
        self.report: dict = {
            "method": spec.name, "parameters": asdict(params), "base_model": cfg.base_model,
            "pipeline": type(pipe).__name__,
            "adapters": [{"name": s.name, "path": str(s.path), "weight": w,
                          "components": {c: len(adapters[c][i].modules) for c in components}}
                         for i, (s, w) in enumerate(zip(cfg.adapters, weights))],
            "layers": sum(len(target_modules(adapters[c])) for c in components),
            "components": {}, "timings": {},
        }
        for c in components:
            check_compatible(adapters[c])
            check_weights(adapters[c], weights, spec.needs_calibration)
            layers = resolve_layers(getattr(pipe, c), target_modules(adapters[c]))
            check_layer_shapes(layers, adapters[c])
            entry = self.report["components"][c] = {"layers": len(layers), "timings": {}}
            self.units.append(Unit(name=c, adapters=adapters[c], report=entry, device=self.device,
                                   model=getattr(pipe, c), layers=layers))
        if spec.needs_calibration:
            self._record()

    def _record(self) -> None:
        """Each adapter's own sampling runs, every component's calls recorded (the calibration samples)."""
        calls = self.calls = {u.name: [] for u in self.units}  # per adapter: (prompt batch, position in step, call)
        try:
            for unit in self.units:
                unit.inject(unit.model, unit.layers)
            for i in range(len(self.cfg.adapters)):
                with contextlib.ExitStack() as stack:
                    for unit in self.units:
                        stack.enter_context(unit.injector.use(own(i)))
                    recorded = record_calls(self.pipe, [u.name for u in self.units], self.prompts[i],
                                            self.cfg.calibration)
                for unit in self.units:
                    calls[unit.name].append(recorded[unit.name])
        except BaseException:
            self.close()
            raise
        options = EngineOptions.of(self.cfg.calibration, self.device, progress=self.cfg.progress,
                                   batch_size=1)  # (recorded calls run one at a time)
        for unit in self.units:
            unit.options, unit.batcher = options, token_batcher(0, self.device)

    def before(self, unit: Unit, merged: dict[str, dict[str, LowRankDelta]]) -> None:
        if not self.spec.needs_calibration:
            return
        calls = self.calls[unit.name]
        if unit.name in DENOISERS and merged:
            _merged_conditioning(self.pipe, unit.name, {u.name: u.layers for u in self.units}, merged, calls,
                                 self.prompts, self.cfg.calibration)
        unit.samples = [[call for _, _, call in task] for task in calls]
        if any(not s for s in unit.samples):
            raise IterisError(f"{unit.name}: an adapter's sampling run never called it; nothing to calibrate on")
        engine = unit.build_engine()
        unit.report["calibration"] = {"calls": [len(s) for s in unit.samples],
                                      "walk": "blocks" if engine.walks_blocks else "model",
                                      "layer_groups": len(engine.groups),
                                      "stats_dtype": str(unit.options.stats_dtype).replace("torch.", "")}

    def close(self) -> None:
        for unit in self.units:
            unit.close()

    def finish(self, merged: dict, errors: dict, t0: float) -> PipelineMergeResult:
        report = self.report
        for unit in self.units:
            entry, errs = unit.report, errors[unit.name]
            entry["output"] = {"exact": all(e == 0.0 for e in errs.values()),
                               "ranks": sorted({d.rank for d in merged[unit.name].values()}), "relative_error": errs}
        report["output"] = {"exact": all(e["output"]["exact"] for e in report["components"].values()),
                            "file": LORA_FILES[0]}
        report["peak_memory"] = peak_memory()
        report["timings"]["total"] = time.perf_counter() - t0
        report["summary"] = _summary(report)
        conv = {u.name: {n for n, m in u.layers.items() if is_pointwise_conv(m)} for u in self.units}
        return PipelineMergeResult(deltas=merged, report=report, config=self.cfg, pipeline_class=type(self.pipe),
                                   conv_layers=conv)


def _merged_conditioning(pipe, denoiser: str, layers, merged, denoiser_calls, batches, cal) -> None:
    """Give each recorded denoiser call the conditioning the merged text encoders produce for its prompts."""
    injectors = []
    try:
        for c, deltas in merged.items():
            injector = DeltaInjector(getattr(pipe, c), layers[c])
            injector.set_variant(MERGED, deltas)
            injectors.append(injector)
        with contextlib.ExitStack() as stack:
            for injector in injectors:
                stack.enter_context(injector.use(MERGED))
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
