"""Proof that a refactor changed no merged output: record the merged LoRA factors of many merges on tiny
fixture models with one version of the code, record them again with another, and compare.

    PYTHONPATH=src python benchmarks/equivalence.py record OUT.pt [--only SUBSTR ...] [--keep]
    python benchmarks/equivalence.py compare OLD.pt NEW.pt [--only SUBSTR ...] [-v]
    python benchmarks/equivalence.py list

``record`` builds tiny models (Llama, GPT-2, T5, BERT), adapters, calibration files, diffusers pipelines
(SD, SDXL, Flux, SD3 shapes) and image models (ViT, LLaVA, BLIP) from the test helpers
(``tests/helpers/fixtures.py``, ``tests/helpers/pipeline_fixtures.py``, ``tests/families/test_vision.py`` of the
checkout this script sits in, loaded by file path) into a temporary directory with fixed seeds, runs every case
through the stable public API only (``iteris.merge.merge`` with a dict config), and saves every
merged layer's ``A`` and ``B`` (and any ``modules_to_save`` tensors written beside them) to one file. The
``iteris`` it imports is whatever ``PYTHONPATH`` points at (printed, and stored in the file), so the same
script records old and new code:

    git worktree add /tmp/old_c3793a1 c3793a1
    PYTHONPATH=/tmp/old_c3793a1/src python benchmarks/equivalence.py record /tmp/equiv_old.pt
    PYTHONPATH=src                  python benchmarks/equivalence.py record /tmp/equiv_new.pt
    python benchmarks/equivalence.py compare /tmp/equiv_old.pt /tmp/equiv_new.pt

A case that raises is recorded with its error (and printed), never dropped. ``compare`` prints one row per
case: its layers, how many are bit-identical (A and B), the largest relative difference ||a - b|| / ||b||
of the products B @ A (float64) over its layers, and the verdict: ``identical``, ``ok`` (every layer within
1e-6), ``FAIL`` (a layer beyond it, a different set of layers, a different rank, a reported SVD error
moved by more than 1e-6), ``ERROR`` (raised on one side), ``MISSING`` (recorded in the old recording only;
compare two full recordings, or pass the same --only to compare), ``new`` (a case only the new code has, a
new method say: not a failure); ``skip`` when both sides raised. Exit status 1
on any FAIL / ERROR / MISSING. CPU only, one thread: the whole record takes about 20 s on a 2-core CPU.
Recording twice with the same code gives bit-identical files (every case ``identical``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, whatever the machine has

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
TOLERANCE = 1e-6
FORMAT = 1

try:  # the iteris that PYTHONPATH (or an install) gives; failing both, this checkout's own src/
    import iteris  # noqa: F401
except ImportError:
    sys.path.insert(0, str(HERE.parent / "src"))

# --------------------------------------------------------------------------------------------
# Test helpers, loaded by file path from this checkout's tests/


def _load(name: str, path: Path):
    """Import ``path`` as module ``name`` (registered, so that helpers importing each other find it); an
    ``__init__.py`` is loaded as package ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    package = [str(path.parent)] if path.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _tests_package(sub: str):
    """This checkout's ``tests`` and ``tests.<sub>`` packages: the helpers import each other as ``tests.helpers.*``."""
    _load("tests", TESTS / "__init__.py")
    _load(f"tests.{sub}", TESTS / sub / "__init__.py")


def fixtures():
    _tests_package("helpers")
    return _load("tests.helpers.fixtures", TESTS / "helpers" / "fixtures.py")


def pipeline_fixtures():
    fixtures()
    return _load("tests.helpers.pipeline_fixtures", TESTS / "helpers" / "pipeline_fixtures.py")


def vision_helpers():
    fixtures()
    _load("tests.helpers.reference", TESTS / "helpers" / "reference.py")  # test_vision imports it
    _tests_package("families")
    return _load("tests.families.test_vision", TESTS / "families" / "test_vision.py")


def _seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------------------------
# Inputs, built lazily (only what the selected cases need) into one temporary directory


class Inputs:
    def __init__(self, root: Path):
        self.root = root
        self._cache: dict = {}

    def _once(self, key, build):
        if key not in self._cache:
            _seed_everything(0)
            self._cache[key] = build()
        return self._cache[key]

    def base(self, family: str) -> Path:
        def build():
            d = self.root / "bases" / family
            fixtures().make_base_model(d, family, seed=0)
            return d

        return self._once(("base", family), build)

    def adapter(self, family: str, seed: int, **lora_kwargs) -> Path:
        key = ("adapter", family, seed, json.dumps(lora_kwargs, sort_keys=True))

        def build():
            d = self.root / "adapters" / f"{family}_s{seed}_{len(self._cache)}"
            fixtures().make_lora_adapter(self.base(family), d, family, seed, **lora_kwargs)
            return d

        return self._once(key, build)

    def data(self, kind: str, n: int, seed: int) -> Path:
        ext = {"txt": "txt", "csv": "csv"}.get(kind, "jsonl")

        def build():
            return fixtures().write_calibration(self.root / "data" / f"{kind}_n{n}_s{seed}.{ext}", kind, n, seed)

        return self._once(("data", kind, n, seed), build)

    def pipeline(self, kind: str = "sd") -> dict:
        """A tiny pipeline (tests/helpers/pipeline_fixtures.py) and two LoRAs with their prompts, as tests/families/test_diffusion.py
        builds them. sd: a diffusers-format LoRA (UNet + text encoder) and a kohya-format one (UNet only);
        sdxl, flux, sd3: diffusers-format LoRAs on the denoiser and text encoders (the second flux one on the
        denoiser only)."""

        def build():
            pf = pipeline_fixtures()
            root = self.root / kind
            prompts = self.prompts()
            if kind == "sd":
                pipe = pf.build_pipeline(root / "pipe")
                first = pf.save_diffusers_lora(pf.lora_layers(pipe, seed=1), root / "cube")
                second = pf.save_kohya_lora(pf.lora_layers(pipe, seed=2, targets={"unet": pf.UNET_TARGETS}), root / "dog")
                return {"pipe": pipe, "adapters": list(zip((first, second), prompts))}
            import diffusers

            if kind == "sdxl":
                pipe, cls = pf.build_sdxl_pipeline(root / "pipe"), diffusers.StableDiffusionXLPipeline
                targets = [{"unet": pf.UNET_TARGETS, "text_encoder": ("q_proj", "v_proj"),
                            "text_encoder_2": ("q_proj", "fc1")}] * 2
            elif kind == "flux":
                pipe, cls = pf.build_flux_pipeline(root / "pipe"), diffusers.FluxPipeline
                denoiser = ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "add_k_proj")
                targets = [{"transformer": denoiser, "text_encoder": ("q_proj", "v_proj")}, {"transformer": denoiser}]
            elif kind == "sd3":
                pipe, cls = pf.build_sd3_pipeline(root / "pipe"), diffusers.StableDiffusion3Pipeline
                targets = [{"transformer": ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_q_proj"),
                            "text_encoder": ("q_proj", "v_proj"), "text_encoder_2": ("q_proj", "fc1")}] * 2
            else:
                raise ValueError(kind)
            paths = [pf.save_diffusers_lora(pf.lora_layers(pipe, seed=s, targets=t), root / f"l{s}", pipeline_class=cls)
                     for s, t in zip((1, 2), targets)]
            return {"pipe": pipe, "adapters": list(zip(paths, prompts))}

        return self._once(("pipeline", kind), build)

    def prompts(self) -> tuple[Path, Path]:
        def build():
            root = self.root / "prompts"
            root.mkdir(parents=True, exist_ok=True)
            cube = root / "cube.jsonl"
            cube.write_text("\n".join(json.dumps({"prompt": t}) for t in ["a red cube", "a green cube on grass", "the cube"]))
            dog = root / "dog.txt"
            dog.write_text("a dog\na blue dog\na dog running\n")
            return cube, dog

        return self._once(("prompts",), build)

    def images(self) -> Path:
        def build():
            import numpy as np
            from PIL import Image

            tv = vision_helpers()
            root = self.root / "images"
            root.mkdir(parents=True, exist_ok=True)
            for i in range(len(tv.TEXTS)):  # tests/families/test_vision.py's `images` fixture
                rng = np.random.RandomState(i)
                size = (20 + 4 * i, 24 + 2 * i)
                Image.fromarray((rng.rand(*size, 3) * 255).astype("uint8")).save(root / f"img{i}.png")
            return root

        return self._once(("images",), build)

    def vision(self, family: str) -> dict:
        """tests/families/test_vision.py's tiny model of ``family`` (vit, llava, blip), two LoRAs and their image data."""

        def build():
            tv = vision_helpers()
            root = self.root / "vision" / family
            root.mkdir(parents=True, exist_ok=True)
            images = self.images()
            base = tv._base(root, family)
            adapters = [tv._adapter(base, family, root / f"a{i}", seed=10 + i)[0] for i in range(2)]
            data = [tv._data(images / f"{family}_{i}.jsonl", family, idx) for i, idx in enumerate(([0, 1, 2], [3, 4, 5]))]
            return {"base": base, "adapters": list(zip(adapters, data))}

        return self._once(("vision", family), build)


# --------------------------------------------------------------------------------------------
# The cases: name -> function(Inputs) -> merge config (a dict; only the stable config keys)

WEIGHTS3 = [1.0, 0.5, 0.75]
CASES: dict = {}


def case(name):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn

    return register


def llama_adapters(inp: Inputs) -> list[Path]:
    """Two full adapters (r 4) and one of rank 2 on a subset of the layers (q, v, down)."""
    return [inp.adapter("llama", 0), inp.adapter("llama", 1),
            inp.adapter("llama", 7, target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4)]


def text_config(inp: Inputs, family: str, method: str, parameters=None, *, adapters=None, data=None, weights=None,
                calibration=None, **extra) -> dict:
    if adapters is None:
        adapters = llama_adapters(inp) if family == "llama" else [inp.adapter(family, s) for s in (0, 1)]
    if data is None:
        kind = "jsonl_t5" if family == "t5" else "jsonl"
        data = [inp.data(kind, 6, s) for s in range(len(adapters))]
    if weights is None:
        weights = WEIGHTS3[: len(adapters)]
    return {
        "base_model": str(inp.base(family)),
        "method": method,
        "parameters": dict(parameters or {}),
        "device": "cpu",
        "dtype": "float32",
        "calibration": {"samples": 100, "max_length": 64, "batch_size": 8, **(calibration or {})},
        "adapters": [{"name": f"t{i}", "path": str(a), "data": str(d), "weight": w}
                     for i, (a, d, w) in enumerate(zip(adapters, data, weights))],
        "progress": False,
        **extra,
    }


# the registry at c3793a1; whatever the imported registry adds is covered too (and a registry that fails to
# import leaves these cases to record its error, not the script to stop)
KNOWN_METHODS = ("cat", "dare_linear", "dare_ties", "iteris", "linear", "regmean", "svd", "task_arithmetic", "ties")


def _methods():
    try:
        from iteris.methods import REGISTRY
    except Exception as e:  # noqa: BLE001
        print(f"note: iteris.methods.REGISTRY did not import ({type(e).__name__}: {e}); using the known methods",
              file=sys.stderr)
        return list(KNOWN_METHODS)
    return sorted(set(KNOWN_METHODS) | set(REGISTRY))


# every registered method with its defaults, llama-like model, three adapters
for _m in _methods():
    case(f"llama/{_m}/defaults")(lambda inp, m=_m: text_config(inp, "llama", m))

IT2 = {"iterations": 2}
for _name, _params in {
    "schedule_global_it2": {"schedule": "global", "iterations": 2},
    "schedule_sequential": {"schedule": "sequential"},
    "gamma0.5": {**IT2, "gamma": 0.5},
    "alpha1_1e-3": {**IT2, "alpha1": 1e-3},
    "with_pretrain_matrix": {"iterations": 1, "with_pretrain_matrix": True, "alpha1": 1e-3, "alpha2": 1e-3},
    "solve_space_samples": {**IT2, "solve_space": "samples", "alpha1": 1e-4, "alpha2": 1e-4},
    "solve_space_features": {**IT2, "solve_space": "features", "alpha1": 1e-4, "alpha2": 1e-4},
    "adaptive_weights_false": {**IT2, "adaptive_weights": False},
    "alpha1_0_reuse": {**IT2, "alpha1": 0.0, "alpha2": 1e-3},  # later rounds reuse the adapters' projected inputs
    "tol": {"iterations": 10, "tol": 1e-3, "alpha1": 1e-4, "alpha2": 1e-4},
}.items():
    case(f"llama/iteris/{_name}")(lambda inp, p=_params: text_config(inp, "llama", "iteris", p))

for _name, _cal in {
    "walk_model": {"walk": "model"},
    "offload_states": {"offload_states": True},
    "offload_stats": {"offload_stats": True},
    "overlap_on": {"overlap": "on"},
    "batch_size3": {"batch_size": 3},
    "stats_float32": {"stats_dtype": "float32"},
    "subsample4_seed7": {"samples": 4, "seed": 7},
    "max_length8": {"max_length": 8},
    "generate": {"generate": True, "max_new_tokens": 4},
}.items():
    case(f"llama/iteris/calib_{_name}")(lambda inp, c=_cal: text_config(inp, "llama", "iteris", IT2, calibration=c))

case("llama/regmean/calib_walk_model")(lambda inp: text_config(inp, "llama", "regmean", calibration={"walk": "model"}))
case("llama/regmean/calib_offload_stats")(
    lambda inp: text_config(inp, "llama", "regmean", calibration={"offload_stats": True}))
case("llama/iteris/sequential_offload_states")(
    lambda inp: text_config(inp, "llama", "iteris", {"schedule": "sequential"}, calibration={"offload_states": True}))
case("llama/iteris/pretrain_overlap_offload_stats")(lambda inp: text_config(
    inp, "llama", "iteris", {"iterations": 1, "with_pretrain_matrix": True, "alpha1": 1e-3, "alpha2": 1e-3},
    calibration={"overlap": "on", "offload_stats": True}))

# calibration data formats
case("llama/iteris/data_prompt_response")(lambda inp: text_config(
    inp, "llama", "iteris", IT2, data=[inp.data("jsonl_pr", 6, s) for s in range(3)],
    calibration={"prompt_field": "prompt", "response_field": "response"}))
case("llama/iteris/data_csv_txt_jsonl")(lambda inp: text_config(
    inp, "llama", "iteris", IT2, data=[inp.data("csv", 6, 0), inp.data("txt", 6, 1), inp.data("jsonl", 6, 2)]))

# compression, folding into the base, float64
case("llama/iteris/rank3")(lambda inp: text_config(inp, "llama", "iteris", IT2, rank=3))
case("llama/ties/rank3")(lambda inp: text_config(inp, "llama", "ties", {"density": 0.4}, rank=3))
case("llama/task_arithmetic/rank3")(lambda inp: text_config(inp, "llama", "task_arithmetic", rank=3))
case("llama/regmean/rank5")(lambda inp: text_config(inp, "llama", "regmean", rank=5))
case("llama/iteris/merge_into_base_false")(lambda inp: text_config(inp, "llama", "iteris", IT2, merge_into_base=False))
case("llama/ties/merge_into_base")(lambda inp: text_config(inp, "llama", "ties", {"density": 0.4}, merge_into_base=True))
case("llama/iteris/pretrain_merge_into_base")(lambda inp: text_config(
    inp, "llama", "iteris", {"iterations": 1, "with_pretrain_matrix": True, "alpha1": 1e-3, "alpha2": 1e-3},
    merge_into_base=True))
case("llama/iteris/float64")(lambda inp: text_config(
    inp, "llama", "iteris", {"iterations": 2, "alpha1": 1e-6, "alpha2": 1e-6}, dtype="float64",
    calibration={"stats_dtype": "float64", "batch_size": 3}))
case("llama/regmean/float64")(lambda inp: text_config(
    inp, "llama", "regmean", dtype="float64", calibration={"stats_dtype": "float64"}))

# other families: GPT-2 (Conv1D), T5 (encoder-decoder), BERT classifier (modules_to_save heads)
for _m in ("iteris", "regmean"):
    _p = IT2 if _m == "iteris" else {}
    case(f"gpt2/{_m}")(lambda inp, m=_m, p=_p: text_config(inp, "gpt2", m, p))
    case(f"t5/{_m}")(lambda inp, m=_m, p=_p: text_config(inp, "t5", m, p))
    case(f"bert/{_m}/per_adapter_heads")(lambda inp, m=_m, p=_p: text_config(
        inp, "bert", m, p, modules_to_save="per_adapter"))
case("gpt2/iteris/schedule_sequential")(lambda inp: text_config(inp, "gpt2", "iteris", {"schedule": "sequential"}))
case("gpt2/ties")(lambda inp: text_config(inp, "gpt2", "ties"))
case("t5/iteris/generated_targets")(lambda inp: text_config(
    inp, "t5", "iteris", {"iterations": 1}, data=[inp.data("jsonl", 4, s) for s in (0, 1)],
    calibration={"max_new_tokens": 6}))
case("bert/iteris/blocks_head_t0")(lambda inp: text_config(  # no pooler target: walked block by block
    inp, "bert", "iteris", IT2, modules_to_save="t0",
    adapters=[inp.adapter("bert", s, target_modules=["query", "key", "value", "attention.output.dense",
                                                     "intermediate.dense"]) for s in (0, 1)]))


# a diffusers pipeline (text encoder merged first, then the UNet on the merged conditioning)
def pipeline_config(inp: Inputs, method: str, parameters=None, kind: str = "sd", calibration=None, **extra) -> dict:
    built = inp.pipeline(kind)
    return {
        "base_model": str(built["pipe"]), "method": method, "parameters": dict(parameters or {}), "device": "cpu",
        "progress": False,
        "calibration": {"steps": 4, "timesteps": 2, "seeds": [0, 1], "batch_size": 2, "guidance_scale": 5.0,
                        **(calibration or {})},
        "adapters": [{"name": name, "path": str(path), "data": str(data), **({"trigger": "sks"} if name == "cube" else {})}
                     for name, (path, data) in zip(("cube", "dog"), built["adapters"])],
        **extra,
    }


PIPE_ITERIS = {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4}
case("sd_pipeline/iteris")(lambda inp: pipeline_config(inp, "iteris", PIPE_ITERIS))
case("sd_pipeline/regmean")(lambda inp: pipeline_config(inp, "regmean"))
case("sd_pipeline/task_arithmetic")(lambda inp: pipeline_config(inp, "task_arithmetic"))
case("sd_pipeline/iteris_rank2")(lambda inp: pipeline_config(inp, "iteris", PIPE_ITERIS, rank=2))
SMALL = {"height": 16, "width": 16, "steps": 3}
case("sdxl_pipeline/iteris")(lambda inp: pipeline_config(
    inp, "iteris", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4}, kind="sdxl", calibration=SMALL))
case("flux_pipeline/iteris")(lambda inp: pipeline_config(
    inp, "iteris", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4}, kind="flux",
    calibration={**SMALL, "guidance_scale": 3.5}))
case("sd3_pipeline/iteris")(lambda inp: pipeline_config(
    inp, "iteris", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4}, kind="sd3",
    calibration={**SMALL, "guidance_scale": 3.5}))


# models that read images (tests/families/test_vision.py's tiny ViT classifier and LLaVA)
def vision_config(inp: Inputs, family: str, method: str, parameters=None) -> dict:
    built = inp.vision(family)
    return {
        "base_model": str(built["base"]), "method": method, "parameters": dict(parameters or {}), "device": "cpu",
        "dtype": "float32", "progress": False, "calibration": {"batch_size": 2},
        "adapters": [{"name": f"a{i}", "path": str(a), "data": str(d)} for i, (a, d) in enumerate(built["adapters"])],
    }


for _fam in ("vit", "llava", "blip"):
    case(f"{_fam}/iteris")(lambda inp, f=_fam: vision_config(inp, f, "iteris", {"iterations": 1, "alpha1": 1e-3, "alpha2": 1e-3}))
    case(f"{_fam}/regmean")(lambda inp, f=_fam: vision_config(inp, f, "regmean"))


# --------------------------------------------------------------------------------------------
# Recording


def _portable(config: dict, root: Path):
    """The config with the temporary directory's path replaced, to compare case definitions across runs."""
    return json.loads(json.dumps(config).replace(str(root), "<tmp>"))


def _canonical_json(text: str) -> bytes:
    """JSON with sorted keys and sorted lists of names (PEFT writes target_modules from a set: its order
    changes with the process's hash seed)."""

    def norm(v):
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            v = [norm(x) for x in v]
            return sorted(v) if all(isinstance(x, str) for x in v) else v
        if isinstance(v, str) and v[:1] in "{[":
            try:
                return norm(json.loads(v))
            except ValueError:
                return v
        return v

    return json.dumps(norm(json.loads(text)), sort_keys=True).encode()


def _file_digest(f: Path, root: Path) -> bytes:
    data = f.read_bytes().replace(str(root).encode(), b"<tmp>")
    try:
        if f.suffix == ".json":
            return _canonical_json(data.decode())
        if f.suffix == ".safetensors":  # tensors by name (the header's order is not fixed), and the metadata
            from safetensors import safe_open

            parts = []
            with safe_open(str(f), "pt") as st:
                meta = {k: v.replace(str(root), "<tmp>") for k, v in (st.metadata() or {}).items()}
                parts.append(_canonical_json(json.dumps(meta)))
                for key in sorted(st.keys()):
                    t = st.get_tensor(key)
                    parts.append(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                    parts.append(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            return b"\0".join(parts)
    except Exception:  # noqa: BLE001  (unreadable as such: its bytes)
        pass
    return data


def _fingerprint(config: dict, root: Path) -> str:
    """sha256 of the contents of every file the config names (base model, adapters, data; the temporary
    directory's path left out), to tell fixture drift (another tests/helpers/fixtures.py) from a change of the merge."""
    import hashlib

    paths = [config.get("base_model")] + [v for a in config.get("adapters", []) for k, v in a.items() if k in ("path", "data")]
    h = hashlib.sha256()
    for p in paths:
        if not p:
            continue
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            h.update(hashlib.sha256(_file_digest(f, root)).digest())
    return h.hexdigest()


def _flatten(deltas: dict) -> dict:
    """{layer: delta}, or {component: {layer: delta}} for pipelines -> {"[component/]layer": delta}."""
    out = {}
    for name, value in deltas.items():
        if isinstance(value, dict):
            for layer, delta in value.items():
                out[f"{name}/{layer}"] = delta
        else:
            out[name] = value
    return out


def _heads(result) -> dict:
    heads = getattr(result, "heads", None) or {}
    out = {}
    for sub, tensors in heads.items():
        for key, t in (tensors or {}).items():
            if isinstance(t, torch.Tensor):
                out[f"{sub or '.'}/{key}"] = t.detach().cpu().clone()
    return out


def _source_info(module_file: str) -> dict:
    src = Path(module_file).resolve().parent
    info = {"iteris_file": str(Path(module_file).resolve())}
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", str(src)], capture_output=True,
                                text=True, check=True).stdout
        info["src_dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def record(out: Path, only: list[str] | None, keep: bool) -> int:
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001  (no diffusers: the pipeline cases record the error)
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass

    import iteris

    source = _source_info(iteris.__file__)
    try:
        from iteris.merge import merge
    except Exception as e:  # noqa: BLE001  (every case then records this error: compare reports them all)
        import_error = f"{type(e).__name__} importing iteris.merge: {e}"
        print(f"ERROR: {import_error}", file=sys.stderr)

        def merge(config):
            raise RuntimeError(import_error)
    print(f"iteris from {source['iteris_file']} (commit {source.get('git_commit', '?')[:10]}"
          f"{', uncommitted changes in src' if source.get('src_dirty') else ''})", flush=True)
    names = [n for n in CASES if not only or any(s in n for s in only)]
    if not names:
        print("no case matches --only", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="iteris_equiv_"))
    inputs = Inputs(root)
    cases: dict = {}
    start = time.perf_counter()
    try:
        for name in names:
            entry: dict = {"error": None, "layers": {}, "heads": {}, "seconds": 0.0}
            t0 = time.perf_counter()
            try:
                config = CASES[name](inputs)
                entry["config"] = json.dumps(_portable(config, root), sort_keys=True)
                entry["inputs_sha256"] = _fingerprint(config, root)
                _seed_everything(0)
                t1 = time.perf_counter()
                result = merge(config)
                entry["seconds"] = time.perf_counter() - t1
                for layer, delta in sorted(_flatten(result.deltas).items()):
                    entry["layers"][layer] = {"A": delta.A.detach().cpu().clone(), "B": delta.B.detach().cpu().clone()}
                entry["heads"] = _heads(result)
                output = (getattr(result, "report", None) or {}).get("output", {}) or {}
                errors = output.get("relative_error")
                if isinstance(errors, dict):
                    entry["reported_error"] = {str(k): float(v) for k, v in errors.items() if isinstance(v, (int, float))}
                status = f"{len(entry['layers'])} layers" + (f", {len(entry['heads'])} head tensors" if entry["heads"] else "")
            except Exception as e:  # noqa: BLE001  (recorded and printed, never dropped)
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()
                entry["seconds"] = time.perf_counter() - t0
                entry.setdefault("config", "")
                status = f"ERROR {entry['error'].splitlines()[0][:200]} (recorded; compare will report it)"
            cases[name] = entry
            print(f"  {name:48s} {time.perf_counter() - t0:6.2f} s  {status}", flush=True)
    finally:
        if keep:
            print(f"inputs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - start
    meta = {"format": FORMAT, **source, "torch": str(torch.__version__), "python": sys.version.split()[0],
            "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": total,
            "only": only or []}
    try:
        import diffusers
        import peft
        import transformers

        meta.update(transformers=str(transformers.__version__), peft=str(peft.__version__), diffusers=str(diffusers.__version__))
    except ImportError:
        pass
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save({"meta": meta, "cases": cases}, tmp)
    os.replace(tmp, out)
    failed = [n for n, e in cases.items() if e["error"]]
    print(f"recorded {len(cases)} cases in {total:.1f} s to {out}" + (f"; {len(failed)} raised: {', '.join(failed)}"
                                                                       if failed else ""))
    return 0


# --------------------------------------------------------------------------------------------
# Comparing


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    num, den = float(torch.linalg.norm(a - b)), float(torch.linalg.norm(b))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def compare_case(old: dict, new: dict) -> dict:
    """{layers, identical, max_rel, verdict, notes}."""
    notes = []
    if old["error"] or new["error"]:
        if old["error"] and new["error"]:
            if old["error"] != new["error"]:
                notes.append(f"old raised: {old['error'].splitlines()[0][:300]}")
            notes.append(f"both raised: {new['error'].splitlines()[0][:300]}")
            return {"layers": 0, "identical": 0, "max_rel": None, "verdict": "skip", "notes": notes}
        side, err = ("new", new["error"]) if new["error"] else ("old", old["error"])
        notes.append(f"raised on the {side} side only: {err.splitlines()[0][:300]}")
        return {"layers": len((old if new["error"] else new)["layers"]), "identical": 0, "max_rel": None,
                "verdict": "ERROR", "notes": notes}
    if old.get("config") != new.get("config"):
        notes.append("warning: the case's config differs between the recordings (another version of this script?)")
    if old.get("inputs_sha256") != new.get("inputs_sha256"):
        notes.append("warning: the built inputs (models, adapters, data files) differ between the recordings "
                     "(tests/helpers/fixtures.py changed?): a difference here need not come from the merge")
    fail = False
    a_layers, b_layers = old["layers"], new["layers"]
    if set(a_layers) != set(b_layers):
        fail = True
        only_old, only_new = sorted(set(a_layers) - set(b_layers)), sorted(set(b_layers) - set(a_layers))
        notes.append(f"layer sets differ: {len(only_old)} only in old {only_old[:3]}, "
                     f"{len(only_new)} only in new {only_new[:3]}")
    identical, max_rel, worst = 0, 0.0, None
    for layer in sorted(set(a_layers) & set(b_layers)):
        a, b = a_layers[layer], b_layers[layer]
        if _same(a["A"], b["A"]) and _same(a["B"], b["B"]):
            identical += 1
            continue
        if a["B"].shape[0] != b["B"].shape[0] or a["A"].shape[1] != b["A"].shape[1]:
            fail = True
            notes.append(f"{layer}: shape {tuple(a['B'].shape[:1]) + tuple(a['A'].shape[1:])} -> "
                         f"{tuple(b['B'].shape[:1]) + tuple(b['A'].shape[1:])}")
            continue
        if a["A"].shape[0] != b["A"].shape[0]:
            fail = True
            notes.append(f"{layer}: rank {a['A'].shape[0]} -> {b['A'].shape[0]}")
        if a["A"].dtype != b["A"].dtype or a["B"].dtype != b["B"].dtype:
            notes.append(f"{layer}: dtype {a['A'].dtype} -> {b['A'].dtype}")
        pa = a["B"].to(torch.float64).flatten(1) @ a["A"].to(torch.float64).flatten(1)
        pb = b["B"].to(torch.float64).flatten(1) @ b["A"].to(torch.float64).flatten(1)
        r = _rel(pb, pa)  # relative to the old product
        if not r <= max_rel:  # NaN counts as the worst
            max_rel, worst = r, layer
    heads_a, heads_b = old.get("heads", {}), new.get("heads", {})
    if set(heads_a) != set(heads_b):
        fail = True
        notes.append(f"modules_to_save tensors differ: {sorted(set(heads_a) ^ set(heads_b))[:4]}")
    heads_identical = 0
    for key in sorted(set(heads_a) & set(heads_b)):
        if _same(heads_a[key], heads_b[key]):
            heads_identical += 1
        else:
            r = _rel(heads_b[key].to(torch.float64), heads_a[key].to(torch.float64)) if (
                heads_a[key].shape == heads_b[key].shape) else float("inf")
            if not r <= max_rel:
                max_rel, worst = r, f"head {key}"
    if heads_a:
        notes.append(f"modules_to_save tensors: {heads_identical}/{len(heads_a)} bit-identical")
    ea, eb = old.get("reported_error"), new.get("reported_error")
    if isinstance(ea, dict) and isinstance(eb, dict) and set(ea) == set(eb):
        gap = max((abs(ea[k] - eb[k]) for k in ea), default=0.0)
        if gap > TOLERANCE:
            fail = True
            notes.append(f"reported SVD errors differ by up to {gap:.3g}")
    if worst is not None:
        notes.append(f"largest difference in {worst}")
    if not max_rel <= TOLERANCE:
        fail = True
    layers = len(set(a_layers) | set(b_layers))
    if fail:
        verdict = "FAIL"
    elif identical == layers and len(a_layers) == len(b_layers) and heads_identical == len(heads_a):
        verdict = "identical"
    else:
        verdict = "ok"
    return {"layers": layers, "identical": identical, "max_rel": max_rel, "verdict": verdict, "notes": notes}


def _load_recording(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def compare(old_path: Path, new_path: Path, verbose: bool, only: list[str] | None = None) -> int:
    old, new = _load_recording(old_path), _load_recording(new_path)
    for label, rec, path in (("old", old, old_path), ("new", new, new_path)):
        m = rec["meta"]
        print(f"{label}: {path}  iteris {m.get('iteris_file')} commit {str(m.get('git_commit', '?'))[:10]}"
              f"{' (+uncommitted changes)' if m.get('src_dirty') else ''}, torch {m.get('torch')}, "
              f"recorded {m.get('created')} in {m.get('seconds', 0):.1f} s")
    names = list(old["cases"]) + [n for n in new["cases"] if n not in old["cases"]]
    if only:
        names = [n for n in names if any(s in n for s in only)]
    rows, failures = [], 0
    for name in names:
        if name not in new["cases"]:
            rows.append((name, "-", "-", "-", "MISSING", ["not recorded on the new side"]))
            failures += 1
            continue
        if name not in old["cases"]:  # a method or case the old code does not have: nothing to compare
            rows.append((name, "-", "-", "-", "new", ["only in the new recording"]))
            continue
        c = compare_case(old["cases"][name], new["cases"][name])
        rel = "-" if c["max_rel"] is None else ("0" if c["max_rel"] == 0.0 else f"{c['max_rel']:.3e}")
        rows.append((name, str(c["layers"]), f"{c['identical']}/{c['layers']}", rel, c["verdict"], c["notes"]))
        failures += c["verdict"] in ("FAIL", "ERROR")
    header = ("case", "layers", "bit-identical", "max rel diff", "verdict")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(5)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r[:5], widths)))
        for note in r[5]:
            if verbose or r[4] not in ("identical", "ok") or note.startswith("warning"):
                print(f"      {note}")
    counts = {}
    for r in rows:
        counts[r[4]] = counts.get(r[4], 0) + 1
    total_layers = sum(int(r[1]) for r in rows if r[1].isdigit())
    total_same = sum(int(r[2].split("/")[0]) for r in rows if "/" in r[2])
    print(f"{len(rows)} cases: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; {total_same}/{total_layers} layers bit-identical; tolerance {TOLERANCE:g} relative on B @ A")
    print("PASS" if failures == 0 else f"FAILED: {failures} case(s)")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run every case and save the merged factors")
    rec.add_argument("out", type=Path)
    rec.add_argument("--only", action="append", help="run only cases whose name contains this (repeatable)")
    rec.add_argument("--keep", action="store_true", help="keep the built inputs (temporary directory)")
    sub.add_parser("list", help="list the cases")
    cmp_ = sub.add_parser("compare", help="compare two recordings (exit 1 on any difference beyond the tolerance)")
    cmp_.add_argument("old", type=Path)
    cmp_.add_argument("new", type=Path)
    cmp_.add_argument("--only", action="append", help="compare only cases whose name contains this (repeatable)")
    cmp_.add_argument("-v", "--verbose", action="store_true", help="notes for every case, not only failing ones")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(CASES))
        return 0
    if args.command == "record":
        return record(args.out, args.only, args.keep)
    return compare(args.old, args.new, args.verbose, args.only)


if __name__ == "__main__":
    sys.exit(main())
