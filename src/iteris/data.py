"""Calibration samples: JSONL/JSON, plain text, CSV/TSV, Parquet or a ``datasets`` save_to_disk directory."""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

from .config import CalibrationConfig
from .errors import IterisError
from .files import loads_json, read_text, short_exc
from .schema import short


@dataclass
class TextSample:
    text: str  # what the model (or its encoder) reads; the prompt of a prompt/response pair
    target: str | None = None  # encoder-decoder: what the decoder reads, if given
    joined: str | None = None  # a pair as one text (prompt + separator + response), for decoder-only models
    image: str | None = None  # models that read images: the image's path (the text is then optional)
    origin: str | None = None  # the record it came from, for messages


def load_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise IterisError(f"calibration data '{p}' not found")
    if p.is_dir():
        return _load_saved_dataset(p)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _load_parquet(p)
    text = read_text(p, "calibration data")  # UTF-8 (spreadsheets' byte-order mark dropped), or a clear error
    if suffix in (".jsonl", ".json"):
        return _load_json(p, text)
    if suffix in (".csv", ".tsv"):
        try:
            return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",", strict=True))
        except csv.Error as exc:
            raise IterisError(f"calibration data '{p}' is not valid {suffix[1:].upper()}: {exc}") from None
    # anything else is plain text, one sample a line
    return [{"text": line} for line in text.splitlines() if line.strip()]


def _load_parquet(p: Path) -> list[dict]:
    import pyarrow.parquet as pq  # (datasets' own reader: read directly, with no cache written beside it)

    try:
        return pq.read_table(str(p)).to_pylist()
    except Exception as exc:  # noqa: BLE001  (pyarrow's errors for a damaged file have no common base)
        raise IterisError(f"calibration data '{p}' is not a readable Parquet file ({type(exc).__name__}: "
                          f"{short_exc(exc)})") from None


def _load_json(p: Path, text: str) -> list[dict]:
    if text.lstrip().startswith("["):
        records = loads_json(text, f"calibration data '{p}'")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(loads_json(line, f"calibration data '{p}', line {number},"))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise IterisError(f"{p}: every JSON record must be an object such as {{\"text\": \"...\"}}")
    return records


def _load_saved_dataset(p: Path) -> list[dict]:
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001  (a damaged dataset fails in many ways)
        raise IterisError(f"'{p}' is a directory but not a readable dataset saved with save_to_disk "
                          f"({type(exc).__name__}: {short_exc(exc)})") from None
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
    # (a target is text only where an encoder-decoder reads it: tokenize_samples checks it there)
    optional = [spec.response_field] if use_pair else []
    _check_values(records, source, required=[spec.prompt_field] if use_pair else [text_field], optional=optional)
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
            sample = TextSample(text=str(prompt), target=response, joined=joined, origin=_origin(index, source))
        else:
            text = rec.get(text_field)
            if not _usable(text):
                continue
            target = rec.get(spec.target_field) if spec.target_field else None
            sample = TextSample(text=str(text), target=target if _usable(target) else None,
                                origin=_origin(index, source))
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
    _check_values(records, source, required=[image_field], optional=[text_field])
    order = list(range(len(records)))
    random.Random(spec.seed).shuffle(order)
    out = []
    for index in order:
        rec = records[index]
        if not _usable(rec.get(image_field)):
            continue
        text = rec.get(text_field)
        out.append(TextSample(text=str(text) if _usable(text) else None, image=str(rec[image_field]),
                              origin=_origin(index, source)))
        if len(out) == count:
            break
    if not out:
        raise IterisError(f"calibration data '{source}' has no non-empty '{image_field}' values")
    return out


def _check_values(records: list[dict], source: str, required: list[str], optional: list[str]) -> None:
    """Every record, not just the first: the fields read are present (where required) and hold text. A
    number, list or object is refused rather than turned into the text of its Python form."""
    for index, rec in enumerate(records):
        for name in required + optional:
            value = rec.get(name)
            if value is None:
                if name in required and name not in rec:
                    raise IterisError(f"calibration data '{source}', record {index + 1}: no field '{name}' (the first "
                                      "record has it; every record needs it)")
                continue
            if not isinstance(value, str):
                raise IterisError(f"calibration data '{source}', record {index + 1}: '{name}' is "
                                  f"{type(value).__name__} {short(value)}, not text; write it as a string")


def _origin(index: int, source: str) -> str:
    return f"record {index + 1} of '{source}'"


def _usable(value) -> bool:
    return value is not None and str(value).strip() != ""
