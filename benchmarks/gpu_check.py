"""First scale figures for `iteris merge` on a GPU (the full speed benchmark is a separate script).

A random ~125M-parameter Llama (hidden 768, 12 layers), N LoRAs of rank 16 on all seven projections, S samples
x T tokens per adapter, bf16 forwards, fp32 statistics, float64 solves: per-phase wall time and peak GPU memory
for several S (memory should stay flat in S).

The GPU correctness checks this script used to print (agreement with a CPU float64 merge, offloaded statistics,
non-finite activations stopped and named) are tests now: tests/gpu/ (`python -m pytest -m gpu`).

    python benchmarks/gpu_check.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
