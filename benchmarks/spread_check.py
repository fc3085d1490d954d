"""A model spread over several GPUs (``device_map``) merges to the same deltas as on one GPU (needs 2+ GPUs).

    PYTHONPATH=src python benchmarks/spread_check.py [--size 1b] [--samples 8] [--iterations 2]

Saves a random Llama-shaped model, loads it once on cuda:0 and once with device_map="balanced", runs the
same merge on both and prints the relative difference of the merged deltas, the placement and each GPU's
peak memory. The same property at tiny shapes is a test: tests/gpu/test_multi_gpu.py (`python -m pytest -m multi_gpu`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

import speed


def main():
    from transformers import AutoModelForCausalLM

    from iteris.merge import merge_loaded

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1b", choices=sorted(speed.SIZES))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--device-map", default="balanced")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("spread_check needs at least two GPUs")
    with tempfile.TemporaryDirectory() as tmp:
        built = speed.build_model(args.size, "cuda:0")  # random init on the GPU: minutes faster at 8B
        built.save_pretrained(tmp)
        del built
        torch.cuda.empty_cache()
        single = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to("cuda:0").eval()
        adapters = speed.make_adapters(single, 4)
        samples = speed.make_samples(4, args.samples, 512)
        params = {"iterations": args.iterations, "alpha1": 1e-5, "alpha2": 1e-5}
        calibration = {"batch_size": 8, "stats_dtype": "float64"}
        start = time.perf_counter()
        one, _ = merge_loaded(single, adapters, samples, parameters=params, calibration=calibration)
        one_s = time.perf_counter() - start
        del single
        torch.cuda.empty_cache()
        for d in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(d)
        spread = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, device_map=args.device_map).eval()
        placement = sorted({str(p.device) for p in spread.parameters()})
        start = time.perf_counter()
        many, report = merge_loaded(spread, adapters, samples, parameters=params, calibration=calibration)
        many_s = time.perf_counter() - start
    num = sum(float((many[n].dense().cpu() - one[n].dense().cpu()).pow(2).sum()) for n in one)
    den = sum(float(one[n].dense().cpu().pow(2).sum()) for n in one)
    print(f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}")
    print(f"placement {placement}; walk {report['calibration']['walk']}")
    print(f"one GPU {one_s:.1f} s, spread {many_s:.1f} s; relative difference of the merged deltas {(num / den) ** 0.5:.2e}")
    for d in range(torch.cuda.device_count()):
        print(f"cuda:{d} peak {torch.cuda.max_memory_allocated(d) / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
