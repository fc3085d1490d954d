"""A transformers base model (text or images; whole, spread over GPUs, or sharded over processes) and its
PEFT adapters: loaded and checked, calibration samples read and prepared, the merged LoRA written as a PEFT
adapter (or folded into the base)."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapters import LoraAdapter, check_compatible, check_weights, load_adapter, target_modules
from ..config import CalibrationConfig, MergeConfig
from ..data import load_records, select_samples
from ..deltas import LowRankDelta
from ..engine import EngineOptions
from ..engine.forward import input_device, token_batcher
from ..engine.inject import own
from ..engine.layers import check_layer_shapes, resolve_layers
from ..errors import IterisError
from ..finite import NonFiniteOutputs, check_deltas
from ..card import merge_card, write_card
from ..output import write_adapter, write_merged_model, write_report
from ..plots import merge_figures
from ..placement import atomic_directory
from ..run import Unit, peak_memory
from . import loading, sharded as sharding, text, vision

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

    def save(self, out: str | Path, force: bool = False, plot: bool = False) -> Path:
        """Write the adapter(s), merge_report.json and the model card (README.md), with ``plot`` the figures the
        card shows; nothing is left behind if this fails."""
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
                shutil.rmtree(tmp / ".adapter")
            self.report["timings"]["write"] = time.perf_counter() - start
            write_report(tmp, self.report)
            figures = merge_figures(self.report, tmp) if plot else []
            for sub in self.heads:  # (a card per sub-directory where each adapter's head is written apart)
                write_card(tmp / sub if sub else tmp, merge_card(
                    self.report, cfg, library="transformers" if cfg.merge_into_base else "peft",
                    task_type=self.adapters[0].task_type, files=[f"../{f}" if sub else f for f in figures],
                    adapter_configs=[a.config for a in self.adapters]))
        return Path(out)


def resolve_heads(adapters: list[LoraAdapter], policy: str):
    """What each model variant uses for PEFT ``modules_to_save`` copies, and what gets written.

    Returns (own overrides per adapter, merged-model overrides per task, {output sub-dir: tensors}).
    """
    own_heads = [dict(a.extra_tensors) for a in adapters]
    carriers = [a for a in adapters if a.extra_tensors]
    names = [a.name for a in adapters]
    if not carriers or policy == "drop":
        return own_heads, [{} for _ in adapters], {"": {}}
    if policy == "per_adapter":
        return own_heads, own_heads, {a.name: dict(a.extra_tensors) for a in adapters}
    if policy in names:
        chosen = adapters[names.index(policy)].extra_tensors
        return own_heads, [chosen for _ in adapters], {"": dict(chosen)}
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
    return own_heads, [reference for _ in adapters], {"": dict(reference)}


def resolve_generate(cfg: MergeConfig, params, device: str, adapters: list[LoraAdapter], ranks=None) -> bool:
    """``calibration.generate`` decided (``auto``: the method asks) and set on the config: continuations are
    for a decoder language model (from its config alone) merged in one process (several: no refinement)."""
    auto_cls, config, _ = loading.auto_class(cfg.base_model, adapters[0].task_type, {}, cfg.trust_remote_code)
    causal = ranks is None and not loading.reads_images(config) and auto_cls.__name__ == "AutoModelForCausalLM"
    cfg.calibration.generate = cfg.calibration.resolved_generate(params, device, causal)
    return cfg.calibration.generate


def fit_positions(cal: CalibrationConfig, positions: int | None) -> None:
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


class ModelJob:
    """One transformers model, one unit; everything is loaded and checked on construction."""

    @staticmethod
    def check(cfg: MergeConfig) -> None:
        """Nothing to refuse before the output is checked."""

    def __init__(self, cfg: MergeConfig, spec, params, weights: list[float], ranks):
        self.cfg, self.spec, self.ranks = cfg, spec, ranks
        adapters = [load_adapter(s.name, s.path) for s in cfg.adapters]
        check_compatible(adapters)
        check_weights(adapters, weights, spec.needs_calibration)
        self.adapters = adapters
        self.targets = target_modules(adapters)
        own_heads, merged_heads, self.heads = resolve_heads(adapters, cfg.modules_to_save)
        self.report: dict = {
            "method": spec.name,
            "parameters": asdict(params),
            "base_model": cfg.base_model,
            "adapters": [
                {"name": a.name, "path": str(a.path), "weight": w, "layers": len(a.modules),
                 "ranks": sorted(set(a.ranks.values())), "data": s.data}
                for a, w, s in zip(adapters, weights, cfg.adapters)
            ],
            "layers": len(self.targets),
            "timings": {},
        }
        unit = Unit(name="", adapters=adapters, report=self.report, device=loading.resolve_device(cfg.device),
                    dense_rank=(lambda n: None) if cfg.merge_into_base else None)
        if spec.needs_calibration:
            resolve_generate(cfg, params, unit.device, adapters, ranks)
            self._prepare_calibration(unit, own_heads, merged_heads)
        else:
            loading.check_against_base(cfg.base_model, adapters, self.targets, cfg.trust_remote_code)
            if cfg.merge_into_base:
                loading.check_checkpoint_pickles(cfg.base_model)  # read when the result is folded in: refused now
        self.units = [unit]

    def before(self, unit: Unit, merged: dict) -> None:
        pass

    def close(self) -> None:
        for unit in self.units:
            unit.close()

    # ------------------------------------------------------------------------------------------ calibration

    def _prepare_calibration(self, unit: Unit, own_heads: list[dict], merged_heads: list[dict]) -> None:
        cfg = self.cfg
        missing = [s.name for s in cfg.adapters if not s.data]
        if missing:
            raise IterisError(f"this method needs calibration samples: set `data:` for adapter(s) {missing}")
        config = loading.load_model_config(cfg.base_model, cfg.trust_remote_code)
        fit_positions(cfg.calibration, loading.max_positions(config))
        images = loading.reads_images(config)
        if images and cfg.calibration.generate:
            raise IterisError("calibration.generate writes text continuations; this model reads images: give the "
                              "texts (captions, prompts) in the data, or leave them out")
        texts = [select_samples(load_records(spec.data), cfg.calibration, spec.data, field=spec.field,
                                samples=spec.samples, image_field=vision.IMAGE_FIELD if images else None)
                 for spec in cfg.adapters]
        device = unit.device
        if cfg.device_map and not device.startswith("cuda"):
            raise IterisError("device_map spreads the model over GPUs, and no CUDA GPU is visible; unset device_map")
        dtype = loading.resolve_dtype(cfg.dtype, device)
        if images:
            processor = vision.load_processor(cfg.tokenizer or cfg.base_model, cfg.trust_remote_code)
            tokenizer, pad_id = getattr(processor, "tokenizer", None), vision.pad_id(processor)
        else:
            tokenizer = loading.load_tokenizer(cfg.tokenizer or cfg.base_model, cfg.trust_remote_code)
            pad_id = tokenizer.pad_token_id
        model, unit.sharded = self._load_model(dtype, device, tokenizer, images)
        if cfg.device_map:
            device = input_device(model)
        layers = resolve_layers(model, self.targets)
        check_layer_shapes(layers, self.adapters)
        kind = text.model_kind(model)
        if cfg.calibration.generate and kind == "encoder":
            raise IterisError("calibration.generate needs a model that generates text; this one is an encoder")
        if images:
            samples = [vision.image_samples(processor, t, spec.data) for t, spec in zip(texts, cfg.adapters)]
        else:
            samples = [text.tokenize_samples(tokenizer, t, model, cfg.calibration.max_length, cfg.calibration.generate)
                       for t in texts]
        for spec, s in zip(cfg.adapters, samples):
            if not s:
                raise IterisError(f"adapter '{spec.name}': no calibration sample survived tokenisation")
        unit.ranks, unit.own_overrides, unit.merged_overrides = self.ranks, own_heads, merged_heads
        try:
            unit.inject(model, layers)
            unit.samples = samples if images else self._complete(unit, tokenizer, samples, device)
            unit.batcher = vision.image_batcher(pad_id, device) if images else token_batcher(pad_id, device)
            unit.options = EngineOptions.of(cfg.calibration, device, progress=cfg.progress)
            unit.build_engine()
        except BaseException:
            unit.close()
            raise
        self._report_calibration(unit, device, dtype, kind, images)

    def _load_model(self, dtype, device: str, tokenizer, images: bool):
        """The base model, sharded over processes where asked and possible, else whole; and whether sharded."""
        cfg, ranks = self.cfg, self.ranks
        extras = {k: v for a in self.adapters for k, v in a.extra_tensors.items()}
        task_type = self.adapters[0].task_type
        if sharding.wanted(cfg.calibration.shard, cfg.base_model, ranks):
            # (shard: auto holds the model whole where it cannot be sharded; blocks says why)
            try:
                if images or cfg.calibration.generate:
                    raise sharding.NotShardable(
                        "a model sharded over processes is run block by block on text samples only: "
                        f"{'it reads images' if images else 'calibration.generate runs it whole'}; set "
                        "calibration.shard: off (and start as many processes as the model fits)")
                model = sharding.load_sharded(cfg.base_model, task_type, extras, dtype, self.targets, ranks,
                                              cfg.trust_remote_code)
                loading.set_pad_id(model, tokenizer)
                return model, True
            except sharding.NotShardable:
                if cfg.calibration.shard == "blocks":
                    raise
        model = loading.load_base_model(cfg.base_model, task_type, extras, dtype, device, tokenizer,
                                        device_map=cfg.device_map, trust_remote_code=cfg.trust_remote_code)
        return model, False

    def _complete(self, unit: Unit, tokenizer, samples: list, device: str) -> list:
        """What each adapter's own model writes, where it must (targets, continuations)."""
        cal = self.cfg.calibration
        start = time.perf_counter()
        for i, adapter in enumerate(self.adapters):
            with unit.injector.use(own(i), unit.own_overrides[i]):
                try:
                    samples[i] = text.complete_samples(unit.model, tokenizer, samples[i], cal.generate,
                                                       cal.max_new_tokens, cal.batch_size, device)
                except NonFiniteOutputs as exc:
                    raise IterisError(f"adapter '{adapter.name}': generating its calibration targets, {exc}; "
                                      "check the adapter and the dtype (float16 overflow)") from None
        if cal.generate:  # (inside the load time; reported apart, as the dry run estimates it apart)
            self.report["timings"]["generate"] = time.perf_counter() - start
        return samples

    def _report_calibration(self, unit: Unit, device: str, dtype, kind: str, images: bool) -> None:
        cfg, engine = self.cfg, unit.engine
        self.report["calibration"] = {
            "device": device,
            **({"devices": sorted({str(p.device) for p in unit.model.parameters()})} if cfg.device_map else {}),
            "dtype": str(dtype).replace("torch.", ""),
            "stats_dtype": str(unit.options.stats_dtype).replace("torch.", ""),
            "model_kind": "images" if images else kind,
            "generate": cfg.calibration.generate,
            "walk": "blocks" if engine.walks_blocks else "model",
            **({"sharded_over_processes": self.ranks.world} if unit.sharded else {}),
            "layer_groups": len(engine.groups),
            "layers": len(unit.layers),
            "shared_input_groups": {g.name: g.members for g in engine.groups if len(g.members) > 1},
        }
        for entry, spec, s in zip(self.report["adapters"], cfg.adapters, unit.samples):
            entry["samples"] = len(s)
            if images:
                entry["images"] = len(s)
                entry["tokens"] = sum(len(x.input_ids or []) for x in s)
            else:
                entry["tokens"] = sum(x.tokens for x in s)
            if len(s) < (spec.samples or cfg.calibration.samples):
                entry["note"] = f"only {len(s)} usable samples in {spec.data}"

    # ------------------------------------------------------------------------------------------------ result

    def finish(self, merged: dict, errors: dict, t0: float) -> MergeResult:
        deltas, errors = merged[""], errors[""]
        report, ranks = self.report, self.ranks
        report["output"] = {
            "exact": all(e == 0.0 for e in errors.values()),
            "ranks": {name: d.rank for name, d in deltas.items()},
            "relative_error": errors,
            "modules_to_save": self.cfg.modules_to_save if any(self.heads.values()) else None,
        }
        report["peak_memory"] = peak_memory()
        report["timings"]["total"] = time.perf_counter() - t0
        if ranks is not None:
            self._gather_ranks()
        report["summary"] = summarize(report, self.spec)
        return MergeResult(deltas=deltas, report=report, config=self.cfg, adapters=self.adapters, heads=self.heads)

    def _gather_ranks(self) -> None:
        """Every rank's timings and traffic, in rank 0's report (and the same on every rank)."""
        report, ranks, keys = self.report, self.ranks, self.spec.per_layer_report
        mine = {"rank": ranks.rank, "device": ranks.device, "timings": dict(report["timings"]),
                "bytes_communicated": ranks.comm_bytes, "communication_seconds": ranks.comm_seconds,
                "peak_memory": report["peak_memory"], "solved": {k: report[k] for k in keys if k in report}}
        everyone = ranks.gather(mine)
        for key in keys:  # what each rank found about the layers it solved
            parts = [r["solved"][key] for r in everyone if key in r["solved"]]
            if parts:
                report[key] = ({k: v for p in parts for k, v in p.items()} if isinstance(parts[0], dict)
                               else sorted({x for p in parts for x in p}))
        for r in everyone:
            del r["solved"]
        report["distributed"] = {"world_size": ranks.world, "backend": ranks.backend, "ranks": everyone}
        holders = self.units[0].holders
        if holders is not None:
            shared = all(h is None for h in holders)
            report["distributed"]["split"] = "samples" if shared else "adapters"
            if not shared:
                report["distributed"]["adapter_ranks"] = {a.name: h for a, h in zip(self.adapters, holders)}


def summarize(report: dict, spec) -> str:
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
    said = spec.describe_report(report)
    if said:
        parts.append(said)
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
