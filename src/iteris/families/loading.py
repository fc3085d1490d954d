"""Everything that depends on the kind of model lives here: loading, layer access, batches, generation.

Methods and solves see layers and token batches only; no model family is named anywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LogitsProcessorList
from transformers.pytorch_utils import Conv1D

from .errors import IterisError
from .files import check_pickle
from .finite import FiniteWatch, NonFiniteOutputs, check_parameters
from .vision import ImageSample, auto_class_name, image_batches, is_vision_config, make_image_batch

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


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise IterisError(f"unknown dtype '{name}'; use one of float32, bfloat16, float16 or auto")
    return DTYPES[name]


def input_device(model) -> str:
    """Where a model's inputs go: its input embeddings' device (the first GPU of a spread model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return str(weight.device if weight is not None else next(model.parameters()).device)


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
    extras = {k: v for a in adapters for k, v in a.extra_tensors.items()}
    auto_cls, config, kwargs = auto_class(path, adapters[0].task_type, extras, trust_remote_code)
    for key, value in kwargs.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    check_layer_shapes(resolve_layers(model, targets), adapters)


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


def is_pointwise_conv(module: nn.Module) -> bool:
    """A 1x1 convolution (stride 1, no padding or groups): a linear layer over each pixel's channels, as the
    projections of Stable Diffusion 1.x's transformer blocks are."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.groups == 1 and module.dilation == (1, 1))


def is_mergeable_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or is_pointwise_conv(module)


def channels_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input or output with its features on the last axis (a 1x1 convolution's are on axis 1)."""
    return x.movedim(1, -1) if is_pointwise_conv(module) else x


def base_weight(module: nn.Module) -> torch.Tensor:
    """W0 as (d_out x d_in), whichever way the layer stores it (GPT-2 Conv1D keeps the transpose, a 1x1
    convolution two trailing unit axes)."""
    if isinstance(module, Conv1D):
        return module.weight.T
    if is_pointwise_conv(module):
        return module.weight.flatten(1)
    return module.weight


def resolve_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    layers = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise IterisError(
                f"the adapters target '{name}', which {type(model).__name__} does not have; the adapters were "
                "trained on another model or another task_type (head class)"
            ) from None
        if not is_mergeable_layer(module):
            raise IterisError(
                f"'{name}' is a {type(module).__name__}; only linear layers (nn.Linear, Conv1D, 1x1 nn.Conv2d) can be merged"
            )
        layers[name] = module
    return layers


def check_layer_shapes(layers: dict[str, nn.Module], adapters) -> None:
    for adapter in adapters:
        for name, lora in adapter.modules.items():
            d_out, d_in = base_weight(layers[name]).shape
            if (lora.out_features, lora.in_features) != (d_out, d_in):
                raise IterisError(
                    f"adapter '{adapter.name}' has a {lora.out_features}x{lora.in_features} update for '{name}', "
                    f"but the base model's layer is {d_out}x{d_in}: wrong base model"
                )


def model_kind(model: nn.Module) -> str:
    """'seq2seq', 'causal' (decoder LM) or 'encoder' (any other forward that takes input_ids)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel"):
        return "causal"
    return "encoder"


@dataclass
class TokenSample:
    """One calibration sample after tokenisation; ``decoder_ids`` only for encoder-decoder models."""

    input_ids: list[int]
    decoder_ids: list[int] | None = None
    origin: str | None = None  # where it came from (a record of a data file), for messages

    @property
    def tokens(self) -> int:
        return len(self.input_ids) + len(self.decoder_ids or [])


@dataclass
class CallSample:
    """One recorded call of a model as a pipeline made it (a denoiser at one step, a text encoder): its
    positional and keyword arguments, every input row of every layer real (nothing is padding).
    ``merged`` replaces keyword arguments in the merged model's call: its own conditioning, where an
    earlier merged component (a text encoder) changes what this one receives."""

    args: tuple
    kwargs: dict
    merged: dict | None = None


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    # Token-validity masks by sequence length: a layer's input rows are selected by the mask whose length
    # matches its sequence axis (encoder and decoder streams are kept at different lengths).
    masks: dict[int, torch.Tensor]
    # Sequence lengths at which no sample is padded: their rows are taken whole, with no GPU sync.
    full: frozenset[int] = frozenset()
    # A recorded call (CallSample): positional arguments and the merged model's keyword replacements.
    args: tuple | None = None
    merged: dict | None = None
    # Rows of inputs whose length matches no mask are all real (image patches, a pipeline's latents).
    unmasked_rows: bool = False


def _pad(seqs: list[list[int]], pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def make_batch(samples: list[TokenSample] | list[CallSample], pad_id: int, device: str) -> Batch:
    """Right-padded batch; padding never counts, so the statistics do not depend on how samples are grouped.
    Recorded calls run one at a time, as recorded (they already hold the pipeline's batch)."""
    if isinstance(samples[0], CallSample):
        if len(samples) != 1:
            raise ValueError("recorded calls run one per batch")
        call = samples[0]
        return Batch(inputs=call.kwargs, masks={}, args=call.args, merged=call.merged, unmasked_rows=True)
    if isinstance(samples[0], ImageSample):
        return make_image_batch(samples, pad_id, device)
    enc_len = max(len(s.input_ids) for s in samples)
    ids, mask = _pad([s.input_ids for s in samples], pad_id, enc_len)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    masks = {enc_len: mask.bool().to(device)}
    full = {enc_len} if bool(mask.all()) else set()
    if samples[0].decoder_ids is not None:
        dec_len = max(len(s.decoder_ids) for s in samples)
        if dec_len == enc_len:
            dec_len += 1  # keep the two streams distinguishable by length; the extra position is masked
        dids, dmask = _pad([s.decoder_ids for s in samples], pad_id, dec_len)
        inputs["decoder_input_ids"] = dids.to(device)
        inputs["decoder_attention_mask"] = dmask.to(device)
        masks[dec_len] = dmask.bool().to(device)
        if bool(dmask.all()):
            full.add(dec_len)
    return Batch(inputs=inputs, masks=masks, full=frozenset(full))


def batches(samples: list[TokenSample] | list[CallSample], batch_size: int, pad_id: int, device: str):
    if samples and isinstance(samples[0], ImageSample):
        for group in image_batches(samples, batch_size):
            yield make_batch(group, pad_id, device)
        return
    if samples and isinstance(samples[0], CallSample):
        batch_size = 1
    for start in range(0, len(samples), batch_size):
        yield make_batch(samples[start : start + batch_size], pad_id, device)


@torch.no_grad()
def run_forward(model: nn.Module, batch: Batch, merged: bool = False) -> None:
    """One forward pass on the batch; ``merged``: as the merged model receives it (a recorded call's
    conditioning replaced)."""
    if batch.args is not None:
        model(*batch.args, **({**batch.inputs, **batch.merged} if merged and batch.merged else batch.inputs))
        return
    model(**batch.inputs, use_cache=False) if _accepts_use_cache(model) else model(**batch.inputs)


_USE_CACHE: dict[type, bool] = {}


def _accepts_use_cache(model: nn.Module) -> bool:
    """Whether the forward takes use_cache (no key/value cache is wanted: each pass runs once)."""
    known = _USE_CACHE.get(type(model))
    if known is None:
        known = _USE_CACHE[type(model)] = model_kind(model) in ("causal", "seq2seq") or "use_cache" in _forward_arguments(model)
    return known


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, samples: list[TokenSample], tokenizer, max_new_tokens: int, batch_size: int, device: str
) -> list[TokenSample]:
    """The model's own greedy outputs: decoder targets (encoder-decoder) or continuations (causal LM)."""
    kind = model_kind(model)
    pad_id = tokenizer.pad_token_id
    out: list[TokenSample] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        length = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            if kind == "causal":  # generation continues from the right edge: pad on the left
                ids[row, length - len(s.input_ids) :] = torch.tensor(s.input_ids)
                mask[row, length - len(s.input_ids) :] = 1
            else:
                ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
                mask[row, : len(s.input_ids)] = 1
        watch = FiniteWatch()
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([watch]),
        ).cpu()
        watch.check()
        stops = _stop_ids(model, tokenizer)
        for row, s in enumerate(chunk):
            seq = generated[row, length:] if kind == "causal" else generated[row]
            seq = seq.tolist()
            if kind == "causal":
                out.append(TokenSample(input_ids=s.input_ids + _cut_after_stop(seq, stops)))
            else:
                # generate() starts with decoder_start_token_id; stop after the first stop id, drop padding
                out.append(TokenSample(input_ids=s.input_ids, decoder_ids=[seq[0]] + _cut_after_stop(seq[1:], stops)))
    return out


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and the generation config's (often several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def _cut_after_stop(seq: list[int], stops: set[int]) -> list[int]:
    for position, token in enumerate(seq):
        if token in stops:
            return seq[: position + 1]
    return seq


def decoder_start_id(model: nn.Module) -> int:
    cfg = getattr(model, "generation_config", None)
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.pad_token_id
    return int(start)


def tokenize_samples(tokenizer, samples, model: nn.Module, max_length: int, prompt_only: bool = False) -> list[TokenSample]:
    """Token ids for each TextSample; encoder-decoder targets become teacher-forced decoder inputs.

    Decoder-only and encoder models read a prompt/response pair as one text, unless ``prompt_only``
    (the response is then generated by each adapter)."""
    kind = model_kind(model)
    decoder_start = decoder_start_id(model) if kind == "seq2seq" else None
    out = []
    for sample in samples:
        text = sample.text if (kind == "seq2seq" or prompt_only or sample.joined is None) else sample.joined
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        decoder = None
        if kind == "seq2seq" and sample.target is not None:
            if not isinstance(sample.target, str):
                raise IterisError(f"{sample.origin or 'a calibration record'}: its target is "
                                  f"{type(sample.target).__name__} {sample.target!r:.60}, not text; write it as a string")
            target = tokenizer(text_target=sample.target, truncation=True, max_length=max_length - 1)["input_ids"]
            decoder = [decoder_start] + target
        if not ids:
            continue
        out.append(TokenSample(input_ids=ids, decoder_ids=decoder, origin=sample.origin))
    return out


def complete_samples(
    model: nn.Module, tokenizer, samples: list[TokenSample], generate: bool, max_new_tokens: int, batch_size: int,
    device: str,
) -> list[TokenSample]:
    """Fill in what the running model must write itself: an encoder-decoder's missing decoder targets,
    or (``generate``) a causal LM's continuations. Call it with the adapter's own model active."""
    kind = model_kind(model)
    todo = [
        j for j, s in enumerate(samples)
        if (kind == "seq2seq" and s.decoder_ids is None) or (kind == "causal" and generate)
    ]
    if not todo:
        return samples
    done = greedy_continuations(model, [samples[j] for j in todo], tokenizer, max_new_tokens, batch_size, device)
    out = list(samples)
    for j, sample in zip(todo, done):
        out[j] = dataclasses.replace(sample, origin=samples[j].origin)
    return out


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device: str
) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair, padding masked.

    Decoder-only models read context + continuation; encoder-decoder models read the context in the
    encoder and the continuation in the decoder (after the decoder start token)."""
    kind = model_kind(model)
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        if kind == "seq2seq":
            first = decoder_start_id(model)
            samples = [TokenSample(input_ids=c, decoder_ids=[first] + t) for c, t in chunk]
            batch = make_batch(samples, pad_id, device)
            logits = model(**batch.inputs).logits.float().log_softmax(-1)
            for row, (_, target) in enumerate(chunk):
                picked = logits[row, torch.arange(len(target)), torch.tensor(target, device=logits.device)]
                out.append(float(picked.sum()))
        else:
            batch = make_batch([TokenSample(input_ids=c + t) for c, t in chunk], pad_id, device)
            logits = model(**batch.inputs).logits.float().log_softmax(-1)
            for row, (context, target) in enumerate(chunk):
                positions = torch.arange(len(context) - 1, len(context) + len(target) - 1)
                picked = logits[row, positions, torch.tensor(target, device=logits.device)]
                out.append(float(picked.sum()))
    return out


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _forward_arguments(model: nn.Module) -> set[str]:
    """What the underlying transformers model's forward accepts (a PEFT wrapper takes **kwargs)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


@torch.no_grad()
def shared_context_logprobs(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device: str
) -> list[float]:
    """``continuation_logprobs`` for a causal LM where consecutive pairs share a context (answer options):
    each context runs once, its key/value cache serves every continuation. Multiple choice with k options
    costs one prompt pass instead of k."""
    if model_kind(model) != "causal":
        return continuation_logprobs(model, pairs, pad_id, batch_size, device)
    groups: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
    for index, (context, target) in enumerate(pairs):
        if not context or not target:
            raise IterisError("continuation_logprobs: empty context or continuation")
        if groups and groups[-1][0] == context:
            groups[-1][1].append((index, target))
        else:
            groups.append((context, [(index, target)]))
    accepted = _forward_arguments(model)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cache_argument = "cache" if "cache" in accepted else "past_key_values"  # renamed in newer transformers
    out = [0.0] * len(pairs)
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        length = max(len(c) for c, _ in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (context, _) in enumerate(chunk):  # left padding: every context ends at the same column
            ids[row, length - len(context) :] = torch.tensor(context)
            mask[row, length - len(context) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        result = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=True, **last_only)
        first = _at_least_float32(result.logits[:, -1]).log_softmax(-1)
        rows = [(row, index, target) for row, (_, members) in enumerate(chunk) for index, target in members]
        for row, index, target in rows:
            out[index] = float(first[row, target[0]])
        rest = [(row, index, target) for row, index, target in rows if len(target) > 1]
        if not rest:
            continue
        cache = result.past_key_values
        cache.batch_select_indices(torch.tensor([row for row, _, _ in rest], device=device))
        width = max(len(t) - 1 for _, _, t in rest)
        tail = torch.full((len(rest), width), pad_id, dtype=torch.long)
        tail_mask = torch.zeros_like(tail)
        for k, (_, _, target) in enumerate(rest):
            tail[k, : len(target) - 1] = torch.tensor(target[:-1])
            tail_mask[k, : len(target) - 1] = 1
        tail, tail_mask = tail.to(device), tail_mask.to(device)
        seen = mask[[row for row, _, _ in rest]]
        offsets = seen.sum(-1, keepdim=True)
        logits = model(
            input_ids=tail, attention_mask=torch.cat([seen, tail_mask], dim=1), **{cache_argument: cache},
            position_ids=offsets + torch.arange(width, device=device), use_cache=True,
        ).logits
        logits = _at_least_float32(logits).log_softmax(-1)
        for k, (_, index, target) in enumerate(rest):
            steps = torch.arange(len(target) - 1, device=logits.device)
            out[index] += float(logits[k, steps, torch.tensor(target[1:], device=logits.device)].sum())
    return out


@torch.no_grad()
def class_predictions(model: nn.Module, texts_ids: list[list[int]], pad_id: int, batch_size: int, device: str) -> list[int]:
    """argmax of a classifier head's logits for each tokenised text."""
    out: list[int] = []
    for start in range(0, len(texts_ids), batch_size):
        batch = make_batch([TokenSample(input_ids=ids) for ids in texts_ids[start : start + batch_size]], pad_id, device)
        logits = model(**batch.inputs).logits
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutputs
        out.extend(logits.argmax(-1).tolist())
    return out


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been seen."""


@dataclass
class BlockCall:
    """One block's inputs for one batch: the hidden state plus everything else it was called with."""

    hidden: torch.Tensor
    args: tuple  # positional arguments after the hidden state
    kwargs: dict

    @torch.no_grad()
    def run(self, block: nn.Module, hidden: torch.Tensor):
        out = block(hidden, *self.args, **self.kwargs) if self.args is not None else block(**{**self.kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Stack:
    """A stack of blocks that can be run one block at a time (DESIGN.md §3.7).

    ``blocks`` are the blocks up to the deepest one holding a target layer (the rest never matter);
    ``block_of`` maps each target layer to its block.
    """

    blocks: list[nn.Module]
    block_of: dict[str, int]


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple | None, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), None, rest


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def block_list(model: nn.Module, layer_names: list[str]) -> tuple[nn.ModuleList, dict[str, int]] | None:
    """The outermost list of blocks holding every target layer, and each layer's block index (by structure
    alone: whether the blocks run as a plain chain is ``find_stack``'s question)."""
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = f"{path}." if path else ""
        block_of = {}
        for name in layer_names:
            head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if not head.isdigit():
                break
            block_of[name] = int(head)
        else:
            return module, block_of  # named_modules walks outer modules first
    return None


@torch.no_grad()
def find_stack(model: nn.Module, layers: dict[str, nn.Module], probe: Batch) -> Stack | None:
    """The block stack holding every target layer, if the model runs it as a plain chain.

    A plain chain: each block is called once, in order, on the previous block's output, with every other
    argument the very same object for every block (masks, rotary tables). Then running block k alone on
    stored inputs reproduces the full forward. Anything else (encoder-decoder stacks, blocks that pass
    state to the next one, per-block masks) returns None and the whole model runs instead.
    """
    found = block_list(model, list(layers))
    if found is None:
        return None
    module_list, block_of = found
    blocks = list(module_list)[: max(block_of.values()) + 1]
    calls: list[tuple[int, tuple, dict, object]] = []
    handles = []

    def make(index):
        def hook(module, args, kwargs, output):
            calls.append((index, args, kwargs, output))

        return hook

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_hook(make(index), with_kwargs=True))
    try:
        run_forward(model, probe)
    finally:
        for h in handles:
            h.remove()
    if [c[0] for c in calls] != list(range(len(blocks))):
        return None
    first_hidden, first_args, first_kwargs = _split_call(calls[0][1], calls[0][2])
    previous = calls[0][3]
    for _, args, kwargs, output in calls[1:]:
        hidden, rest, kw = _split_call(args, kwargs)
        prev_hidden = previous[0] if isinstance(previous, (tuple, list)) else previous
        if hidden is not prev_hidden or not _same_value(rest, first_args) or kw.keys() != first_kwargs.keys():
            return None
        if not all(_same_value(kw[k], first_kwargs[k]) for k in kw):
            return None
        previous = output
    return Stack(blocks=blocks, block_of=block_of)


@torch.no_grad()
def first_block_call(model: nn.Module, stack: Stack, batch: Batch, merged: bool = False) -> BlockCall:
    """What the first block receives for this batch (the model runs only up to it)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["call"] = _split_call(args, kwargs)
        raise StopForward

    # first among the block's pre-hooks: a block sharded over processes is not gathered for a call that stops
    handle = stack.blocks[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        run_forward(model, batch, merged)
    except StopForward:
        pass
    finally:
        handle.remove()
    hidden, args, kwargs = seen["call"]
    return BlockCall(hidden=hidden, args=args, kwargs=kwargs)
