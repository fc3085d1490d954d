"""``merge(config)``: check everything, run the chosen method, return a result that saves atomically."""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import LoraAdapter, check_compatible, check_lora_values, check_weights, load_adapter, target_modules
from .config import CalibrationConfig, MergeConfig, load_config, with_overrides
from .data import load_records, select_samples
from .models import TokenSample
from .deltas import DenseDelta, LowRankDelta
from .errors import IterisError
from .finite import NonFiniteOutputs, check_deltas
from .methods import MergeContext, get_method
from .output import write_adapter, write_merged_model, write_report
from .placement import atomic_directory, check_output_dir
from .schema import build

log = logging.getLogger("iteris")


@dataclass
class MergeResult:
    """The merged LoRA (``deltas``, exact unless compressed), what to write beside it, and the report."""

    deltas: dict[str, LowRankDelta]
    report: dict
    config: MergeConfig
    adapters: list[LoraAdapter]
    # output sub-directory ("" = the output itself) -> modules_to_save tensors written with the LoRA
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {"": {}})

    @property
    def summary(self) -> str:
        return self.report.get("summary", "")

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write the adapter(s) and merge_report.json; nothing is left behind if this fails."""
        start = time.perf_counter()
        cfg = self.config
        check_deltas(self.deltas, "the merged adapter", written_as=torch.float32)
        with atomic_directory(out, force, cfg.inputs()) as tmp:
            for sub, extras in self.heads.items():
                target = tmp / sub if sub else tmp
                if cfg.merge_into_base:
                    staging = tmp / ".adapter" / (sub or "_")
                    write_adapter(staging, self.deltas, self.adapters, cfg.base_model, extras)
                    write_merged_model(
                        target, staging, cfg.base_model, self.adapters[0].task_type, extras, cfg.tokenizer or cfg.base_model,
                        cfg.trust_remote_code,
                    )
                else:
                    write_adapter(target, self.deltas, self.adapters, cfg.base_model, extras)
            if cfg.merge_into_base:
                import shutil

                shutil.rmtree(tmp / ".adapter")
            self.report["timings"]["write"] = time.perf_counter() - start
            write_report(tmp, self.report)
        return Path(out)


def peak_memory() -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"cpu_max_rss_mb": rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def resolve_heads(adapters: list[LoraAdapter], policy: str):
    """What each model variant uses for PEFT ``modules_to_save`` copies, and what gets written.

    Returns (own overrides per adapter, merged-model overrides per task, {output sub-dir: tensors}).
    """
    own = [dict(a.extra_tensors) for a in adapters]
    carriers = [a for a in adapters if a.extra_tensors]
    names = [a.name for a in adapters]
    if not carriers or policy == "drop":
        return own, [{} for _ in adapters], {"": {}}
    if policy == "per_adapter":
        return own, own, {a.name: dict(a.extra_tensors) for a in adapters}
    if policy in names:
        chosen = adapters[names.index(policy)].extra_tensors
        return own, [chosen for _ in adapters], {"": dict(chosen)}
    reference = carriers[0].extra_tensors
    for other in carriers[1:]:
        same = set(other.extra_tensors) == set(reference) and all(
            torch.equal(other.extra_tensors[k], reference[k]) for k in reference
        )
        if not same:
            modules = sorted({k.rsplit(".", 1)[0] for k in reference} | {k.rsplit(".", 1)[0] for k in other.extra_tensors})
            raise IterisError(
                f"adapters '{carriers[0].name}' and '{other.name}' carry different trained copies of {modules} "
                "(PEFT modules_to_save, e.g. a task head); one merged adapter can hold only one. Set "
                "`modules_to_save: per_adapter` to write the merged LoRA once per adapter with that adapter's own "
                f"copy, `modules_to_save: <adapter name>` to keep one adapter's, or `modules_to_save: drop`"
            )
    return own, [reference for _ in adapters], {"": dict(reference)}


def _prepare_calibration(cfg: MergeConfig, adapters: list[LoraAdapter], targets: list[str], own, merged, report,
                         ranks=None):
    from . import models, sharding, vision
    from .calibration import Calibration
    from .capture import DeltaInjector

    missing = [s.name for s in cfg.adapters if not s.data]
    if missing:
        raise IterisError(f"this method needs calibration samples: set `data:` for adapter(s) {missing}")
    config = models.load_model_config(cfg.base_model, cfg.trust_remote_code)
    _fit_positions(cfg.calibration, models.max_positions(config))
    images = vision.reads_images(config)
    if images and cfg.calibration.generate:
        raise IterisError("calibration.generate writes text continuations; this model reads images: give the texts "
                          "(captions, prompts) in the data, or leave them out")
    texts = []
    for spec in cfg.adapters:
        records = load_records(spec.data)
        texts.append(select_samples(records, cfg.calibration, spec.data, field=spec.field, samples=spec.samples,
                                    image_field=vision.IMAGE_FIELD if images else None))

    device = models.resolve_device(cfg.device)
    if cfg.device_map and not device.startswith("cuda"):
        raise IterisError("device_map spreads the model over GPUs, and no CUDA GPU is visible; unset device_map")
    dtype = models.resolve_dtype(cfg.dtype, device)
    all_extras = {k: v for a in adapters for k, v in a.extra_tensors.items()}
    if images:
        processor = vision.load_processor(cfg.tokenizer or cfg.base_model, cfg.trust_remote_code)
        tokenizer, pad_id = getattr(processor, "tokenizer", None), vision.pad_id(processor)
    else:
        tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.base_model, cfg.trust_remote_code)
        pad_id = tokenizer.pad_token_id
    model = None
    sharded = sharding.wanted(cfg.calibration.shard, cfg.base_model, ranks)
    if sharded:  # (shard: auto holds the model whole where it cannot be sharded; blocks says why)
        try:
            if images or cfg.calibration.generate:
                raise sharding.NotShardable(
                    "a model sharded over processes is run block by block on text samples only: "
                    f"{'it reads images' if images else 'calibration.generate runs it whole'}; set calibration.shard: "
                    "off (and start as many processes as the model fits)")
            model = sharding.load_sharded(cfg.base_model, adapters[0].task_type, all_extras, dtype, targets, ranks,
                                          cfg.trust_remote_code)
        except sharding.NotShardable:
            if cfg.calibration.shard == "blocks":
                raise
            sharded = False
        if model is not None:
            models.set_pad_id(model, tokenizer)
    if model is None:
        model = models.load_base_model(cfg.base_model, adapters[0].task_type, all_extras, dtype, device, tokenizer,
                                       device_map=cfg.device_map, trust_remote_code=cfg.trust_remote_code)
    if cfg.device_map:
        device = models.input_device(model)
    layers = models.resolve_layers(model, targets)
    models.check_layer_shapes(layers, adapters)
    kind = models.model_kind(model)
    if cfg.calibration.generate and kind == "encoder":
        raise IterisError("calibration.generate needs a model that generates text; this one is an encoder")

    if images:
        samples = [vision.image_samples(processor, t, spec.data) for t, spec in zip(texts, cfg.adapters)]
    else:
        samples = [models.tokenize_samples(tokenizer, t, model, cfg.calibration.max_length, cfg.calibration.generate)
                   for t in texts]
    for spec, s in zip(cfg.adapters, samples):
        if not s:
            raise IterisError(f"adapter '{spec.name}': no calibration sample survived tokenisation")
    stats_dtype = cfg.calibration.resolved_stats_dtype(device)
    injector = DeltaInjector(model, layers)
    try:
        for i, adapter in enumerate(adapters):
            injector.set_variant(f"own:{i}", adapter.modules)
            if images:
                continue
            with injector.use(f"own:{i}", own[i]):  # what each adapter's own model writes, where it must
                try:
                    samples[i] = models.complete_samples(
                        model, tokenizer, samples[i], cfg.calibration.generate, cfg.calibration.max_new_tokens,
                        cfg.calibration.batch_size, device,
                    )
                except NonFiniteOutputs as exc:
                    raise IterisError(f"adapter '{adapter.name}': generating its calibration targets, {exc}; check "
                                      "the adapter and the dtype (float16 overflow)") from None
        calib = Calibration(
            model, layers, injector, samples, [s.name for s in cfg.adapters], pad_id,
            cfg.calibration.batch_size, getattr(torch, stats_dtype), cfg.progress, own, merged,
            walk=cfg.calibration.walk, offload_states=cfg.calibration.offload_states, overlap=cfg.calibration.overlap,
            offload_stats=cfg.calibration.offload_stats, ranks=ranks, split=cfg.calibration.split, sharded=sharded,
        )
    except BaseException:
        injector.remove()
        raise
    report["calibration"] = {
        "device": device,
        **({"devices": sorted({str(p.device) for p in model.parameters()})} if cfg.device_map else {}),
        "dtype": str(dtype).replace("torch.", ""),
        "stats_dtype": stats_dtype,
        "model_kind": "images" if images else kind,
        "walk": "blocks" if calib.walks_blocks else "model",
        **({"sharded_over_processes": ranks.world} if sharded else {}),
        "layer_groups": len(calib.groups),
        "layers": len(layers),
        "shared_input_groups": {g.name: g.members for g in calib.groups if len(g.members) > 1},
    }
    for entry, spec, s in zip(report["adapters"], cfg.adapters, samples):
        entry["samples"] = len(s)
        if images:
            entry["images"] = len(s)
            entry["tokens"] = sum(len(x.input_ids or []) for x in s)
        else:
            entry["tokens"] = sum(x.tokens for x in s)
        if len(s) < (spec.samples or cfg.calibration.samples):
            entry["note"] = f"only {len(s)} usable samples in {spec.data}"
    return calib


def _fit_positions(cal: CalibrationConfig, positions: int | None) -> None:
    """Samples no longer than the model's position table (with room for generated tokens): longer ones are
    cut to it, said aloud when the length was chosen rather than left at its default."""
    if positions is None:
        return
    room = positions - (cal.max_new_tokens if cal.generate else 0)
    if room < 1:
        raise IterisError(f"calibration.max_new_tokens {cal.max_new_tokens} leaves no room for a prompt in the base "
                          f"model's {positions} positions; lower it")
    if cal.max_length > room:
        if cal.max_length != CalibrationConfig.max_length:
            log.warning("calibration.max_length %d is beyond the base model's %d positions%s: samples are cut to %d "
                        "tokens", cal.max_length, positions, " (less max_new_tokens)" if cal.generate else "", room)
        cal.max_length = room


def merge(config, *, out: str | Path | None = None, force: bool = False, **overrides):
    """Merge the adapters a config names. ``config``: path to YAML, dict or MergeConfig.

    Keyword overrides replace top-level config keys (method, parameters, device, dtype, rank, ...).
    With ``out``, the result is also saved there (checked before any work starts).
    """
    t0 = time.perf_counter()
    cfg = with_overrides(load_config(config), overrides)  # a new object: the caller's is never changed
    spec = get_method(cfg.method)
    params = spec.parse_params(cfg.parameters)
    weights = [float(s.weight) for s in cfg.adapters]
    from .diffusion import is_pipeline_dir, merge_pipeline
    from .distributed import from_environment

    ranks = from_environment()  # several processes (torchrun): each one is a rank of this merge
    if ranks is not None:
        if cfg.device_map:
            raise IterisError("device_map spreads one process's model over GPUs; under torchrun each process has its own "
                              "GPU: unset device_map")
        cfg.device = ranks.device
    if cfg.model_type == "diffusion" or (cfg.model_type == "auto" and is_pipeline_dir(cfg.base_model)):
        if ranks is not None:
            raise IterisError("diffusers pipelines merge in one process; start it without torchrun")
        if cfg.device_map:
            raise IterisError("device_map spreads a transformers model over GPUs; unset it for a diffusers pipeline")
        return merge_pipeline(cfg, spec, params, out=out, force=force)
    if out is not None:
        check_output_dir(out, force, cfg.inputs())

    adapters = [load_adapter(s.name, s.path) for s in cfg.adapters]
    check_compatible(adapters)
    check_weights(adapters, weights, spec.needs_calibration)
    targets = target_modules(adapters)
    own, merged, heads = resolve_heads(adapters, cfg.modules_to_save)
    report: dict = {
        "method": spec.name,
        "parameters": asdict(params),
        "base_model": cfg.base_model,
        "adapters": [
            {
                "name": a.name,
                "path": str(a.path),
                "weight": w,
                "layers": len(a.modules),
                "ranks": sorted(set(a.ranks.values())),
                "data": s.data,
            }
            for a, w, s in zip(adapters, weights, cfg.adapters)
        ],
        "layers": len(targets),
        "timings": {},
    }

    calib = None
    try:
        if spec.needs_calibration:
            calib = _prepare_calibration(cfg, adapters, targets, own, merged, report, ranks)
        else:
            from .models import check_against_base

            check_against_base(cfg.base_model, adapters, targets, cfg.trust_remote_code)
            if cfg.merge_into_base:
                from .models import check_checkpoint_pickles

                check_checkpoint_pickles(cfg.base_model)  # read when the result is folded in: refused now
        report["timings"]["load"] = time.perf_counter() - t0
        from .models import resolve_device

        ctx = MergeContext(
            adapters=adapters, weights=weights, targets=targets, params=params, calibration=calib,
            progress=cfg.progress, device=resolve_device(cfg.device),
        )
        raw = run_method(spec, ctx, report)
    finally:
        if calib is not None:
            calib.close()

    t2 = time.perf_counter()
    # Dense results are cut to sum(r_i) for an adapter, but kept whole (full rank) when folded into the base.
    dense_rank = (lambda n: None) if cfg.merge_into_base else (lambda n: sum(l.rank for l in ctx.loras(n) if l is not None))
    deltas, errors = to_lora(raw, cfg.rank, default_rank=dense_rank)
    report["timings"]["compress"] = time.perf_counter() - t2
    report["output"] = {
        "exact": all(e == 0.0 for e in errors.values()),
        "ranks": {name: d.rank for name, d in deltas.items()},
        "relative_error": errors,
        "modules_to_save": cfg.modules_to_save if any(heads.values()) else None,
    }
    report["peak_memory"] = peak_memory()
    report["timings"]["total"] = time.perf_counter() - t0
    if ranks is not None:  # every rank's timings and traffic, in rank 0's report (and the same on every rank)
        mine = {"rank": ranks.rank, "device": ranks.device, "timings": dict(report["timings"]),
                "bytes_communicated": ranks.comm_bytes, "communication_seconds": ranks.comm_seconds,
                "peak_memory": report["peak_memory"],
                "solved": {k: report[k] for k in _PER_LAYER if k in report}}
        everyone = ranks.gather(mine)
        for key in _PER_LAYER:  # what each rank found about the layers it solved
            parts = [r["solved"][key] for r in everyone if key in r["solved"]]
            if parts:
                report[key] = ({k: v for p in parts for k, v in p.items()} if isinstance(parts[0], dict)
                               else sorted({x for p in parts for x in p}))
        for r in everyone:
            del r["solved"]
        report["distributed"] = {"world_size": ranks.world, "backend": ranks.backend, "ranks": everyone}
        if calib is not None and calib.holders is not None:
            shared = all(h is None for h in calib.holders)
            report["distributed"]["split"] = "samples" if shared else "adapters"
            if not shared:
                report["distributed"]["adapter_ranks"] = {a.name: h for a, h in zip(adapters, calib.holders)}
    report["summary"] = summarize(report)
    result = MergeResult(deltas=deltas, report=report, config=cfg, adapters=adapters, heads=heads)
    if out is not None and (ranks is None or ranks.main):  # only rank 0 writes, once every rank has finished
        result.save(out, force=force)
    if ranks is not None:
        ranks.barrier()
        del ctx, calib  # the model (sharded, it holds the process group) goes before the group does
        ranks.close()
    return result


# report entries each rank fills only for the layers it solved (several processes)
_PER_LAYER = ("adaptive_weights", "singular_layers")


@torch.no_grad()  # a user's model may come with trainable parameters: no autograd graph for the captures
def run_method(spec, ctx: MergeContext, report: dict) -> dict:
    start = time.perf_counter()
    raw = spec.fn(ctx)
    check_deltas(raw, spec.name)
    report["timings"]["merge"] = time.perf_counter() - start
    if ctx.calibration is not None:
        report["timings"]["capture"] = ctx.calibration.capture_seconds
        report["timings"]["solve"] = ctx.calibration.solve_seconds
    report.update(ctx.report)
    return raw


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
    from . import models
    from .calibration import Calibration
    from .capture import DeltaInjector

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
    layers = models.resolve_layers(model, targets)
    models.check_layer_shapes(layers, adapters)
    device = models.input_device(model)  # a model spread over GPUs takes its inputs where its embeddings are
    stats_dtype = cal.resolved_stats_dtype(device)
    report: dict = {"method": spec.name, "parameters": asdict(params), "timings": {}}
    calib = None
    injector = DeltaInjector(model, layers)
    try:
        if spec.needs_calibration:
            for i, adapter in enumerate(adapters):
                injector.set_variant(f"own:{i}", adapter.modules)
            calib = Calibration(
                model, layers, injector, samples, [a.name for a in adapters], pad_id, cal.batch_size,
                getattr(torch, stats_dtype), progress, [{} for _ in adapters], [{} for _ in adapters],
                walk=cal.walk, offload_states=cal.offload_states, overlap=cal.overlap,
                offload_stats=cal.offload_stats,
            )
            report["calibration"] = {"walk": "blocks" if calib.walks_blocks else "model", "stats_dtype": stats_dtype}
        ctx = MergeContext(adapters=adapters, weights=weights, targets=targets, params=params, calibration=calib,
                           progress=progress, device=device)
        raw = run_method(spec, ctx, report)
    finally:
        if calib is not None:
            calib.close()
        else:
            injector.remove()
    start = time.perf_counter()
    deltas, _ = to_lora(raw, None, default_rank=lambda n: sum(l.rank for l in ctx.loras(n) if l is not None))
    report["timings"]["to_cpu"] = time.perf_counter() - start
    return deltas, report


def to_lora(raw: dict, rank: int | None, default_rank) -> tuple[dict[str, LowRankDelta], dict[str, float]]:
    """LoRA factors for every layer: exact for factored results unless ``rank`` asks for compression;
    dense results (TIES, DARE, with_pretrain_matrix) are truncated to ``rank`` or sum(r_i)."""
    deltas, errors = {}, {}
    for name, delta in raw.items():
        k = rank if rank is not None else (default_rank(name) if isinstance(delta, DenseDelta) else None)
        lora, errors[name] = delta.to_lora(k)
        deltas[name] = LowRankDelta(B=lora.B.cpu(), A=lora.A.cpu())  # results leave the GPU free
    check_deltas(deltas, "the merged LoRA factors", written_as=torch.float32)
    return deltas, errors


def summarize(report: dict) -> str:
    adapters = report["adapters"]
    parts = [
        f"Merged {len(adapters)} adapters ({', '.join(a['name'] for a in adapters)}) with {report['method']} "
        f"over {report['layers']} layers."
    ]
    if "samples" in adapters[0]:
        parts.append(
            "Calibration: "
            + ", ".join(f"{a['name']} {a['samples']} samples / {a['tokens']} tokens" for a in adapters)
            + "."
        )
    if "distributed" in report:
        d = report["distributed"]
        sent = max(r["bytes_communicated"] for r in d["ranks"]) / 2**20
        parts.append(f"Ran as {d['world_size']} processes ({d['backend']}), at most {sent:.1f} MiB communicated by one.")
    its = report.get("iterations")
    if its and len(its) > 1:
        parts.append(
            f"{len(its) - 1} inference-solving iterations after the initial solve; the merged deltas moved by "
            f"{its[-1]['relative_change']:.2e} (relative) in the last one."
        )
    out = report["output"]
    ranks = sorted(set(out["ranks"].values()))
    if out["exact"]:
        parts.append(f"The merged LoRA is exact, rank {ranks[0] if len(ranks) == 1 else ranks}.")
    else:
        worst = max(out["relative_error"].values())
        parts.append(f"The merged LoRA has rank {ranks}; its worst layer's relative SVD error is {worst:.2e}.")
    t = report["timings"]
    parts.append(f"Took {t['total']:.1f} s; peak memory {report['peak_memory']['cpu_max_rss_mb']:.0f} MB RSS.")
    return " ".join(parts)
