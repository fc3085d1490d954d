"""How ``iteris eval`` scores a model: log-probabilities of continuations (with a shared context run once)
and a classifier's predictions. Every logit must be finite: a NaN model is an error, never a score."""

from __future__ import annotations

import torch
from torch import nn

from .errors import IterisError
from .finite import NonFiniteOutputs
from .engine.forward import TokenSample, forward_arguments, make_batch, model_kind
from .families.text import decoder_start_id


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
    accepted = forward_arguments(model)
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
