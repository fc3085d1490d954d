"""``iteris merge --dry-run``: everything a merge checks, then its plan (adapters, targets, ranks, the output's
size) and estimates of its peak memory and its time, without loading the base model's weights.

The model is built on the meta device from its config (shapes, no weights); the calibration files are read and
tokenized, since their token counts size the merge. Memory is a sum of what the engine keeps (weights,
hidden states at a block boundary, one block's statistics and its float64 solve); time comes from a timed
probe: the merge itself on the model cut to its first one and two blocks (random weights), scaled to every block.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from .adapters import check_compatible, check_weights, load_adapter, target_modules
from .config import load_config, with_overrides
from .errors import IterisError
from .methods import get_method
from .placement import check_output_dir

MB = 2**20


@dataclass
class MergePlan:
    method: str
    device: str
    dtype: str
    adapters: list[dict]
    layers: int
    output_ranks: list[int]
    output_bytes: int
    memory: dict[str, float] = field(default_factory=dict)  # bytes by what holds them
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    def describe(self) -> str:
        ranks = self.output_ranks
        span = (f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)} to {max(ranks)}") if ranks else "-"
        lines = [f"dry run: {self.method} on {self.device} ({self.dtype}); nothing was merged or written", "",
                 "adapters:"]
        for a in self.adapters:
            data = f", {a['samples']} samples / {a['tokens']} tokens" if "samples" in a else (
                f", {a['prompts']} prompts" if a.get("prompts") else "")
            lines.append(f"  {a['name']}: weight {a['weight']:g}, rank {a['ranks']}, {a['layers']} layers{data}")
        lines += [f"target layers: {self.layers}",
                  f"output: a LoRA of rank {span}, {self.output_bytes / MB:.1f} MB (float32 factors)"]
        if self.memory:
            where = "GPU" if self.device.startswith("cuda") else "CPU (resident)"
            parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in self.memory.items() if v >= MB / 2)
            lines.append(f"estimated peak {where} memory: {self.peak_bytes / MB:.0f} MB ({parts})")
        if self.seconds:
            parts = ", ".join(f"{k} {v:.3g} s" for k, v in self.seconds.items() if k != "total")
            lines.append(f"estimated time: {self.seconds['total']:.3g} s ({parts}), and reading the base model's "
                         "weights on top")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_merge(config, *, out=None, force: bool = False, probe: bool = True, **overrides) -> MergePlan:
    """The checks of ``merge`` and the plan, with no weights loaded and nothing written."""
    from .families.choose import family_for
    from .families import loading

    cfg = with_overrides(load_config(config), overrides)
    spec = get_method(cfg.method)
    params = spec.parse_params(cfg.parameters)
    weights = [float(s.weight) for s in cfg.adapters]
    family = family_for(cfg, None)
    family.check(cfg)
    if out is not None:
        check_output_dir(out, force, cfg.inputs(), repair=False)
    if hasattr(family, "check_files"):  # a diffusers pipeline: its LoRA files are read into the loaded pipeline
        entries = family.check_files(cfg, spec.needs_calibration)
        return MergePlan(method=spec.name, device=loading.resolve_device(cfg.device), dtype=cfg.dtype, layers=0,
                         adapters=[{**e, "weight": w, "ranks": "-", "layers": "-"} for e, w in zip(entries, weights)],
                         output_ranks=[], output_bytes=0,
                         notes=["a diffusers pipeline: the config, the output, the LoRA files and the prompts were "
                                "checked; the LoRAs' layers, ranks, memory and time need the pipeline loaded"])
    adapters = [load_adapter(s.name, s.path) for s in cfg.adapters]
    check_compatible(adapters)
    check_weights(adapters, weights, spec.needs_calibration)
    targets = target_modules(adapters)
    device = loading.resolve_device(cfg.device)
    dtype = loading.resolve_dtype(cfg.dtype, device)
    shapes = _layer_shapes(adapters)
    ranks = [cfg.rank or sum(a.modules[n].rank for a in adapters if n in a.modules) for n in targets]
    output_bytes = sum(r * (shapes[n][0] + shapes[n][1]) * 4 for r, n in zip(ranks, targets))
    plan = MergePlan(method=spec.name, device=device, dtype=str(dtype).replace("torch.", ""), layers=len(targets),
                     adapters=[{"name": a.name, "weight": w, "ranks": ", ".join(map(str, sorted(set(a.ranks.values())))),
                                "layers": len(a.modules)} for a, w in zip(adapters, weights)],
                     output_ranks=ranks, output_bytes=output_bytes)
    model = loading.meta_model(cfg.base_model, adapters, targets, cfg.trust_remote_code)
    if loading.reads_images(model.config):
        plan.notes.append("a model that reads images: the adapters and the model's shapes were checked; memory and "
                          "time are estimated for text models only")
        return plan
    weights_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    adapter_bytes = sum(m.A.numel() + m.B.numel() for a in adapters for m in a.modules.values()) * 4
    plan.memory = {"weights": weights_bytes, "adapters": adapter_bytes}
    if not spec.needs_calibration:
        plan.memory = {"adapters": adapter_bytes, "dense deltas": max(
            (shapes[n][0] * shapes[n][1] * 8 * 2 for n in targets), default=0)}
        plan.notes.append("a data-free method: the base model's weights are not loaded (its shapes were checked)")
        _add_runtime(plan, device)
        return plan
    from .families.transformers import resolve_generate

    if resolve_generate(cfg, params, device, adapters):
        plan.notes.append("calibration: each adapter's own continuations follow its prompts (calibration.generate)")
    lengths = _sample_lengths(cfg, model)
    for entry, lens in zip(plan.adapters, lengths):
        entry.update(samples=len(lens), tokens=sum(lens))
    estimate = _calibrated_memory(cfg, params, model, targets, shapes, lengths, dtype, device)
    plan.memory.update(estimate)
    _add_runtime(plan, device)
    if probe:
        plan.seconds, why_not = _timed_probe(cfg, spec, params, adapters, weights, model, targets, lengths, dtype,
                                             device)
        if why_not:
            plan.notes.append(why_not)
    return plan


def _layer_shapes(adapters) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for a in adapters for n, m in a.modules.items()}


def _add_runtime(plan: MergePlan, device: str) -> None:
    """On the CPU the peak is the process's resident memory: what torch and transformers take once imported
    (as this process has them now) comes on top of the tensors."""
    if not device.startswith("cuda"):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        plan.memory = {"runtime": rss if sys.platform == "darwin" else rss * 1024, **plan.memory}


def _sample_lengths(cfg, model) -> list[list[int]]:
    """Each adapter's calibration samples' token counts, drawn and tokenized as the merge will."""
    from .data import load_records
    from .families import loading, text
    from .families.transformers import fit_positions

    missing = [s.name for s in cfg.adapters if not s.data]
    if missing:
        raise IterisError(f"this method needs calibration samples: set `data:` for adapter(s) {missing}")
    fit_positions(cfg.calibration, loading.max_positions(model.config))
    tokenizer = loading.load_tokenizer(cfg.tokenizer or cfg.base_model, cfg.trust_remote_code)
    out = []
    for spec in cfg.adapters:
        samples = text.drawn_token_samples(tokenizer, load_records(spec.data), cfg.calibration, spec.data, model,
                                           spec.name, field=spec.field, samples=spec.samples)
        extra = cfg.calibration.max_new_tokens if cfg.calibration.generate else 0
        out.append([s.tokens + extra for s in samples])
    return out


def _padded(lengths: list[int], batch: int) -> list[tuple[int, int]]:
    """(rows, padded length) of each batch, in the drawn order."""
    return [(len(lengths[i:i + batch]), max(lengths[i:i + batch])) for i in range(0, len(lengths), batch)]


def _hidden_size(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise IterisError("the base model's config names no hidden size; memory cannot be estimated")


def _blocks(model, targets) -> dict[int, list[str]]:
    """Target layers by the block the walk visits them in; one group for a model that runs whole (every
    layer's statistics are then kept at once)."""
    from .engine.blocks import block_list

    found = block_list(model, targets)
    if found is None:
        return {0: list(targets)}
    grouped: dict[int, list[str]] = {}
    for name, index in found[1].items():
        grouped.setdefault(index, []).append(name)
    return grouped


def _input_widths(names: list[str], shapes: dict) -> list[int]:
    """d_in of each distinct input among a block's layers: layers of one parent module with one width read one
    input (q/k/v, gate/up) and share its statistics (an estimate: the merge finds them on a probe pass)."""
    return list({(name.rsplit(".", 2)[0], shapes[name][1]): shapes[name][1] for name in names}.values())


def _calibrated_memory(cfg, params, model, targets, shapes, lengths, dtype, device) -> dict[str, float]:
    """What a data-aware merge keeps besides the weights: the block-boundary states of every batch (each
    adapter's own and the merged model's, a block's inputs and its outputs), one block's statistics per task
    with their float64 solve, and one batch's activations through one block."""
    cal = cfg.calibration
    on_gpu = device.startswith("cuda")
    act = dtype.itemsize
    stats = 4 if cal.resolved_stats_dtype(device) == "float32" else 8
    hidden = _hidden_size(model.config)
    batches = [_padded(lens, cal.batch_size) for lens in lengths]
    padded_tokens = sum(r * n for task in batches for r, n in task)
    widest = max(r * n for task in batches for r, n in task)
    memory = {}
    if not (cal.offload_states and on_gpu):
        memory["hidden states"] = padded_tokens * hidden * act * 4  # own and merged, a block's inputs and outputs
    tokens = sum(sum(lens) for lens in lengths)
    n = len(lengths)

    def block_stats(names):
        widths = _input_widths(names, shapes)
        # a Gram per task, or the task's rows where every task's tokens together are fewer than d_in
        grams = sum(min(d * d, tokens * d) for d in widths) * stats * n
        solve = max(widths) * max(widths) * 8 * 3  # float64: the Grams' sum, its factor, a right side
        return grams + solve

    memory["statistics"] = max(block_stats(names) for names in _blocks(model, targets).values())
    overlapped = getattr(params, "overlaps_solves", lambda: False)()
    if overlapped and (cal.overlap == "on" or (cal.overlap == "auto" and on_gpu)) and not cal.offload_stats:
        memory["statistics"] *= 2  # a block's solve runs while the next block is captured
    widest_layer = max(max(s) for s in shapes.values())
    memory["activations"] = widest * widest_layer * act * 4
    refined = hasattr(params, "resolved_refine_steps") and params.resolved_refine_steps("sequential", device)
    if refined or hasattr(params, "epochs"):
        memory["activations"] *= 3  # autograd through one block
    return memory


def _timed_probe(cfg, spec, params, adapters, weights, model, targets, lengths, dtype, device):
    """The merge itself on small pieces: the model cut to its first block and to its first two (random weights
    on the device; the checkpoint is never read), one batch per adapter. What the second block adds is what
    each further block costs, the rest is paid once; so the seconds scale to every block and batch. Each piece
    runs four times: the first untimed (a process's first kernels are slow), the median of the rest kept.
    Returns (seconds, None), or ({}, why) where the model cannot be cut so."""
    import dataclasses

    from .engine.blocks import block_list
    from .engine.forward import TokenSample
    from .merge import merge_loaded

    cal = cfg.calibration
    found = block_list(model, targets)
    if found is None:
        return {}, "no time estimate: the model does not run its target layers as a chain of blocks"
    n_blocks = max(found[1].values()) + 1
    rows = min(cal.batch_size, min(len(lens) for lens in lengths))
    samples = [[TokenSample(input_ids=[1] * n) for n in lens[:rows]] for lens in lengths]
    batches = sum(-(-len(lens) // cal.batch_size) for lens in lengths) / len(lengths)  # per adapter

    def piece(blocks: int) -> dict[str, float]:
        small = _cut_model(model, blocks, dtype, device)
        kept = {t for t in targets if found[1][t] < blocks}
        parts = [dataclasses.replace(a, modules={k: m for k, m in a.modules.items() if k in kept}) for a in adapters]
        runs = []
        for _ in range(4):  # the first run pays the process's first-use costs; the median of the rest is kept
            _, report = merge_loaded(small, parts, samples, method=spec.name, parameters=dataclasses.asdict(params),
                                     weights=weights, calibration=dataclasses.asdict(cal))
            timings = dict(report["timings"])
            if cal.generate:
                timings["generate"] = _generation_step(small, parts[0], rows, lengths, device)
            runs.append(timings)
        return {key: sorted(r.get(key, 0.0) for r in runs[1:])[1] for key in runs[-1]}

    try:
        one, two = piece(1), piece(min(2, n_blocks))
    except Exception as exc:  # an architecture that cannot be cut into blocks this way
        return {}, f"no time estimate: the model could not be cut to its first blocks ({type(exc).__name__}: {exc})"

    def scaled(key: str) -> float:
        """Paid once, plus each block past the first at what the second block added."""
        first, pair = one.get(key, 0.0), two.get(key, 0.0)
        per_block = max(pair - first, 0.1 * first) if n_blocks > 1 else first
        return max(first - per_block, 0.0) + per_block * n_blocks

    seconds = {}
    if cal.generate:  # one step per new token, for every batch of every adapter
        seconds["generate"] = scaled("generate") * cal.max_new_tokens * batches * len(lengths)
    seconds["capture"] = scaled("capture") * batches  # the piece ran one batch per adapter
    seconds["solve"] = scaled("solve")
    if one.get("fit"):
        seconds["fit"] = scaled("fit")  # a fixed number of steps per block, whatever the batches
    seconds["total"] = sum(seconds.values())
    return seconds, None


def _generation_step(model, adapter, rows: int, lengths, device: str) -> float:
    """Seconds per new token of a greedy generation on a batch of the calibration's mean length, run as the
    merge runs it: an adapter's update added by the hooks to every target layer, and the finiteness watch."""
    from transformers import LogitsProcessorList

    from .engine.inject import DeltaInjector, own
    from .engine.layers import resolve_layers
    from .finite import FiniteWatch

    mean = max(1, round(sum(map(sum, lengths)) / sum(map(len, lengths))))
    ids = torch.ones(rows, mean, dtype=torch.long, device=device)
    steps = 16  # (the prompt's own pass is paid once per batch: spread over the steps, it is a small share)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    injector = DeltaInjector(model, resolve_layers(model, list(adapter.modules)))
    try:
        injector.set_variant(own(0), adapter.modules)
        with injector.use(own(0)), torch.no_grad():
            sync()
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                           min_new_tokens=steps, do_sample=False, num_beams=1, pad_token_id=0,
                           logits_processor=LogitsProcessorList([FiniteWatch()]))
            sync()
            return (time.perf_counter() - start) / steps
    finally:
        injector.remove()


def _cut_model(model, blocks: int, dtype, device):
    """The model's class with only its first ``blocks`` blocks, random weights on the device."""
    import copy

    config = copy.deepcopy(model.config)
    layers = model.config.num_hidden_layers
    config.num_hidden_layers = blocks
    for key, value in list(vars(config).items()):  # per-layer lists (layer_types) cut alike
        if isinstance(value, list) and len(value) == layers and key != "architectures":
            setattr(config, key, value[:blocks])
    with torch.device("meta"):
        small = type(model)._from_config(config)
    small = small.to_empty(device=device).to(dtype)  # (any values do for timing: random weights, unit buffers)
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0, 0.02)
        for b in small.buffers():
            if b.is_floating_point():
                b.fill_(1.0)
    return small.eval()
