"""Strong and weak scaling of the distributed merge: the same `iteris merge` on 1, 2, ... processes.

    PYTHONPATH=src python benchmarks/distributed.py --size 8b --procs 1,2 --out results/distributed/
    PYTHONPATH=src python benchmarks/distributed.py --size 1b --procs 1,2 --scaling strong,weak
    PYTHONPATH=src python benchmarks/distributed.py --size tiny --procs 1,2 --samples 4 --tokens 32   # CPU, gloo

A random Llama-shaped model of benchmarks/speed.py's sizes (bf16 on GPUs) is saved with a word-level
tokenizer, four random PEFT LoRAs of rank 16 on all seven projections beside it, and per adapter S texts of
T words (one token each). Each run is `torchrun --nproc-per-node N -m iteris merge` (N = 1: one plain
process), timed end to end (processes started, model loaded, merged, written); the report gives each rank's
phases, bytes communicated and peak GPU memory. Strong scaling keeps S fixed; weak scaling multiplies it by N. The merged adapters
are compared with the one-process result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import speed

PROJECTIONS = list(speed.PROJECTIONS)  # the speed benchmark's targets (a list: it goes into JSON)


def save_model(size: str, path: Path, device: str, stream: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if stream:
        stream_checkpoint(size, path, device)
        stream_adapters(size, path, 4)
    else:
        model = speed.build_model(size, device)
        model.save_pretrained(path)
        save_adapters(model, path.parent, 4)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(speed.VOCAB - 4)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def _meta_model(size: str):
    from transformers import LlamaForCausalLM

    config = speed.llama_config(size)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def stream_checkpoint(size: str, path: Path, device: str, shard_bytes: int = 4 << 30) -> None:
    """A random bf16 checkpoint written tensor by tensor (as transformers' init: normal(0, 0.02), norms 1), never
    holding the model: for sizes larger than one GPU or than CPU memory per process."""
    from safetensors.torch import save_file

    model = _meta_model(size)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    generator = torch.Generator(device).manual_seed(0)
    weight_map, shard, held, total, k = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, held, k
        name = f"model-{k:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, held, k = {}, 0, k + 1

    for name, p in model.named_parameters():
        if p.dim() == 1:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=generator).cpu()
        shard[name] = t
        held += t.numel() * 2
        total += t.numel() * 2
        if held >= shard_bytes:
            flush()
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


def stream_adapters(size: str, base: Path, n: int, rank: int = 16) -> None:
    """Random PEFT LoRAs written straight to files (A as PEFT initialises it, B normal(0, 0.01))."""
    from safetensors.torch import save_file

    model = _meta_model(size)
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        tensors = {}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                d_out, d_in = module.weight.shape
                bound = d_in ** -0.5
                tensors[f"base_model.model.{name}.lora_A.weight"] = torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator)
                tensors[f"base_model.model.{name}.lora_B.weight"] = torch.empty(d_out, rank).normal_(0, 0.01, generator=generator)
        out = base.parent / f"adapter{i}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": PROJECTIONS, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "base_model_name_or_path": str(base)}))


def save_adapters(model, root: Path, n: int) -> None:
    from peft import LoraConfig, get_peft_model

    for i in range(n):
        torch.manual_seed(i)
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        peft_model.save_pretrained(root / f"adapter{i}")
        model = peft_model.unload()


def write_data(root: Path, adapters: int, samples: int, tokens: int) -> list[Path]:
    import random

    paths = []
    for i in range(adapters):
        rng = random.Random(i)
        low = (i * 5000) % (speed.VOCAB - 8000)
        rows = [{"text": " ".join(f"w{rng.randrange(low, low + 8000)}" for _ in range(tokens))} for _ in range(samples)]
        path = root / f"data{i}_{samples}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        paths.append(path)
    return paths


def run(procs: int, config: Path, out: Path, profile: str | None = None) -> float:
    command = [sys.executable, "-m", "iteris", "merge", str(config), "--out", str(out), "--force", "--quiet"]
    if profile:  # each rank under torch.profiler, its tables in PROFILE/<procs>/rank<N>.txt
        here = Path(__file__).resolve().parent
        command = [sys.executable, str(here / "profile_rank.py"), str(config), str(out), str(Path(profile) / str(procs))]
    if procs > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs)] + command[1:]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall


def relative_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    num = den = 0.0
    for key in x:
        if key.endswith("lora_A.weight"):
            bk = key.replace("lora_A", "lora_B")
            dx, dy = x[bk].double() @ x[key].double(), y[bk].double() @ y[key].double()
            num += float((dx - dy).pow(2).sum())
            den += float(dy.pow(2).sum())
    return (num / den) ** 0.5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="8b", choices=sorted(speed.SIZES))
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts (GPUs, or CPU processes)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=511, help="words per text (+1 for the BOS token)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--alpha1", type=float, default=0.0)
    parser.add_argument("--scaling", default="strong",
                        help="strong (samples fixed), weak (samples per adapter grow with the process count), or both: "
                             "strong,weak (one single-process reference for both)")
    parser.add_argument("--shard", default="auto", choices=["auto", "blocks", "off"],
                        help="calibration.shard: blocks shards every block's weights over the processes (FSDP2)")
    parser.add_argument("--stream-checkpoint", action="store_true",
                        help="write the random checkpoint and adapters tensor by tensor (always for 70b)")
    parser.add_argument("--profile", default=None,
                        help="a folder: run every rank under torch.profiler and write its top kernels and host ops there "
                             "(slower: use few iterations; the timings are then the profiled ones)")
    parser.add_argument("--workdir", default=None,
                        help="where the random checkpoint, adapters and outputs go (e.g. /dev/shm for 70b: 140 GB)")
    parser.add_argument("--splits", default="auto",
                        help="comma-separated calibration.split values to run on more than one process (auto, adapters, samples)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    procs = [int(p) for p in args.procs.split(",")]
    if cuda and max(procs) > torch.cuda.device_count():
        sys.exit(f"{max(procs)} processes need as many GPUs; {torch.cuda.device_count()} visible")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"{name} x{torch.cuda.device_count() if cuda else os.cpu_count()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        save_model(args.size, root / "base", device, stream=args.stream_checkpoint or args.size == "70b")
        torch.cuda.empty_cache() if cuda else None
        reference = None
        kinds = args.scaling.split(",")
        runs = [(n, split, kind) for kind in kinds for n in procs for split in (args.splits.split(",") if n > 1 else ["-"])
                if n > 1 or kind == kinds[0]]
        for n, split, kind in runs:
            samples = args.samples * (n if kind == "weak" else 1)
            data = write_data(root, 4, samples, args.tokens)
            config = {
                "base_model": str(root / "base"), "method": "iteris", "progress": False, "dtype": "bfloat16" if cuda else "float32",
                "parameters": {"iterations": args.iterations, "alpha1": args.alpha1, "alpha2": 1e-7},
                "calibration": {"samples": samples, "max_length": args.tokens + 1, "batch_size": 8,
                                "split": "auto" if split == "-" else split, "shard": args.shard},
                "adapters": [{"name": f"a{i}", "path": str(root / f"adapter{i}"), "data": str(d)} for i, d in enumerate(data)],
            }
            path = root / f"merge_{n}_{split}_{samples}.yaml"
            path.write_text(json.dumps(config))
            out = root / f"out_{n}_{split}_{samples}"
            wall = run(n, path, out, args.profile)
            report = json.loads((out / "merge_report.json").read_text())
            ranks = report.get("distributed", {}).get("ranks") or [{"timings": report["timings"], "bytes_communicated": 0,
                                                                   "communication_seconds": 0.0,
                                                                   "peak_memory": report["peak_memory"]}]
            slowest = max(ranks, key=lambda r: r["timings"]["total"])
            row = {"scaling": kind if n > 1 else "-", "procs": n, "split": report.get("distributed", {}).get("split", "-"), "samples_per_adapter": samples, "wall_s": wall, "load_s": slowest["timings"]["load"],
                   "capture_s": slowest["timings"].get("capture"), "solve_s": slowest["timings"].get("solve"),
                   "merge_s": slowest["timings"]["total"], "bytes_per_rank": max(r["bytes_communicated"] for r in ranks),
                   "communication_s": max(r["communication_seconds"] for r in ranks),
                   "peak_gib": max(r["peak_memory"].get("cuda_max_allocated_mb", 0.0) for r in ranks) / 1024}
            if reference is None:
                reference = (out, wall, samples, row["merge_s"])
            else:
                row["rel_diff_vs_1"] = relative_difference(out, reference[0]) if samples == reference[2] else None
            work = samples / reference[2]
            row["speedup"] = reference[1] * work / wall
            row["merge_speedup"] = reference[3] * work / row["merge_s"]  # without process start-up and writing
            row["efficiency"] = row["speedup"] / (n / procs[0])
            rows.append(row)
    kind = "_".join(kinds)
    print(f"{args.scaling} scaling, {args.size}, 4 adapters, {args.tokens + 1} tokens per sample, {args.iterations} iterations, "
          f"alpha1 {args.alpha1:g}")
    print("scaling | procs | split | samples/adapter | wall s | load s | capture s | solve s | merge s | MiB per rank | comm s | "
          "peak GiB per GPU | speed-up | merge speed-up | efficiency | rel. diff vs first")
    for r in rows:
        print(" | ".join([r["scaling"], str(r["procs"]), r["split"], str(r["samples_per_adapter"]), f"{r['wall_s']:.1f}", f"{r['load_s']:.1f}",
                          f"{r['capture_s'] or 0:.1f}", f"{r['solve_s'] or 0:.1f}", f"{r['merge_s']:.1f}",
                          f"{r['bytes_per_rank'] / 2**20:.1f}", f"{r['communication_s']:.2f}", f"{r['peak_gib']:.1f}", f"{r['speedup']:.2f}",
                          f"{r['merge_speedup']:.2f}",
                          f"{r['efficiency']:.0%}", f"{r['rel_diff_vs_1']:.1e}" if r.get("rel_diff_vs_1") is not None else "-"]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{kind}_{args.size}.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
