"""``iteris demo``: a complete merge on a small model built on the spot, offline, in seconds.

Three LoRAs of a small Llama-style model each respond to sentences from one domain (sports, cooking,
finance). Every method merges them into one adapter; the table shows, per domain, how much of that
adapter's effect on the next-token logits the merged adapter loses on held-out sentences
(0 = behaves exactly like the adapter, 1 = no better than the base model).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

DOMAINS = {
    "sports": "team player goal match coach score league season ball field win runner race stadium fans referee",
    "cooking": "pan oven salt butter garlic onion bake simmer recipe flour sugar sauce pepper kitchen chef taste",
    "finance": "bank loan market stock price rate bond fund budget profit credit tax invest cash debt account",
}
COMMON = "the a of and to in is was with for on at by it this that very new good old big small".split()
METHODS = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.5}),
    ("regmean", {}),
    ("iteris", {"iterations": 5, "alpha1": 1e-4, "alpha2": 1e-4}),
]


def _sentences(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = DOMAINS[domain].split()
    out = []
    for _ in range(n):
        length = rng.randint(6, 16)
        out.append(" ".join(rng.choice(words) if rng.random() < 0.6 else rng.choice(COMMON) for _ in range(length)))
    return out


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ws in DOMAINS.values() for w in ws.split()} | set(COMMON))
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.save_pretrained(str(directory))
    return tok


def build_assets(root: Path, seed: int = 0) -> dict:
    """A base model directory, one LoRA per domain, calibration files and held-out sentences."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base_dir = root / "base"
    tok = _tokenizer(base_dir)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(str(base_dir))
    tasks = []
    for index, domain in enumerate(DOMAINS):
        model = LlamaForCausalLM.from_pretrained(str(base_dir))
        peft_model = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        )
        gen = torch.Generator().manual_seed(1000 + index)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
        adapter_dir = root / domain
        peft_model.save_pretrained(str(adapter_dir))
        data = root / f"{domain}.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(domain, 40, seed=index)))
        tasks.append({"name": domain, "path": str(adapter_dir), "data": str(data),
                      "held_out": _sentences(domain, 20, seed=100 + index)})
    return {"base_model": str(base_dir), "tokenizer": tok, "tasks": tasks}


@torch.no_grad()
def _logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    out = model(**enc).logits
    return out[enc["attention_mask"].bool()]


def effect_lost(base_dir: str, tok, tasks: list[dict], merged_dir: str | None) -> dict[str, float]:
    """Per task: ||merged - adapter|| / ||base - adapter|| of the logits on held-out sentences."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), merged_dir).eval() if merged_dir else base
    scores = {}
    for task in tasks:
        own = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), task["path"]).eval()
        want = _logits(own, tok, task["held_out"])
        gap = torch.linalg.norm(_logits(base, tok, task["held_out"]) - want)
        scores[task["name"]] = float(torch.linalg.norm(_logits(merged, tok, task["held_out"]) - want) / gap)
    return scores


def run_demo(out: str | None = None, force: bool = False, quiet: bool = False) -> dict:
    import os

    from transformers.utils import logging as hf_logging

    from .merge import merge
    from .output import atomic_directory, check_output_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally
    hf_logging.disable_progress_bar()
    if out is not None:
        check_output_dir(out, force)
    with tempfile.TemporaryDirectory(prefix="iteris-demo-") as tmp:
        root = Path(tmp)
        assets = build_assets(root)
        tasks = assets["tasks"]
        config = {
            "base_model": assets["base_model"],
            "calibration": {"samples": 40, "max_length": 32, "batch_size": 8},
            "adapters": [{"name": t["name"], "path": t["path"], "data": t["data"]} for t in tasks],
            "device": "cpu",
            "dtype": "float32",
            "progress": not quiet,
        }
        rows = {"base model": effect_lost(assets["base_model"], assets["tokenizer"], tasks, None)}
        reports = {}
        for method, params in METHODS:
            result = merge({**config, "method": method, "parameters": params})
            merged_dir = root / f"merged-{method}"
            result.save(merged_dir)
            rows[method] = effect_lost(assets["base_model"], assets["tokenizer"], tasks, str(merged_dir))
            reports[method] = result.report
        table = _table(rows, [t["name"] for t in tasks])
        print("\nFraction of each adapter's effect on held-out logits that the merged adapter loses (lower is better):\n")
        print(table)
        print("\n" + reports["iteris"]["summary"])
        results = {"effect_lost": rows, "reports": reports}
        if out is not None:
            with atomic_directory(out, force) as target:
                import shutil

                shutil.copytree(root / "merged-iteris", target / "iteris")
                (target / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(f"\nIterIS adapter and results.json written to {out}")
    return results


def _table(rows: dict[str, dict[str, float]], tasks: list[str]) -> str:
    from .evaluate import text_table

    body = []
    for method, scores in rows.items():
        values = [scores[t] for t in tasks]
        body.append([method] + [f"{v:.3f}" for v in values] + [f"{sum(values) / len(values):.3f}"])
    return text_table(["method"] + tasks + ["mean"], body)
