"""Merging text-to-image LoRAs on a GPU: a Stable-Diffusion-1.5-shaped pipeline with random weights (no
download; the values do not change the timing), two random LoRAs (rank 16 on the UNet's attention and 1x1
projections and on the text encoder's attention), IterIS calibrated on each LoRA's own sampling runs.

    PYTHONPATH=src python benchmarks/pipeline_speed.py [--size sd15|tiny] [--out results/pipeline/]

Prints wall time, the recorded calls and peak GPU memory for 8 and 32 prompts per LoRA (memory should stay
flat: statistics, not features), the data-free linear merge for comparison, and how far a half-precision
merge lands from the float32 one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(600)]


def tokenizer(model_max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def build(size: str, path: Path, dtype):
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: much faster
        _build(size, path, dtype)


def _build(size: str, path: Path, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size == "sd15":
        tok = tokenizer(77)
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD 1.5's shapes
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                              pad_token_id=1)
    else:
        tok = tokenizer(12)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4,
        )
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    levels = 4 if size == "sd15" else 1  # the VAE only sets the latent size (x8 at SD 1.5); its weights never run
    vae = AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=4)
    StableDiffusionPipeline(
        unet=unet.to(dtype), vae=vae.to(dtype), text_encoder=CLIPTextModel(text).to(dtype), tokenizer=tok,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)


def make_lora(pipe_dir: Path, out: Path, seed: int, rank: int = 16):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(pipe_dir, local_files_only=True)
    torch.manual_seed(seed)
    kwargs = {}
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
               "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
    for component, names in targets.items():
        module = getattr(pipe, component)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights=False), module)
        state = get_peft_model_state_dict(module)
        kwargs[f"{component}_lora_layers"] = {k: v * 0.3 if "lora_B" in k else v for k, v in state.items()}
        kwargs[f"{component}_lora_adapter_metadata"] = {"r": rank, "lora_alpha": rank, "target_modules": names}
    StableDiffusionPipeline.save_lora_weights(str(out), **kwargs)
    return out


def prompts(path: Path, n: int, offset: int):
    import random

    rng = random.Random(offset)
    path.write_text("\n".join(" ".join(rng.choice(WORDS[offset * 200:(offset + 1) * 200]) for _ in range(12)) for _ in range(n)))
    return path


def run(config: dict, method: str = "iteris", **overrides):
    import iteris

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = iteris.merge(config, method=method, **overrides)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return result, wall, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    print(f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(args.size, root / "pipe", dtype)
        loras = [make_lora(root / "pipe", root / f"lora{i}", seed=i) for i in range(2)]
        size = 512 if args.size == "sd15" else None
        for n in (8, 32):
            data = [prompts(root / f"p{i}_{n}.txt", n, i) for i in range(2)]
            config = {
                "base_model": str(root / "pipe"), "device": device, "progress": False,
                "parameters": {"iterations": args.iterations, "alpha1": 1e-4, "alpha2": 1e-4},
                "calibration": {"samples": n, "batch_size": 4, "steps": args.steps, "timesteps": args.timesteps,
                                "seeds": [0], "height": size, "width": size},
                "adapters": [{"name": f"lora{i}", "path": str(p), "data": str(d)} for i, (p, d) in enumerate(zip(loras, data))],
            }
            if n == 8:
                run(config)  # untimed: loads the kernels
            result, wall, peak = run(config)
            unet = result.report["components"]["unet"]
            rows.append({"run": f"iteris, {n} prompts per LoRA", "wall_s": wall, "load_and_record_s": result.report["timings"]["load"],
                         "unet_calls": unet["calibration"]["calls"], "unet_capture_s": unet["timings"]["capture"],
                         "unet_solve_s": unet["timings"]["solve"], "peak_gb": peak})
            if n == 8:
                full, wall32, peak32 = run(config, dtype="float32")
                rows.append({"run": "iteris, 8 prompts, float32 model", "wall_s": wall32, "peak_gb": peak32})
                num = den = 0.0
                for c in result.deltas:
                    for name, d in result.deltas[c].items():
                        ref = full.deltas[c][name]
                        diff = d.B.double() @ d.A.double() - ref.B.double() @ ref.A.double()
                        num += float(diff.pow(2).sum())
                        den += float((ref.B.double() @ ref.A.double()).pow(2).sum())
                rows[-2]["rel_diff_vs_float32"] = (num / den) ** 0.5
                _, wall_lin, peak_lin = run(config, method="linear", parameters={})
                rows.append({"run": "linear (data-free)", "wall_s": wall_lin, "peak_gb": peak_lin})
    print("run | wall s | load + record s | UNet calls per LoRA | UNet capture s | UNet solve s | peak GPU GB | rel. diff vs float32")
    for r in rows:
        cells = [r["run"], f"{r['wall_s']:.1f}", f"{r.get('load_and_record_s', float('nan')):.1f}", str(r.get("unet_calls", "-")),
                 f"{r.get('unet_capture_s', float('nan')):.2f}", f"{r.get('unet_solve_s', float('nan')):.2f}",
                 "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}", f"{r['rel_diff_vs_float32']:.1e}" if "rel_diff_vs_float32" in r else "-"]
        print(" | ".join(cells))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"pipeline_{args.size}.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
