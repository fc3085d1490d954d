"""``merge(config)``: the one orchestrator. Config -> family -> (engine) -> method -> result that saves
atomically, for transformers models and diffusers pipelines alike; ``merge_loaded`` for what is already in
memory."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapters import LoraAdapter, check_compatible, check_lora_values, check_weights, target_modules
from .config import CalibrationConfig, load_config, with_overrides
from .deltas import LowRankDelta
from .engine import EngineOptions
from .engine.forward import TokenSample, input_device, token_batcher
from .engine.layers import check_layer_shapes, resolve_layers
from .engine.ranks import from_environment
from .errors import IterisError
from .families.base import Job
from .families.choose import family_for
from .families.transformers import MergeResult
from .methods import get_method
from .placement import check_output_dir
from .plots import require_matplotlib
from .run import Unit, run_unit
from .schema import build

__all__ = ["MergeResult", "merge", "merge_loaded"]


def merge(config, *, out: str | Path | None = None, force: bool = False, plot: bool = False, **overrides):
    """Merge the adapters a config names. ``config``: path to YAML, dict or MergeConfig.

    Keyword overrides replace top-level config keys (method, parameters, device, dtype, rank, ...).
    With ``out``, the result is also saved there (checked before any work starts), with ``plot`` its figures.
    """
    t0 = time.perf_counter()
    if plot:
        require_matplotlib()
    cfg = with_overrides(load_config(config), overrides)  # a new object: the caller's is never changed
    spec = get_method(cfg.method)
    params = spec.parse_params(cfg.parameters)
    weights = [float(s.weight) for s in cfg.adapters]
    ranks = from_environment()  # several processes (torchrun): each one is a rank of this merge
    if ranks is not None:
        if cfg.device_map:
            raise IterisError("device_map spreads one process's model over GPUs; under torchrun each process has its own "
                              "GPU: unset device_map")
        cfg.device = ranks.device
    family = family_for(cfg, ranks)
    family.check(cfg)
    if out is not None:
        check_output_dir(out, force, cfg.inputs())
    job: Job = family(cfg, spec, params, weights, ranks)  # everything loaded and checked
    job.report["timings"]["load"] = time.perf_counter() - t0
    merged, errors = _run_units(job, spec, params, weights, cfg)
    result = job.finish(merged, errors, t0)
    if out is not None and (ranks is None or ranks.main):  # only rank 0 writes, once every rank has finished
        result.save(out, force=force, plot=plot)
    if ranks is not None:
        ranks.barrier()
        del job, merged  # the model (sharded, it holds the process group) goes before the group does
        ranks.close()
    return result


def _run_units(job: Job, spec, params, weights: list[float], cfg) -> tuple[dict, dict]:
    """Each unit merged in turn (told of those merged before it); the units' hooks removed however it ends."""
    merged, errors = {}, {}
    try:
        for unit in job.units:
            job.before(unit, merged)
            merged[unit.name], errors[unit.name] = run_unit(spec, params, weights, unit, cfg.rank, cfg.progress)
    finally:
        job.close()
    return merged, errors


@dataclass
class _Weights:
    """merge_loaded's weights, read through the same typed path as a config's (finite numbers)."""

    weights: list[float]


def merge_loaded(
    model,
    adapters: list[LoraAdapter],
    samples: list[list[TokenSample]],
    *,
    method: str = "iteris",
    parameters: dict | None = None,
    weights: list[float] | None = None,
    pad_id: int = 0,
    calibration: CalibrationConfig | dict | None = None,
    progress: bool = False,
) -> tuple[dict[str, LowRankDelta], dict]:
    """Merge adapters already in memory on a model already loaded (any device, any dtype).

    For notebooks and benchmarks: ``samples`` are each adapter's calibration token ids; nothing is read
    from or written to disk. Returns the merged LoRA factors per layer and the report.
    """
    spec = get_method(method)
    params = spec.parse_params(parameters)
    cal = build(CalibrationConfig, asdict(calibration) if isinstance(calibration, CalibrationConfig)
                else (calibration or {}), "calibration")
    cal.validate()
    check_compatible(adapters)
    for adapter in adapters:
        check_lora_values(adapter)
    targets = target_modules(adapters)
    weights = build(_Weights, {"weights": weights if weights is not None else [1.0] * len(adapters)}, "").weights
    if len(weights) != len(adapters):
        raise IterisError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    check_weights(adapters, weights, spec.needs_calibration)
    if spec.needs_calibration and len(samples) != len(adapters):
        raise IterisError(f"{len(samples)} sample lists for {len(adapters)} adapters; give each adapter its samples")
    if spec.needs_calibration and not all(samples):
        raise IterisError("every adapter needs at least one calibration sample")
    layers = resolve_layers(model, targets)
    check_layer_shapes(layers, adapters)
    device = input_device(model)  # a model spread over GPUs takes its inputs where its embeddings are
    report: dict = {"method": spec.name, "parameters": asdict(params), "timings": {}}
    unit = Unit(name="", adapters=adapters, report=report, device=device)
    if spec.needs_calibration:
        unit.samples, unit.batcher = samples, token_batcher(pad_id, device)
        unit.options = EngineOptions.of(cal, device, progress=progress)
        try:
            unit.inject(model, layers)
            engine = unit.build_engine()
        except BaseException:
            unit.close()
            raise
        report["calibration"] = {"walk": "blocks" if engine.walks_blocks else "model",
                                 "stats_dtype": str(unit.options.stats_dtype).replace("torch.", "")}
    deltas, _ = run_unit(spec, params, weights, unit, None, progress)
    report["timings"]["to_cpu"] = report["timings"].pop("compress")  # (this report's name for it)
    return deltas, report
