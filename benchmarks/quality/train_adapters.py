"""Train the benchmark's LoRA adapters (seeded): one per task on SmolLM2-135M-Instruct, and one classifier
per labelled task on all-MiniLM-L6-v2 (the RegMean/GLUE-style setting: each task keeps its own head).

    python benchmarks/quality/prepare_data.py          # the task files
    python benchmarks/quality/train_adapters.py [--tasks a,b] [--device cuda]

Adapters are written to benchmarks/quality/adapters/{smollm2,minilm}/<task>/ with bfloat16 LoRA factors
(they are committed, so nobody has to retrain).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from iteris.assets import minilm_dir, smollm2_dir
from iteris.families.loading import load_tokenizer

HERE = Path(__file__).resolve().parent

LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the encoder's attention and feed-forward linears; not the pooler, whose output only the task heads read
ENCODER_MAX_LENGTH = 128
ENCODER_TARGETS = r".*encoder\.layer\.\d+\..*\.(query|key|value|dense)$"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _to_bf16(directory: Path) -> None:
    from safetensors.torch import load_file, save_file

    (directory / "README.md").unlink(missing_ok=True)  # an empty model card
    f = directory / "adapter_model.safetensors"
    state = {k: (v.to(torch.bfloat16) if "lora_" in k else v) for k, v in load_file(str(f)).items()}
    save_file(state, str(f), metadata={"format": "pt"})


def _loop(model, batches, steps: int, lr: float, device: str) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    last = []
    for step, batch in zip(range(steps), batches):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        last.append(float(loss))
    model.eval()
    return sum(last[-20:]) / len(last[-20:])


def _train_and_save(model, batches, steps: int, lr: float, device: str, family: str, task: str) -> dict:
    start = time.perf_counter()
    loss = _loop(model, batches, steps, lr, device)
    out = HERE / "adapters" / family / task
    model.save_pretrained(str(out))
    _to_bf16(out)
    return {"task": task, "model": family, "steps": steps, "lr": lr, "final_loss": loss,
            "seconds": time.perf_counter() - start, "device": device}


def _cycle(items: list, batch_size: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = list(items)
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train_llm(task: str, device: str, steps: int, batch_size: int, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = smollm2_dir()
    tok = load_tokenizer(str(base))  # sets a pad token where the tokenizer has none
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LLM_TARGETS,
                                             task_type="CAUSAL_LM"))
    examples = []
    for r in _records(HERE / "data" / task / "train.jsonl"):
        prompt = tok(r["prompt"])["input_ids"][-320:]
        response = tok(r["response"], add_special_tokens=False)["input_ids"][:48]
        examples.append((prompt + response, [-100] * len(prompt) + response))

    def collate(chunk):
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), length), tok.pad_token_id)
        labels = torch.full((len(chunk), length), -100)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (i, l) in enumerate(chunk):
            ids[row, : len(i)], labels[row, : len(l)], mask[row, : len(i)] = torch.tensor(i), torch.tensor(l), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return _train_and_save(model, (collate(c) for c in _cycle(examples, batch_size, seed)), steps, 3e-4, device,
                           "smollm2", task)


def train_encoder(task: str, device: str, steps: int, batch_size: int, seed: int, lr: float) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    meta = json.loads((HERE / "data" / task / "task.json").read_text())
    base = minilm_dir()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(meta["choices"])).to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=ENCODER_TARGETS,
                                             task_type="SEQ_CLS"))
    examples = [(r["text"], r["label"]) for r in _records(HERE / "data" / task / "classify_train.jsonl")]

    def collate(chunk):
        enc = tok([t for t, _ in chunk], padding=True, truncation=True, max_length=ENCODER_MAX_LENGTH, return_tensors="pt")
        return {**enc, "labels": torch.tensor([l for _, l in chunk])}

    return _train_and_save(model, (collate(c) for c in _cycle(examples, batch_size, seed)), steps, lr, device,
                           "minilm", task)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all prepared tasks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llm-steps", type=int, default=300)
    parser.add_argument("--encoder-steps", type=int, default=300)
    parser.add_argument("--encoder-lr", type=float, default=3e-4)
    parser.add_argument("--encoder-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args()
    tasks = args.tasks.split(",") if args.tasks else sorted(p.name for p in (HERE / "data").iterdir() if p.is_dir())
    log = []
    for task in tasks:
        if not args.skip_llm:
            log.append(train_llm(task, args.device, args.llm_steps, 16, args.seed))
            print(json.dumps(log[-1]), flush=True)
        if not args.skip_encoder and (HERE / "data" / task / "classify_train.jsonl").is_file():
            log.append(train_encoder(task, args.device, args.encoder_steps, args.encoder_batch, args.seed, args.encoder_lr))
            print(json.dumps(log[-1]), flush=True)
    # one log for every adapter shipped; a run that trains some of them updates their entries
    path = HERE / "adapters" / "training_log.json"
    kept = json.loads(path.read_text()) if path.is_file() else []
    done = {(e["task"], e["model"]) for e in log}
    merged = [e for e in kept if (e["task"], e["model"]) not in done] + log
    path.write_text(json.dumps(sorted(merged, key=lambda e: (e["model"], e["task"])), indent=2) + "\n")


if __name__ == "__main__":
    main()
