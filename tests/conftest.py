"""Pytest fixtures wrapping ``tests/helpers/fixtures.py`` (see its docstring for what gets built).

Session fixtures (built lazily, cached for the whole session; treat the directories as read-only):

* ``tiny_family_dir`` -- ``tiny_family_dir("llama") -> Path`` (also ``tiny_family_dir["llama"]``): a base
  model + tokenizer directory for a family in ``FAMILIES``, seed 0.
* ``adapters_for`` -- ``adapters_for(family, n=2, seed0=0, **lora_kwargs) -> list[Path]``: ``n`` LoRA
  adapter dirs on ``tiny_family_dir(family)`` with seeds ``seed0, seed0+1, ...``; ``lora_kwargs`` go to
  ``make_lora_adapter`` (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ``rank_pattern``, ...).
  Each (family, seed, kwargs) adapter is built once per session.
* ``calibration_file`` -- ``calibration_file(kind="jsonl", n=8, seed=0) -> Path`` (kinds: ``jsonl``,
  ``jsonl_pr``, ``txt``, ``csv``, ``jsonl_t5``).

Function fixture:

* ``load_tiny`` -- ``load_tiny(family) -> (model, tokenizer)``: a fresh copy of the base loaded from
  ``tiny_family_dir(family)`` (safe to mutate).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The models here are tiny: one thread is fastest, and it keeps a busy machine's tests from
# crawling through OpenMP threads that wait on each other.
torch.set_num_threads(1)

from tests.helpers import fixtures as fx  # noqa: E402


class _FamilyDirs:
    """Lazy ``{family: base_dir}``: call it or index it with a family name."""

    def __init__(self, root: Path):
        self._root = root
        self._dirs: dict[str, Path] = {}

    def __call__(self, family: str) -> Path:
        if family not in self._dirs:
            d = self._root / family
            fx.make_base_model(d, family, seed=0)
            self._dirs[family] = d
        return self._dirs[family]

    __getitem__ = __call__

    def __contains__(self, family: object) -> bool:
        return family in fx.FAMILIES


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> _FamilyDirs:
    """``tiny_family_dir(family) -> Path`` of a saved tiny base model + tokenizer (built on first use)."""
    return _FamilyDirs(tmp_path_factory.mktemp("tiny_bases"))


@pytest.fixture(scope="session")
def adapters_for(tmp_path_factory, tiny_family_dir):
    """``adapters_for(family, n=2, seed0=0, **lora_kwargs) -> list[Path]`` of LoRA adapter dirs."""
    root = tmp_path_factory.mktemp("tiny_adapters")
    cache: dict[tuple, Path] = {}

    def make(family: str, n: int = 2, seed0: int = 0, **lora_kwargs) -> list[Path]:
        base = tiny_family_dir(family)
        kw_key = json.dumps(lora_kwargs, sort_keys=True, default=repr)
        out = []
        for seed in range(seed0, seed0 + n):
            key = (family, seed, kw_key)
            if key not in cache:
                d = root / f"{family}_s{seed}_{len(cache)}"
                fx.make_lora_adapter(base, d, family, seed, **lora_kwargs)
                cache[key] = d
            out.append(cache[key])
        return out

    return make


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    """``calibration_file(kind="jsonl", n=8, seed=0) -> Path``."""
    root = tmp_path_factory.mktemp("calibration")
    ext = {"jsonl": "jsonl", "jsonl_pr": "jsonl", "jsonl_t5": "jsonl", "txt": "txt", "csv": "csv"}
    cache: dict[tuple, Path] = {}

    def make(kind: str = "jsonl", n: int = 8, seed: int = 0) -> Path:
        key = (kind, n, seed)
        if key not in cache:
            if kind not in ext:
                raise ValueError(f"unknown calibration kind {kind!r}; expected one of {sorted(ext)}")
            cache[key] = fx.write_calibration(root / f"{kind}_n{n}_s{seed}.{ext[kind]}", kind, n, seed)
        return cache[key]

    return make


@pytest.fixture
def load_tiny(tiny_family_dir):
    """``load_tiny(family) -> (model, tokenizer)``: fresh copy of the tiny base, in eval()."""

    def load(family: str):
        return fx.load_base(tiny_family_dir(family), family)

    return load
