"""GPU speed and memory of IterIS merges on random Llama-shaped models (no download: weights' values do not
change the timing), against the measured matrix rates of the same GPU and the official code's approach.

    PYTHONPATH=src python benchmarks/speed.py --suite main --out results/   # 8B shapes, the headline row
    PYTHONPATH=src python benchmarks/speed.py --suite all  --out results/   # everything below, one table each
    PYTHONPATH=src python benchmarks/speed.py --suite main --size tiny      # CPU fallback at a tiny size

Suites:
  rates      bf16 / tf32 / fp32 / fp64 GEMM rates (always measured first: every fraction refers to them)
  main       8B shapes, 4 adapters of rank 16 on all seven projections, 64 x 512 tokens each, 10 iterations
  samples    1B shapes, 16 / 64 / 256 samples per adapter (time linear, memory flat with offloaded states)
  official   1B shapes against benchmarks/official_approach.py on the same model and inputs (same answer?)
  precision  125M shapes: float32 statistics from bf16 GEMMs against float64 statistics
  sequential 1B shapes: the sequential schedule against the global schedule run to its fixed point
  options    1B shapes: batch size, offload_stats, and the sample-space solve on short inputs
Each prints one table and writes <suite>.json into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
    # 70B-class blocks (GQA, 8 kv heads), 4 of them: the per-block cost of a 70B merge on one GPU
    "70b-4layers": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=4, num_attention_heads=64,
                        num_key_value_heads=8),
}
VOCAB = 32000
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- set-up


MODEL_DTYPE = torch.bfloat16
BATCH_SIZE = 8  # samples per forward pass (--batch-size)
OVERLAP = "auto"  # calibration.overlap (--overlap)


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SIZES[size])


def build_model(size: str, device: str, dtype=None):
    from transformers import LlamaForCausalLM

    config = llama_config(size)
    config._attn_implementation = "sdpa"
    dtype = dtype or MODEL_DTYPE
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def make_adapters(model, n: int, rank: int = 16, seed: int = 0):
    """Random LoRAs with nonzero B on all seven projections; deltas about 5% of the weights."""
    from iteris.adapters import LoraAdapter, LoraModule

    device = next(model.parameters()).device
    adapters = []
    for i in range(n):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        modules = {}
        for name, layer in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                d_out, d_in = layer.weight.shape
                A = torch.randn(rank, d_in, generator=gen, device=device) / math.sqrt(d_in)
                B = torch.randn(d_out, rank, generator=gen, device=device) * 0.01
                modules[name] = LoraModule(A=A, B=B, scale=2.0)
        adapters.append(LoraAdapter(name=f"task{i}", path=Path("."), config={"r": rank, "lora_alpha": 2 * rank}, modules=modules))
    return adapters


def make_samples(n_tasks: int, samples: int, tokens: int, seed: int = 0):
    """Each task draws its tokens from its own slice of the vocabulary, so the tasks' inputs differ."""
    from iteris.engine.forward import TokenSample

    out = []
    for i in range(n_tasks):
        gen = torch.Generator().manual_seed(seed + 100 + i)
        low = (i * 5000) % (VOCAB - 8000)
        ids = torch.randint(low, low + 8000, (samples, tokens), generator=gen)
        out.append([TokenSample(input_ids=row.tolist()) for row in ids])
    return out


# ---------------------------------------------------------------------------------------------- rates


def gemm_rate(dtype, n: int, device: str, tf32: bool = False, repeats: int = 5) -> float:
    """Best-of-several dense n x n x n matmul rate, TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a @ b
        sync()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / best / 1e12


def cholesky_rate(n: int, device: str, repeats: int = 3) -> float:
    """float64 Cholesky rate at the down_proj size, TFLOP/s (n^3 / 3 flops)."""
    x = torch.randn(n, n, device=device, dtype=torch.float64)
    spd = x @ x.T + n * torch.eye(n, device=device, dtype=torch.float64)
    torch.linalg.cholesky(spd)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.linalg.cholesky(spd)
        sync()
        best = min(best, time.perf_counter() - start)
    return n**3 / 3 / best / 1e12


def measure_rates(device: str, n: int) -> dict:
    return {
        "bf16": gemm_rate(torch.bfloat16, n, device),
        "tf32": gemm_rate(torch.float32, n, device, tf32=True) if device != "cpu" else None,
        "fp32": gemm_rate(torch.float32, n, device),
        "fp64": gemm_rate(torch.float64, n, device),
        "fp64_cholesky": cholesky_rate(n, device),
    }


# ---------------------------------------------------------------------------------------------- flops


def forward_flops_per_token(cfg: dict, tokens: int, rank: int) -> float:
    """Block linears + causal attention + the LoRA branch, per token, over every block."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    linear = 2 * (d * (d + 2 * kv) + d * d + 3 * d * inter)
    attention = 2 * tokens * d  # QK^T and AV, causal half of 4 T d
    lora = 2 * rank * (7 * d + 2 * kv + 3 * inter + inter + 2 * d)
    return cfg["num_hidden_layers"] * (linear + attention + lora)


def group_inputs(cfg: dict) -> list[int]:
    """d_in of each input group of one block: q/k/v, o, gate/up, down."""
    d = cfg["hidden_size"]
    return [d, d, d, cfg["intermediate_size"]]


def capture_flops(cfg: dict, n_tasks: int, tokens_per_task: int, seq: int, rank: int, paired: bool, cross: bool) -> float:
    """What one sweep must compute: the forward passes and the statistics' GEMMs. A paired sweep runs the
    adapters' own models again only when the cross term is wanted (otherwise their projections are kept)."""
    forward = forward_flops_per_token(cfg, seq, rank) * tokens_per_task * (2 if paired and cross else 1)
    grams = sum(2 * tokens_per_task * d * d for d in group_inputs(cfg)) * (2 if paired and cross else 1)
    return n_tasks * (forward + cfg["num_hidden_layers"] * grams)


def solve_flops(cfg: dict, n_tasks: int, rank: int) -> float:
    """float64 work of one sweep's solves: one Cholesky per layer (its Q carries the layer's own adaptive
    weights) and the sum(r) right-hand sides."""
    d, inter = cfg["hidden_size"], cfg["intermediate_size"]
    k = n_tasks * rank
    per_block = 6 * (d**3 / 3 + 2 * d * d * k) + inter**3 / 3 + 2 * inter * inter * k
    return cfg["num_hidden_layers"] * per_block


# ---------------------------------------------------------------------------------------------- runs


def run_iteris(model, adapters, samples, parameters: dict, calibration: dict | None = None) -> dict:
    from iteris.merge import merge_loaded

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    sync()
    start = time.perf_counter()
    deltas, report = merge_loaded(
        model, adapters, samples, parameters=parameters,
        calibration={"batch_size": BATCH_SIZE, "stats_dtype": "float32", "overlap": OVERLAP, **(calibration or {})},
    )
    sync()
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file

        start = time.perf_counter()
        state = {}
        for name, d in deltas.items():
            state[f"base_model.model.{name}.lora_A.weight"] = d.A.float().contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = d.B.float().contiguous()
        save_file(state, str(Path(tmp) / "adapter_model.safetensors"))
        write = time.perf_counter() - start
    return {"deltas": deltas, "report": report, "wall_s": wall, "peak_extra_gb": peak, "write_s": write}


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every layer's dense delta (float64, on the GPU when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num = den = 0.0
    for name, ref in b.items():
        x = a[name].dense().to(device) if hasattr(a[name], "dense") else a[name].to(device, torch.float64)
        y = ref.dense().to(device) if hasattr(ref, "dense") else ref.to(device, torch.float64)
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / den) ** 0.5


def phase_row(label, size, run, n_tasks, samples, seq, rank, iterations, rates, alpha1) -> dict:
    cfg = SIZES[size]
    its = run["report"]["iterations"]
    own = its[0]
    merged_capture = [it["capture_seconds"] for it in its[1:]]
    tokens = samples * seq
    cap_flops = capture_flops(cfg, n_tasks, tokens, seq, rank, paired=False, cross=False)
    cap_flops += iterations * capture_flops(cfg, n_tasks, tokens, seq, rank, paired=True, cross=alpha1 != 0)
    capture_s = run["report"]["timings"]["capture"]
    solve_s = run["report"]["timings"]["solve"]
    sol_flops = (iterations + 1) * solve_flops(cfg, n_tasks, rank)
    return {
        "label": label, "size": size, "adapters": n_tasks, "samples": samples, "tokens": seq, "iterations": iterations,
        "wall_s": run["wall_s"], "capture_own_s": own["capture_seconds"],
        "capture_merged_per_iter_s": sum(merged_capture) / len(merged_capture) if merged_capture else None,
        "solve_s": solve_s, "solve_per_sweep_s": solve_s / (iterations + 1), "write_s": run["write_s"],
        "peak_extra_gb": run["peak_extra_gb"],
        "capture_tflops": cap_flops / capture_s / 1e12, "capture_fraction_bf16": cap_flops / capture_s / 1e12 / rates["bf16"],
        "solve_tflops": sol_flops / solve_s / 1e12, "solve_fraction_fp64": sol_flops / solve_s / 1e12 / rates["fp64"],
        "last_relative_change": its[-1].get("relative_change"),
    }


def weights_gb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}")
    print(" | ".join(h for h, _, _ in columns))
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, fmt) if fmt else str(v))
        print(" | ".join(cells))


PHASE_COLUMNS = [
    ("run", "label", ""), ("size", "size", ""), ("N", "adapters", ""), ("S", "samples", ""), ("iters", "iterations", ""),
    ("wall s", "wall_s", ".1f"), ("own capture s", "capture_own_s", ".2f"),
    ("merged capture s/iter", "capture_merged_per_iter_s", ".2f"), ("solve s/sweep", "solve_per_sweep_s", ".2f"),
    ("write s", "write_s", ".2f"), ("peak GB over weights", "peak_extra_gb", ".2f"),
    ("capture TFLOP/s", "capture_tflops", ".0f"), ("of bf16", "capture_fraction_bf16", ".0%"),
    ("solve TFLOP/s", "solve_tflops", ".1f"), ("of fp64", "solve_fraction_fp64", ".0%"),
]


def setup(args, device: str, default_size: str):
    """The suite's model size (``--size`` overrides its default), the random model and its adapters, after
    one small untimed merge: the first run in a process otherwise pays for loading the GPU kernels."""
    size = args.size or default_size
    model = build_model(size, device)
    adapters = make_adapters(model, args.adapters)
    run_iteris(model, adapters, make_samples(args.adapters, 2, args.tokens), {"iterations": 1, "alpha1": 1e-7})
    return size, model, adapters


def timed_row(label, size, model, adapters, samples, args, rates, params, calibration=None) -> dict:
    """One iteris run reduced to its table row (the merged deltas are dropped)."""
    run = run_iteris(model, adapters, samples, params, calibration)
    return phase_row(label, size, run, len(adapters), len(samples[0]), args.tokens, 16, params["iterations"], rates,
                     params["alpha1"])


def suite_main(args, rates, device):
    size, model, adapters = setup(args, device, "8b")
    s = args.samples or 64
    samples = make_samples(args.adapters, s, args.tokens)
    rows = []
    # alpha1 = 0 (with gamma = 0) needs no cross term: later rounds skip the adapters' own models
    for alpha1 in (args.alpha, 0.0) if args.alpha else (0.0,):
        params = {"iterations": args.iterations, "alpha1": alpha1, "alpha2": args.alpha}
        row = timed_row(f"global, alpha1={alpha1:g} alpha2={args.alpha:g}", size, model, adapters, samples, args, rates,
                        params)
        rows.append({**row, "weights_gb": weights_gb(model)})
    print_table(f"main: {size}, weights {rows[0]['weights_gb']:.1f} GB", rows, PHASE_COLUMNS)
    return {"rows": rows}


def suite_samples(args, rates, device):
    size, model, adapters = setup(args, device, "1b")
    rows = []
    iterations = 2
    params = {"iterations": iterations, "alpha1": args.alpha, "alpha2": args.alpha}
    for s in (16, 64, 256):
        samples = make_samples(args.adapters, s, args.tokens)
        for offload in (False, True):
            rows.append(timed_row(f"offload={offload}", size, model, adapters, samples, args, rates, params,
                                  {"offload_states": offload}))
    print_table(f"samples: {size}, {args.adapters} adapters, {iterations} iterations", rows, PHASE_COLUMNS)
    return {"rows": rows}


def suite_official(args, rates, device):
    import official_approach

    size, model, adapters = setup(args, device, "1b")
    s = args.samples or 16
    samples = make_samples(args.adapters, s, args.tokens)
    params = {"iterations": args.iterations, "alpha1": args.alpha, "alpha2": args.alpha}
    ours = run_iteris(model, adapters, samples, params)
    row = phase_row("iteris", size, ours, args.adapters, s, args.tokens, 16, args.iterations, rates, args.alpha)
    ours_deltas = ours.pop("deltas")
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    tokens = [torch.tensor([x.input_ids for x in task], device=device) for task in samples]
    official_approach.official_merge(model, adapters, [t[:2] for t in tokens], iterations=1, alpha1=args.alpha,
                                     alpha2=args.alpha, batch_size=BATCH_SIZE)  # untimed: loads its kernels
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    sync()
    start = time.perf_counter()
    theirs, info = official_approach.official_merge(
        model, adapters, tokens, iterations=args.iterations, alpha1=args.alpha, alpha2=args.alpha, batch_size=BATCH_SIZE
    )
    sync()
    official = {
        "label": "official approach", "size": size, "adapters": args.adapters, "samples": s, "tokens": args.tokens,
        "iterations": args.iterations, "wall_s": time.perf_counter() - start,
        "peak_extra_gb": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None,
        "solve_per_sweep_s": info["solve_seconds"] / (args.iterations + 1), "feature_gb": info["feature_bytes"] / 2**30,
    }
    diff = relative_difference(ours_deltas, theirs)
    del ours_deltas
    # the same merge with float64 statistics: how much of the difference is float32 accumulation
    exact = run_iteris(model, adapters, samples, params, {"stats_dtype": "float64"})
    exact_row = phase_row("iteris, float64 statistics", size, exact, args.adapters, s, args.tokens, 16, args.iterations,
                          rates, args.alpha)
    exact_row["relative_difference_vs_official"] = relative_difference(exact.pop("deltas"), theirs)
    row["relative_difference_vs_official"] = diff
    del exact
    summary = {
        "speedup": official["wall_s"] / row["wall_s"],
        "memory_ratio": official["peak_extra_gb"] / row["peak_extra_gb"] if cuda else None,
        "relative_difference": diff, "relative_difference_float64_stats": exact_row["relative_difference_vs_official"],
    }
    print_table(f"official: {size} {args.model_dtype}, {args.adapters} adapters, {s} samples, {args.iterations} iterations",
                [row, exact_row, official], PHASE_COLUMNS + [("rel. diff vs official", "relative_difference_vs_official", ".2e")])
    print(f"speed-up {summary['speedup']:.1f}x, peak memory ratio {summary['memory_ratio']}, "
          f"relative difference of the merged deltas {diff:.2e}")
    return {"rows": [row, exact_row, official], "summary": summary}


def _by_kind(a: dict, b: dict) -> dict:
    """Relative difference per projection kind (q_proj, ..., down_proj)."""
    kinds = sorted({n.rsplit(".", 1)[-1] for n in b})
    return {k: relative_difference({n: a[n] for n in b if n.endswith(k)}, {n: b[n] for n in b if n.endswith(k)}) for k in kinds}


def suite_precision(args, rates, device):
    size, model, adapters = setup(args, device, "125m")
    s = args.samples or 16
    samples = make_samples(args.adapters, s, args.tokens)
    rows = []
    for alpha in (1e-7, 1e-5, 1e-4):
        params = {"iterations": 3, "alpha1": alpha, "alpha2": alpha}
        reference = run_iteris(model, adapters, samples, params, {"stats_dtype": "float64"})
        run = run_iteris(model, adapters, samples, params, {"stats_dtype": "float32"})
        kinds = _by_kind(run["deltas"], reference["deltas"])
        worst = max(kinds, key=kinds.get)
        rows.append({"alpha": alpha, "relative_difference": relative_difference(run["deltas"], reference["deltas"]),
                     "by_kind": kinds, "worst": f"{worst} {kinds[worst]:.1e}", "wall_s": run["wall_s"],
                     "float64_wall_s": reference["wall_s"]})
        del run, reference
    print_table(f"precision: {size}, bf16 model, {args.adapters} adapters, {s} samples, 3 iterations: float32 statistics "
                "(bf16 GEMMs into float32) against float64 statistics", rows,
                [("alpha1 = alpha2", "alpha", "g"), ("rel. diff of merged deltas", "relative_difference", ".2e"),
                 ("worst projection", "worst", ""), ("float32 wall s", "wall_s", ".1f"), ("float64 wall s", "float64_wall_s", ".1f")])
    return {"rows": rows}


def suite_sequential(args, rates, device):
    size, model, adapters = setup(args, device, "1b")
    samples = make_samples(args.adapters, args.samples or 16, args.tokens)
    base = {"alpha1": args.alpha, "alpha2": args.alpha}
    fixed = run_iteris(model, adapters, samples, {**base, "iterations": args.fixed_point_iterations})
    rows = [{"label": f"global, {args.fixed_point_iterations} iterations (reference fixed point)", "wall_s": fixed["wall_s"],
             "relative_difference": 0.0, "last_change": fixed["report"]["iterations"][-1]["relative_change"],
             "peak_extra_gb": fixed["peak_extra_gb"]}]
    for it in (1, 3, 10):
        run = run_iteris(model, adapters, samples, {**base, "iterations": it})
        rows.append({"label": f"global, {it} iterations", "wall_s": run["wall_s"],
                     "relative_difference": relative_difference(run["deltas"], fixed["deltas"]),
                     "last_change": run["report"]["iterations"][-1]["relative_change"], "peak_extra_gb": run["peak_extra_gb"]})
    seq = run_iteris(model, adapters, samples, {**base, "schedule": "sequential"})
    rows.append({"label": "sequential, one sweep", "wall_s": seq["wall_s"],
                 "relative_difference": relative_difference(seq["deltas"], fixed["deltas"]), "peak_extra_gb": seq["peak_extra_gb"]})
    print_table(f"sequential: {size}, {args.adapters} adapters, {args.samples or 16} samples", rows,
                [("schedule", "label", ""), ("wall s", "wall_s", ".1f"), ("rel. diff vs fixed point", "relative_difference", ".2e"),
                 ("last change", "last_change", ".2e"), ("peak GB", "peak_extra_gb", ".2f")])
    return {"rows": rows}


def suite_options(args, rates, device):
    """What the calibration options cost or save: samples per forward pass, statistics offloaded to CPU
    memory, and the sample-space solve where all tasks' tokens together are fewer than down_proj's d_in."""
    size, model, adapters = setup(args, device, "1b")
    s = args.samples or 16
    samples = make_samples(args.adapters, s, args.tokens)
    rows = []
    for alpha1 in (args.alpha, 0.0):
        params = {"iterations": args.iterations, "alpha1": alpha1, "alpha2": args.alpha}
        for batch in (8, 16, 32):
            row = timed_row(f"alpha1={alpha1:g}, batch {batch}", size, model, adapters, samples, args, rates, params,
                            {"batch_size": batch})
            rows.append(row)
    params = {"iterations": args.iterations, "alpha1": args.alpha, "alpha2": args.alpha}
    rows.append(timed_row("offload_stats, batch 16", size, model, adapters, samples, args, rates, params,
                          {"batch_size": 16, "offload_stats": True}))
    print_table(f"options: {size}, {args.adapters} adapters, {s} x {args.tokens} tokens", rows, PHASE_COLUMNS)
    # short inputs: 4 x 16 x 96 = 6144 tokens < 8192 = down_proj's d_in
    short = make_samples(args.adapters, s, 96)
    space = []
    runs = {}
    for solve_space in ("features", "auto"):
        run = run_iteris(model, adapters, short, {**params, "solve_space": solve_space}, {"batch_size": 16})
        runs[solve_space] = run["deltas"]
        space.append({"label": solve_space, "wall_s": run["wall_s"], "solve_s": run["report"]["timings"]["solve"],
                      "peak_extra_gb": run["peak_extra_gb"],
                      "sample_space_groups": len(run["report"].get("sample_space_groups", []))})
    space[1]["relative_difference"] = relative_difference(runs["auto"], runs["features"])
    print_table(f"solve space: {size}, {args.adapters} adapters, {s} x 96 tokens, {args.iterations} iterations", space,
                [("solve_space", "label", ""), ("wall s", "wall_s", ".2f"), ("solve s", "solve_s", ".2f"),
                 ("peak GB", "peak_extra_gb", ".2f"), ("sample-space groups", "sample_space_groups", ""),
                 ("rel. diff vs features", "relative_difference", ".2e")])
    return {"rows": rows, "solve_space": space}


SUITES = {"main": suite_main, "samples": suite_samples, "official": suite_official, "precision": suite_precision,
          "sequential": suite_sequential, "options": suite_options}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="main", help=f"comma-separated: {', '.join(SUITES)}, rates or all")
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="override each suite's model size")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=1e-7, help="alpha1 = alpha2")
    parser.add_argument("--fixed-point-iterations", type=int, default=30)
    parser.add_argument("--model-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (both approaches)")
    parser.add_argument("--overlap", default="auto", choices=["auto", "on", "off"], help="calibration.overlap")
    parser.add_argument("--out", default=None, help="directory for <suite>.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    global MODEL_DTYPE, BATCH_SIZE, OVERLAP
    MODEL_DTYPE = getattr(torch, args.model_dtype)
    BATCH_SIZE = args.batch_size
    OVERLAP = args.overlap
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    rates = measure_rates(device, 8192 if device == "cuda" else 512)
    print(f"{info['device']}, torch {info['torch']}, {info['date']}")
    print("measured rates, TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items() if v is not None))
    names = list(SUITES) if args.suite == "all" else [s for s in args.suite.split(",") if s != "rates"]
    for name in names:
        start = time.perf_counter()
        result = SUITES[name](args, rates, device)
        for row in result["rows"]:
            row.pop("deltas", None)
        result.update(info=info, rates=rates, suite_seconds=time.perf_counter() - start)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
