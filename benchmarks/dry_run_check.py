"""How close `iteris merge --dry-run` comes to the merge it plans: a Llama of about 1B parameters (random
weights, SmolLM2's tokenizer) and four random rank-8 LoRA adapters on every projection, calibrated on the demo
tasks' prompts; the dry run's peak-memory and time estimates against the merge's own report, each in a fresh
process, one method after another.

    python benchmarks/dry_run_check.py --out /tmp/dry_run_check [--methods iteris,regmean] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "src" / "iteris" / "demo_assets"
TASKS = ["sentiment", "lead_sentence", "moral_foundation", "word_pleasantness"]


def build(root: Path, small: bool, tokenizer_dir: str | None) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from iteris.assets import smollm2_dir

    if (root / "base" / "config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or smollm2_dir())
    size = (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
            if small else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8))
    config = LlamaConfig(vocab_size=len(tokenizer), **size, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"base: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for index, task in enumerate(TASKS):
        torch.manual_seed(index + 1)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                      task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(root / task)
        model = peft_model.unload()


def run(args: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "iteris", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="iteris,regmean")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--tokenizer", help="a directory holding SmolLM2's tokenizer (default: the demo model's)")
    parser.add_argument("--small", action="store_true", help="a 2-block model (a smoke test of this script)")
    args = parser.parse_args()
    root = Path(args.out)
    build(root, args.small, args.tokenizer)
    rows = []
    for method in args.methods.split(","):
        cfg = {"base_model": str(root / "base"), "method": method, "progress": False,
               "calibration": {"samples": args.samples, "max_length": 256},
               "adapters": [{"name": t, "path": str(root / t), "data": str(DEMO / "data" / t / "calibration.jsonl")}
                            for t in TASKS]}
        path = root / f"{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        planned, plan_seconds = run(["merge", str(path), "--out", str(root / f"{method}_out"), "--dry-run",
                                      "--force"])
        print(planned, flush=True)
        memory = float(re.search(r"memory: (\d+) MB", planned).group(1))
        estimate = float(re.search(r"estimated time: ([0-9.e+]+) s", planned).group(1))
        run(["merge", str(path), "--out", str(root / f"{method}_out"), "--force", "--quiet"])
        report = json.loads((root / f"{method}_out" / "merge_report.json").read_text())
        peak = report["peak_memory"].get("cuda_max_allocated_mb") or report["peak_memory"]["cpu_max_rss_mb"]
        timings = report["timings"]
        seconds = timings.get("generate", 0.0) + timings["merge"]  # what the estimate covers: not the reading
        rows.append({"method": method, "estimated_mb": memory, "measured_mb": peak, "memory_ratio": memory / peak,
                     "estimated_s": estimate, "measured_s": seconds, "time_ratio": estimate / seconds,
                     "dry_run_s": plan_seconds, "timings": timings,
                     "generate": report["calibration"].get("generate")})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (root / "dry_run_check.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print(f"\n{device}")
    print("| method | estimated MB | measured MB | ratio | estimated s | measured s | ratio | load s | dry run s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['estimated_mb']:.0f} | {r['measured_mb']:.0f} | {r['memory_ratio']:.2f} | "
              f"{r['estimated_s']:.1f} | {r['measured_s']:.1f} | {r['time_ratio']:.2f} | {r['timings']['load']:.1f} | "
              f"{r['dry_run_s']:.1f} |")


if __name__ == "__main__":
    main()
