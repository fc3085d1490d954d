"""Calibration samples: JSONL/JSON, plain text, CSV/TSV, Parquet or a ``datasets`` save_to_disk directory."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .config import CalibrationConfig
from .errors import IterisError


@dataclass
class TextSample:
    text: str  # what the model (or its encoder) reads; the prompt of a prompt/response pair
    target: str | None = None  # encoder-decoder: what the decoder reads, if given
    joined: str | None = None  # a pair as one text (prompt + separator + response), for decoder-only models
    image: str | None = None  # models that read images: the image's path (the text is then optional)


def load_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise IterisError(f"calibration data '{p}' not found")
    if p.is_dir():
        return _load_saved_dataset(p)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _load_json(p)
    if suffix in (".csv", ".tsv"):
        with p.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a BOM
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        from datasets import Dataset

        return Dataset.from_parquet(str(p)).to_list()
    # anything else is plain text, one sample a line
    return [{"text": line} for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _load_json(p: Path) -> list[dict]:
    text = p.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IterisError(f"{p} is not valid JSON: {exc}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise IterisError(f"{p}, line {number}: not valid JSON ({exc.msg})") from None
    if not all(isinstance(r, dict) for r in records):
        raise IterisError(f"{p}: every JSON record must be an object such as {{\"text\": \"...\"}}")
    return records


def _load_saved_dataset(p: Path) -> list[dict]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise IterisError(f"'{p}' is a directory but not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(ds, DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    assert isinstance(ds, Dataset)
    return ds.to_list()


def select_samples(
    records: list[dict], spec: CalibrationConfig, source: str, field: str | None = None, samples: int | None = None,
    image_field: str | None = None,
) -> list[TextSample]:
    """Draw the calibration samples (seeded) and pick the configured fields; with ``image_field`` (models
    that read images) each record needs an image and its text is optional."""
    if not records:
        raise IterisError(f"calibration data '{source}' holds no samples")
    columns = sorted(records[0])
    text_field = field or spec.field
    if image_field is not None:
        return _image_samples(records, spec, source, text_field, image_field, samples or spec.samples, columns)
    use_pair = spec.prompt_field is not None or spec.response_field is not None
    if use_pair and not (spec.prompt_field and spec.response_field):
        raise IterisError("calibration: set both prompt_field and response_field, or neither")
    needed = [spec.prompt_field, spec.response_field] if use_pair else [text_field]
    for name in needed:
        if name not in records[0]:
            raise IterisError(
                f"calibration data '{source}' has no field '{name}'; its fields are {columns}. "
                "Set calibration.field (or prompt_field/response_field) to one of them"
            )
    order = list(range(len(records)))
    random.Random(spec.seed).shuffle(order)
    out: list[TextSample] = []
    for index in order:
        rec = records[index]
        if use_pair:
            prompt, response = rec.get(spec.prompt_field), rec.get(spec.response_field)
            if not _usable(prompt):
                continue
            response = str(response) if _usable(response) else None
            joined = str(prompt) + spec.separator + response if response is not None else None
            sample = TextSample(text=str(prompt), target=response, joined=joined)
        else:
            text = rec.get(text_field)
            if not _usable(text):
                continue
            target = rec.get(spec.target_field) if spec.target_field else None
            sample = TextSample(text=str(text), target=str(target) if _usable(target) else None)
        out.append(sample)
        if len(out) == (samples or spec.samples):
            break
    if not out:
        what = f"'{spec.prompt_field}'" if use_pair else f"'{text_field}'"
        raise IterisError(f"calibration data '{source}' has no non-empty {what} values")
    return out


def _image_samples(records, spec, source, text_field, image_field, count, columns) -> list[TextSample]:
    if image_field not in records[0]:
        raise IterisError(
            f"calibration data '{source}' has no '{image_field}' field (this model reads images: give records like "
            f'{{"{image_field}": "path.jpg", "{text_field}": "..."}}, paths relative to the file); its fields are {columns}'
        )
    order = list(range(len(records)))
    random.Random(spec.seed).shuffle(order)
    out = []
    for index in order:
        rec = records[index]
        if not _usable(rec.get(image_field)):
            continue
        text = rec.get(text_field)
        out.append(TextSample(text=str(text) if _usable(text) else None, image=str(rec[image_field])))
        if len(out) == count:
            break
    if not out:
        raise IterisError(f"calibration data '{source}' has no non-empty '{image_field}' values")
    return out


def _usable(value) -> bool:
    return value is not None and str(value).strip() != ""
