"""Loading a transformers base model in the class its adapters were trained on, and its tokenizer.

Code shipped with a model runs only where the config sets ``trust_remote_code``; pickled weights are
checked to hold tensors only before anything reads them; every floating weight must be finite.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import IterisError
from ..files import check_pickle
from ..finite import check_parameters
from ..engine.layers import check_layer_shapes, resolve_layers


# PEFT task_type -> transformers auto class (the class the adapter was trained on fixes module paths).
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


_HEAD_NAMES = ("classifier", "score", "qa_outputs")


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,  # for exactness checks
}


def reads_images(config) -> bool:
    """Whether the base model reads images (from its config alone)."""
    return is_vision_config(config)


def is_vision_config(config) -> bool:
    return hasattr(config, "vision_config") or _architecture(config).endswith("ForImageClassification")


def _architecture(config) -> str:
    return (getattr(config, "architectures", None) or [""])[0] or ""


def auto_class_name(config) -> str:
    if _architecture(config).endswith("ForImageClassification") or not hasattr(config, "vision_config"):
        return "AutoModelForImageClassification"
    return "AutoModelForImageTextToText"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise IterisError(f"unknown dtype '{name}'; use one of float32, bfloat16, float16 or auto")
    return DTYPES[name]


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise IterisError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
    return name


def _num_labels(extra_tensors: dict[str, torch.Tensor]) -> int | None:
    for key, value in extra_tensors.items():
        parts = key.split(".")
        if parts[-1] == "weight" and any(p in _HEAD_NAMES for p in parts[:-1]) and value.ndim == 2:
            return value.shape[0]
    return None


def loading_error(exc: Exception, what: str, path: str) -> IterisError:
    """One line for a failed from_pretrained; a model that ships code of its own is named as such."""
    text = " ".join(str(exc).split())
    if "trust_remote_code" in text or "custom code" in text:
        return IterisError(
            f"{what} at '{path}' needs code shipped with the model (its config's auto_map); iteris runs no code "
            "from a model's files unless the config sets trust_remote_code: true. Set it only if you trust that code"
        )
    return IterisError(f"cannot load {what} from '{path}': {text[:300]}")


def load_model_config(path: str, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise loading_error(exc, "the base model's config", path) from None


def check_checkpoint_pickles(path: str) -> None:
    """Every pickled weights file (``*.bin``) of a model directory and its components is checked to hold
    tensors only, before anything is loaded (whether a loader would prefer a safetensors file beside it
    or not: the check reads only the pickle's small index)."""
    root = Path(path)
    if not root.is_dir():
        return
    for folder in [root, *(p for p in root.iterdir() if p.is_dir())]:
        for file in sorted(folder.glob("*.bin")):
            check_pickle(file, "model weights")


def max_positions(config) -> int | None:
    """The longest input the model's position table covers, where it has one."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def auto_class(path: str, task_type: str | None, extra_tensors: dict, trust_remote_code: bool = False):
    """The transformers auto class the adapters were trained on, the base config, and head kwargs."""
    import transformers

    config = load_model_config(path, trust_remote_code)
    # models that read images are loaded in their own class whatever task_type their adapters were given
    auto_name = auto_class_name(config) if is_vision_config(config) else _AUTO_CLASSES.get(task_type or "")
    if auto_name is None:
        auto_name = "AutoModelForSeq2SeqLM" if getattr(config, "is_encoder_decoder", False) else "AutoModelForCausalLM"
    kwargs = {}
    num_labels = _num_labels(extra_tensors)
    heads = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForImageClassification")
    if auto_name in heads and num_labels:
        kwargs["num_labels"] = num_labels
    return getattr(transformers, auto_name), config, kwargs


# The adapters carry their own trained heads, so a differently sized head in the checkpoint is replaced.
_LOAD_OPTIONS = {"ignore_mismatched_sizes": True}


def check_against_base(path: str, adapters, targets: list[str], trust_remote_code: bool = False) -> None:
    """Shape-check the adapters against the base without loading its weights (a model on the meta device)."""
    meta_model(path, adapters, targets, trust_remote_code)


def meta_model(path: str, adapters, targets: list[str], trust_remote_code: bool = False) -> nn.Module:
    """The base model in the class its adapters were trained on, on the meta device (shapes, no weights), its
    target layers checked against the adapters."""
    extras = {k: v for a in adapters for k, v in a.extra_tensors.items()}
    auto_cls, config, kwargs = auto_class(path, adapters[0].task_type, extras, trust_remote_code)
    for key, value in kwargs.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    check_layer_shapes(resolve_layers(model, targets), adapters)
    return model


def load_base_model(
    path: str, task_type: str | None, extra_tensors: dict, dtype: torch.dtype, device: str, tokenizer=None,
    device_map: str | None = None, trust_remote_code: bool = False,
):
    """Load the base model in the class its adapters were trained on, running code shipped with it only when
    ``trust_remote_code`` says so; every floating weight must be finite.

    ``device_map`` spreads it over the visible GPUs (transformers' placement); every layer must land on a
    GPU, since a merge reads each target weight and keeps its statistics beside it."""
    auto_cls, _, kwargs = auto_class(path, task_type, extra_tensors, trust_remote_code)
    placement = {"device_map": device_map} if device_map else {}
    check_checkpoint_pickles(path)
    try:
        model = auto_cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **placement, **kwargs,
                                         **(_LOAD_OPTIONS if kwargs else {}))
    except (OSError, ValueError) as exc:
        raise loading_error(exc, "the base model's weights", path) from None
    check_parameters(model, f"base model '{path}'")
    set_pad_id(model, tokenizer)
    if device_map:
        offloaded = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()
                            if str(d) in ("cpu", "disk", "meta")})
        if offloaded:
            raise IterisError(
                f"device_map: {device_map} put part of the model on {offloaded}: it does not fit the visible GPUs. "
                "Use more GPUs, a smaller dtype, or device_map: sequential after freeing GPU memory"
            )
    else:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_pad_id(model: nn.Module, tokenizer) -> None:
    """The tokenizer's pad id on a config without one: decoder-only classifiers find each sequence's last token
    through it."""
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise loading_error(exc, "a tokenizer", path) from None
    if tok.pad_token_id is None:
        # Padding is masked out of every statistic, so any id will do.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok
