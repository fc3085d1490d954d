"""Two versions of iteris timed side by side in one process, on one random Llama-shaped model: the new one
(the installed ``iteris``) and an older tree loaded as ``iteris_old``, alternating run by run, so that both
see the same GPU, clocks and inputs. Also checks that both give the same merged LoRA.

    PYTHONPATH=src python benchmarks/ab_speed.py --old /path/to/old/src --size 8b --iterations 2 --reps 2 --out DIR
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

import speed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_old(src: Path, name: str = "iteris_old"):
    """An older tree's package under another name (its imports are relative)."""
    spec = importlib.util.spec_from_file_location(name, src / "iteris" / "__init__.py",
                                                  submodule_search_locations=[str(src / "iteris")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def version_api(name: str):
    """(merge_loaded, LoraAdapter, LoraModule, TokenSample) of one version."""
    merge = importlib.import_module(f"{name}.merge")
    adapters = importlib.import_module(f"{name}.adapters")
    try:
        token_sample = importlib.import_module(f"{name}.engine.forward").TokenSample
    except ModuleNotFoundError:
        token_sample = importlib.import_module(f"{name}.models").TokenSample
    deltas = importlib.import_module(f"{name}.deltas")
    lora_module = getattr(deltas, "LoraModule", None) or adapters.LoraModule
    return merge.merge_loaded, adapters.LoraAdapter, lora_module, token_sample


def convert(adapters, samples, api):
    """The same adapters and samples as one version's own classes."""
    _, adapter_cls, module_cls, sample_cls = api
    out_adapters = [adapter_cls(name=a.name, path=a.path, config=a.config,
                                modules={n: module_cls(A=m.A, B=m.B, scale=m.scale) for n, m in a.modules.items()})
                    for a in adapters]
    out_samples = [[sample_cls(input_ids=s.input_ids) for s in task] for task in samples]
    return out_adapters, out_samples


def timed(api, model, adapters, samples, params) -> dict:
    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    speed.sync()
    start = time.perf_counter()
    deltas, report = api[0](model, adapters, samples, parameters=params,
                            calibration={"batch_size": speed.BATCH_SIZE, "stats_dtype": "float32"})
    speed.sync()
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else 0.0
    return {"wall_s": wall, "capture_s": report["timings"]["capture"], "solve_s": report["timings"]["solve"],
            "peak_extra_gb": peak, "deltas": deltas}


def relative_difference(a: dict, b: dict) -> float:
    num = den = 0.0
    for name, ref in b.items():
        x = a[name].B.double().to(DEVICE) @ a[name].A.double().to(DEVICE)
        y = ref.B.double().to(DEVICE) @ ref.A.double().to(DEVICE)
        num += float((x - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", required=True, action="append",
                        help="NAME=DIR: an older tree's src/ directory, timed as NAME (repeatable; DIR alone: 'old')")
    parser.add_argument("--size", default="8b")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--settings", default="global,global0,sequential",
                        help="which of global (alpha1 = alpha2 = 1e-7), global0 (alpha1 = 0), sequential")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    versions = {"new": version_api("iteris")}
    for entry in args.old:
        name, _, folder = entry.rpartition("=")
        name = name or "old"
        load_old(Path(folder), f"iteris_{name}")
        versions[name] = version_api(f"iteris_{name}")
    model = speed.build_model(args.size, DEVICE)
    adapters = speed.make_adapters(model, args.adapters)
    samples = speed.make_samples(args.adapters, args.samples, args.tokens)
    inputs = {v: convert(adapters, samples, api) for v, api in versions.items()}
    known = {
        "global": ("global, alpha1=alpha2=1e-7", {"iterations": args.iterations, "alpha1": 1e-7, "alpha2": 1e-7}),
        "global0": ("global, alpha1=0", {"iterations": args.iterations, "alpha1": 0.0, "alpha2": 1e-7}),
        "sequential": ("sequential", {"schedule": "sequential", "alpha1": 1e-7, "alpha2": 1e-7}),
    }
    settings = [known[k] for k in args.settings.split(",")]
    for v, api in versions.items():  # untimed: kernels loaded, caches warm, for both
        a, s = inputs[v]
        timed(api, model, a, [t[:2] for t in s], {"iterations": 1})
    rows = []
    out = Path(args.out) if args.out else None
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{args.size}, {args.adapters} adapters x {args.samples} x {args.tokens} tokens, {card}")
    print("rep | setting | version | wall s | capture s | solve s | peak GB | rel. diff to new")
    names = list(versions)
    for rep in range(args.reps):
        order = names[::-1] if rep % 2 == 0 else names  # each version first as often as last
        for label, params in settings:
            runs = {}
            for v in order:
                a, s = inputs[v]
                runs[v] = timed(versions[v], model, a, s, params)
            for v in order:
                diff = relative_difference(runs[v]["deltas"], runs["new"]["deltas"]) if rep == 0 else None
                r = {k: x for k, x in runs[v].items() if k != "deltas"}
                rows.append({"rep": rep, "setting": label, "version": v, **r, "relative_difference": diff})
                print(f"{rep} | {label} | {v} | {r['wall_s']:.1f} | {r['capture_s']:.1f} | {r['solve_s']:.2f} | "
                      f"{r['peak_extra_gb']:.1f} | {'-' if diff is None else f'{diff:.1e}'}", flush=True)
            del runs
            if out:
                out.mkdir(parents=True, exist_ok=True)
                (out / "ab_speed.json").write_text(json.dumps({"device": card,
                                                                "args": vars(args), "rows": rows}, indent=1))
    for label, _ in settings:
        mean = {v: sum(r["wall_s"] for r in rows if r["setting"] == label and r["version"] == v)
                / max(1, sum(1 for r in rows if r["setting"] == label and r["version"] == v)) for v in versions}
        print(f"{label}: " + ", ".join(f"new/{v} wall = {mean['new'] / mean[v]:.3f}" for v in names[1:]))


if __name__ == "__main__":
    main()
