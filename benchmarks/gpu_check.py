"""GPU sanity and first scale figures for `iteris merge` (the full speed benchmark is a separate script).

1. Agreement: a tiny Llama merged on the GPU (float32 and bfloat16 forwards) against the same merge on
   the CPU in float64; the same merge with offloaded statistics gives the same answer.
1b. Guards: one calibration record whose activations are made infinite stops the merge on the GPU, named,
   with solves overlapped on a worker thread and statistics offloaded to pinned CPU memory or not.
2. Scale: a random ~125M-parameter Llama (hidden 768, 12 layers), N LoRAs of rank 16 on all seven
   projections, S samples x T tokens per adapter, bf16 forwards, fp32 statistics, float64 solves:
   per-phase wall time and peak GPU memory for several S (memory should stay flat in S).

    PYTHONPATH=src python benchmarks/gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def agreement(root: Path) -> list[dict]:
    import fixtures as fx

    import iteris

    base = root / "tiny"
    fx.make_base_model(base, "llama")
    adapters = [fx.make_lora_adapter(base, root / f"tiny{s}", "llama", seed=s) for s in range(2)]
    data = [fx.write_calibration(root / f"tiny{s}.jsonl", "jsonl", 16, seed=s) for s in range(2)]
    cfg = {
        "base_model": str(base), "method": "iteris", "parameters": {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4},
        "calibration": {"samples": 16, "batch_size": 4},
        "adapters": [{"name": f"t{i}", "path": str(a), "data": str(d)} for i, (a, d) in enumerate(zip(adapters, data))],
        "progress": False,
    }
    ref = iteris.merge({**cfg, "device": "cpu", "dtype": "float64", "calibration": {**cfg["calibration"], "stats_dtype": "float64"}})
    rows = []
    for dtype in ("float32", "bfloat16"):
        got = iteris.merge({**cfg, "device": "cuda", "dtype": dtype})
        num = sum(float((got.deltas[n].dense() - ref.deltas[n].dense()).pow(2).sum()) for n in ref.deltas)
        den = sum(float(ref.deltas[n].dense().pow(2).sum()) for n in ref.deltas)
        rows.append({"device": "cuda", "dtype": dtype, "relative_difference_vs_cpu_float64": (num / den) ** 0.5})
    plain = iteris.merge({**cfg, "device": "cuda", "dtype": "float32"})
    offloaded = iteris.merge({**cfg, "device": "cuda", "dtype": "float32",
                              "calibration": {**cfg["calibration"], "offload_stats": True}})
    same = max(float((offloaded.deltas[n].dense() - plain.deltas[n].dense()).abs().max()) for n in ref.deltas)
    rows.append({"device": "cuda", "dtype": "float32", "offload_stats": True, "max_abs_difference_vs_not_offloaded": same})
    return rows, cfg


def guards(cfg: dict) -> list[dict]:
    """A hook makes one record's embeddings infinite: every GPU path must stop and name it."""
    import importlib
    import json

    import iteris
    from iteris import IterisError

    models = importlib.import_module("iteris.families.loading")
    data = Path(cfg["adapters"][1]["data"])
    first = json.loads(data.read_text().splitlines()[0])["text"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg["base_model"])
    others = {t for line in data.read_text().splitlines()[1:] for t in tok(json.loads(line)["text"])["input_ids"]}
    others |= {t for line in Path(cfg["adapters"][0]["data"]).read_text().splitlines()
               for t in tok(json.loads(line)["text"])["input_ids"]}
    poison = next(t for t in tok(first)["input_ids"] if t not in others)
    real = models.load_base_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output.masked_fill((inputs[0] == poison).unsqueeze(-1), float("inf")))
        return model

    models.load_base_model = load
    rows = []
    try:
        for offload in (False, True):
            for schedule in ("global", "sequential"):
                try:
                    iteris.merge({**cfg, "device": "cuda", "dtype": "bfloat16",
                                  "parameters": {**cfg["parameters"], "schedule": schedule},
                                  "calibration": {**cfg["calibration"], "offload_stats": offload, "overlap": "on"}})
                    message = "NOT STOPPED"
                except IterisError as exc:
                    message = str(exc)
                rows.append({"offload_stats": offload, "schedule": schedule, "named": "record 1 of" in message,
                             "message": message})
    finally:
        models.load_base_model = real
    return rows


def _build_scale_assets(root: Path, n_adapters: int, samples: int, tokens: int):
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = 32000
    base = root / "llama125m"
    vocab = {f"t{i}": i for i in range(vocab_size - 4)}
    vocab.update({"<unk>": vocab_size - 4, "<s>": vocab_size - 3, "</s>": vocab_size - 2, "<pad>": vocab_size - 1})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(base))
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                         pad_token_id=vocab_size - 1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(base))
    adapters = []
    for i in range(n_adapters):
        model = get_peft_model(
            LlamaForCausalLM(config),
            LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        )
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(str(root / f"adapter{i}"))
        rng = random.Random(i)
        with open(root / f"data{i}.jsonl", "w") as fh:
            for _ in range(samples):
                # each task draws from its own slice of the vocabulary, so the tasks' inputs differ
                words = [f"t{rng.randrange(i * 5000, i * 5000 + 8000)}" for _ in range(tokens - 1)]
                fh.write(json.dumps({"text": " ".join(words)}) + "\n")
        adapters.append((f"task{i}", str(root / f"adapter{i}"), str(root / f"data{i}.jsonl")))
    return str(base), adapters


def scale(root: Path, n_adapters: int, sample_counts: list[int], tokens: int, iterations: int) -> list[dict]:
    import iteris

    base, adapters = _build_scale_assets(root, n_adapters, max(sample_counts), tokens)
    rows = []
    for samples in sample_counts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = iteris.merge({
            "base_model": base, "method": "iteris", "device": "cuda", "dtype": "bfloat16",
            "parameters": {"iterations": iterations},
            "calibration": {"samples": samples, "max_length": tokens, "batch_size": 8},
            "adapters": [{"name": n, "path": p, "data": d} for n, p, d in adapters],
            "progress": False,
        })
        torch.cuda.synchronize()
        t = result.report["timings"]
        rows.append({
            "adapters": n_adapters, "samples": samples, "tokens_per_sample": tokens, "iterations": iterations,
            "wall_s": time.perf_counter() - start, "load_s": t["load"], "capture_s": t["capture"], "solve_s": t["solve"],
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
            "last_relative_change": result.report["iterations"][-1]["relative_change"],
        })
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--samples", default="16,64")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["agreement"], cfg = agreement(root)
        for row in results["agreement"]:
            if "offload_stats" in row:
                print(f"agreement  offload_stats, float32: max |difference| vs not offloaded: "
                      f"{row['max_abs_difference_vs_not_offloaded']:.2e}")
            else:
                print(f"agreement  {row['dtype']:9s} relative difference vs CPU float64: "
                      f"{row['relative_difference_vs_cpu_float64']:.2e}")
        results["guards"] = guards(cfg)
        for row in results["guards"]:
            print(f"guards     offload_stats={row['offload_stats']!s:5} {row['schedule']:10s} stopped and named: "
                  f"{row['named']}  ({row['message'][:150]})")
        counts = [int(s) for s in args.samples.split(",")]
        results["scale"] = scale(root, args.adapters, counts, args.tokens, args.iterations)
    print(f"\n{results['device']}: random Llama ~125M, {args.adapters} LoRAs r16 x 7 projections, bf16, {args.iterations} iterations")
    print(f"{'samples':>8} {'tokens':>7} {'wall s':>8} {'capture s':>10} {'solve s':>8} {'peak GB':>8}")
    for r in results["scale"]:
        print(f"{r['samples']:>8} {r['tokens_per_sample']:>7} {r['wall_s']:>8.1f} {r['capture_s']:>10.2f} {r['solve_s']:>8.2f} {r['peak_gpu_gb']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
