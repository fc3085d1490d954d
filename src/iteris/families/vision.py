"""Models that read images (transformers): image-text models (BLIP captioning, LLaVA-style image-text-to-
text, any model with a ``vision_config``) and image classifiers (ViT and the like).

Calibration samples are images, or image + text pairs, listed as records with an ``image`` path (relative
to the data file) and an optional text, and read with the model's own processor. Text rows are selected by
their attention mask as for language models; image rows (patches) are all real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.forward import Batch, Batcher, pad_rows
from ..errors import IterisError
from .loading import loading_error

IMAGE_FIELD = "image"


def load_processor(path: str, trust_remote_code: bool = False):
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        pass
    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise loading_error(exc, "an image processor (set `tokenizer:` to the directory holding it)", path) from None


def pad_id(processor) -> int:
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        return 0
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@dataclass
class ImageSample:
    """One image (and its text) as the processor prepares it, batch dimension 1."""

    pixel_values: torch.Tensor
    input_ids: list[int] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-image tensors (image sizes, ...)


def image_samples(processor, samples, source: str) -> list[ImageSample]:
    """The processor's inputs for each (image, text) sample; image paths are relative to the data file."""
    from PIL import Image

    root = Path(source).parent if Path(source).is_file() else Path(source)
    tokenizer = getattr(processor, "tokenizer", None)
    image_token = getattr(processor, "image_token", None)
    out = []
    for sample in samples:
        path = Path(sample.image)
        path = path if path.is_absolute() else root / path
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise IterisError(f"calibration data '{source}': cannot read image '{path}': {exc}") from None
        if tokenizer is None:
            inputs = processor(images=[image], return_tensors="pt")
        else:
            text = sample.text or ""  # a model that reads text gets some, so every sample has its token ids
            if image_token and image_token not in text:
                text = f"{image_token}\n{text}" if text else image_token  # where the image's tokens go
            inputs = processor(images=[image], text=[text], return_tensors="pt")
        ids = inputs.get("input_ids")
        extra = {k: v for k, v in inputs.items() if k not in ("pixel_values", "input_ids", "attention_mask")
                 and isinstance(v, torch.Tensor)}
        out.append(ImageSample(pixel_values=inputs["pixel_values"], input_ids=ids[0].tolist() if ids is not None else None,
                               extra=extra))
    return out


def _per_token(sample: ImageSample, value: torch.Tensor) -> bool:
    """A processor output with one entry per text token (token type ids and the like): padded like the ids."""
    return sample.input_ids is not None and value.ndim == 2 and value.shape[-1] == len(sample.input_ids)


def _shape_key(sample: ImageSample) -> tuple:
    return (tuple(sample.pixel_values.shape[1:]),
            tuple((k, tuple(v.shape[1:])) for k, v in sample.extra.items() if not _per_token(sample, v)))


def image_batches(samples: list[ImageSample], batch_size: int) -> list[list[ImageSample]]:
    """Consecutive samples, up to batch_size, whose images the processor shaped alike (tiled processors give
    a patch count per aspect ratio): only those stack into one batch."""
    out: list[list[ImageSample]] = []
    for sample in samples:
        if out and len(out[-1]) < batch_size and _shape_key(out[-1][0]) == _shape_key(sample):
            out[-1].append(sample)
        else:
            out.append([sample])
    return out


def make_image_batch(samples: list[ImageSample], pad: int, device: str):
    """Images stacked, texts right-padded; rows of inputs that no text mask covers (patches) are all real."""
    if len({_shape_key(s) for s in samples}) > 1:
        raise ValueError("images shaped differently by the processor go into separate batches (image_batches)")
    inputs = {"pixel_values": torch.cat([s.pixel_values for s in samples]).to(device)}
    length = max(len(s.input_ids) for s in samples) if samples[0].input_ids is not None else 0
    for key in samples[0].extra:
        values = [s.extra[key] for s in samples]
        if _per_token(samples[0], values[0]):
            values = [torch.nn.functional.pad(v, (0, length - v.shape[-1])) for v in values]
        inputs[key] = torch.cat(values).to(device)
    masks, full = {}, set()
    if samples[0].input_ids is not None:
        ids, mask = pad_rows([s.input_ids for s in samples], pad, length)
        inputs["input_ids"], inputs["attention_mask"] = ids.to(device), mask.to(device)
        masks[length] = mask.bool().to(device)
        if bool(mask.all()):
            full.add(length)
    return Batch(inputs=inputs, masks=masks, full=frozenset(full), unmasked_rows=True)


def image_batcher(pad: int, device: str) -> Batcher:
    """Images (and their texts) in batches of alike-shaped images."""
    return lambda samples, size: (make_image_batch(group, pad, device) for group in image_batches(samples, size))
