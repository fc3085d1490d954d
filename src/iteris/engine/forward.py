"""What the engine feeds a model: samples, padded batches, and one forward pass over a batch.

Families turn their data into these samples; the engine sees nothing else of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn


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

    def for_merged(self) -> Batch:
        """The batch as the merged model receives it: a recorded call's conditioning replaced."""
        if self.args is None or not self.merged:
            return self
        return dataclasses.replace(self, inputs={**self.inputs, **self.merged}, merged=None)


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been seen."""

# How a family turns samples into batches: (samples, batch size) -> batches, each on the model's input device.
Batcher = Callable[[list, int], Iterator[Batch]]


def token_batcher(pad_id: int, device: str) -> Batcher:
    """Tokens and recorded calls, right-padded with ``pad_id``."""
    return lambda samples, size: batches(samples, size, pad_id, device)


def pad_rows(seqs: list[list[int]], pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their 0/1 mask."""
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
    enc_len = max(len(s.input_ids) for s in samples)
    ids, mask = pad_rows([s.input_ids for s in samples], pad_id, enc_len)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    masks = {enc_len: mask.bool().to(device)}
    full = {enc_len} if bool(mask.all()) else set()
    if samples[0].decoder_ids is not None:
        dec_len = max(len(s.decoder_ids) for s in samples)
        if dec_len == enc_len:
            dec_len += 1  # keep the two streams distinguishable by length; the extra position is masked
        dids, dmask = pad_rows([s.decoder_ids for s in samples], pad_id, dec_len)
        inputs["decoder_input_ids"] = dids.to(device)
        inputs["decoder_attention_mask"] = dmask.to(device)
        masks[dec_len] = dmask.bool().to(device)
        if bool(dmask.all()):
            full.add(dec_len)
    return Batch(inputs=inputs, masks=masks, full=frozenset(full))


def batches(samples: list[TokenSample] | list[CallSample], batch_size: int, pad_id: int, device: str) -> Iterator[Batch]:
    if samples and isinstance(samples[0], CallSample):
        batch_size = 1
    for start in range(0, len(samples), batch_size):
        yield make_batch(samples[start : start + batch_size], pad_id, device)


@torch.no_grad()
def run_forward(model: nn.Module, batch: Batch) -> None:
    """One forward pass on the batch (no key/value cache: each pass runs once)."""
    if batch.args is not None:
        model(*batch.args, **batch.inputs)
        return
    model(**batch.inputs, use_cache=False) if _accepts_use_cache(model) else model(**batch.inputs)


_USE_CACHE: dict[type, bool] = {}


def _accepts_use_cache(model: nn.Module) -> bool:
    """Whether the forward takes use_cache (no key/value cache is wanted: each pass runs once)."""
    known = _USE_CACHE.get(type(model))
    if known is None:
        known = _USE_CACHE[type(model)] = model_kind(model) in ("causal", "seq2seq") or "use_cache" in forward_arguments(model)
    return known


def model_kind(model: nn.Module) -> str:
    """'seq2seq', 'causal' (decoder LM) or 'encoder' (any other forward that takes input_ids)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel"):
        return "causal"
    return "encoder"


def forward_arguments(model: nn.Module) -> set[str]:
    """What the underlying transformers model's forward accepts (a PEFT wrapper takes **kwargs)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def input_device(model) -> str:
    """Where a model's inputs go: its input embeddings' device (the first GPU of a spread model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return str(weight.device if weight is not None else next(model.parameters()).device)
