"""Calibration data: every supported file format, seeded selection, and clear errors (iteris.data)."""

from __future__ import annotations

import csv
import json

import pytest

from iteris import IterisError
from iteris.config import CalibrationConfig
from iteris.data import TextSample, load_records, select_samples

TEXTS = [f"sample number {i} about the river" for i in range(12)]


def _spec(**kw) -> CalibrationConfig:
    kw.setdefault("samples", 1000)
    return CalibrationConfig(**kw)


def _texts(samples: list[TextSample]) -> list[str]:
    return [s.text for s in samples]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Formats


def test_jsonl_default_field(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": i} for i, t in enumerate(TEXTS)])
    records = load_records(p)
    assert records == [{"text": t, "label": i} for i, t in enumerate(TEXTS)]
    samples = select_samples(records, _spec(), str(p))
    assert sorted(_texts(samples)) == sorted(TEXTS)
    assert all(s.target is None for s in samples)


def test_jsonl_configurable_field_and_per_adapter_override(tmp_path):
    rows = [{"content": t, "other": f"other {i}"} for i, t in enumerate(TEXTS)]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    records = load_records(p)
    by_spec = select_samples(records, _spec(field="content"), str(p))
    assert sorted(_texts(by_spec)) == sorted(TEXTS)
    # the adapter-level ``field`` wins over calibration.field
    by_arg = select_samples(records, _spec(field="content"), str(p), field="other")
    assert sorted(_texts(by_arg)) == sorted(f"other {i}" for i in range(len(TEXTS)))


def test_jsonl_blank_lines_and_empty_values_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one two"}\n\n   \n{"text": ""}\n{"text": null}\n{"text": "three"}\n', encoding="utf-8")
    records = load_records(p)
    assert len(records) == 4  # blank lines are not records
    samples = select_samples(records, _spec(), str(p))
    assert sorted(_texts(samples)) == ["one two", "three"]  # empty / null texts are not samples


def test_jsonl_target_field(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"in {i}", "target": f"out {i}"} for i in range(5)])
    samples = select_samples(load_records(p), _spec(), str(p))
    assert {(s.text, s.target) for s in samples} == {(f"in {i}", f"out {i}") for i in range(5)}
    no_target = select_samples(load_records(p), _spec(target_field=None), str(p))
    assert all(s.target is None for s in no_target)


def test_json_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": t} for t in TEXTS], indent=2), encoding="utf-8")
    records = load_records(p)
    assert [r["text"] for r in records] == TEXTS
    assert sorted(_texts(select_samples(records, _spec(), str(p)))) == sorted(TEXTS)


def test_prompt_response_fields(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}", "text": "ignored"} for i in range(6)]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    samples = select_samples(load_records(p), _spec(prompt_field="prompt", response_field="response"), str(p))
    assert len(samples) == 6
    assert {(s.text, s.target) for s in samples} == {(f"question {i}", f"answer {i}") for i in range(6)}


def test_plain_text_one_sample_a_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first line here\n\n   \nsecond line\n\nthird\n", encoding="utf-8")
    records = load_records(p)
    assert records == [{"text": "first line here"}, {"text": "second line"}, {"text": "third"}]
    assert sorted(_texts(select_samples(records, _spec(), str(p)))) == ["first line here", "second line", "third"]


def test_plain_text_fixture_file(calibration_file):
    p = calibration_file("txt", n=7, seed=3)
    records = load_records(p)
    assert len(records) == 7
    assert [r["text"] for r in records] == [l for l in p.read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delimiter):
    p = tmp_path / f"d{suffix}"
    with p.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(["sentence", "label"])
        for i, t in enumerate(TEXTS):
            w.writerow([t + ", with a comma" if i == 0 else t, i % 3])
    records = load_records(p)
    assert len(records) == len(TEXTS)
    assert records[0] == {"sentence": TEXTS[0] + ", with a comma", "label": "0"}
    samples = select_samples(records, _spec(field="sentence"), str(p))
    assert sorted(_texts(samples)) == sorted([TEXTS[0] + ", with a comma"] + TEXTS[1:])


def test_csv_fixture_file(calibration_file):
    p = calibration_file("csv", n=5, seed=1)
    records = load_records(p)
    assert len(records) == 5 and set(records[0]) == {"text", "label"}


def test_parquet(tmp_path):
    from datasets import Dataset

    p = tmp_path / "d.parquet"
    Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))}).to_parquet(str(p))
    records = load_records(p)
    assert [r["body"] for r in records] == TEXTS
    assert [r["n"] for r in records] == list(range(len(TEXTS)))
    assert sorted(_texts(select_samples(records, _spec(field="body"), str(p)))) == sorted(TEXTS)


def test_save_to_disk_dataset(tmp_path):
    from datasets import Dataset

    d = tmp_path / "saved"
    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(d))
    records = load_records(d)
    assert [r["text"] for r in records] == TEXTS


def test_save_to_disk_dataset_dict_uses_train(tmp_path):
    from datasets import Dataset, DatasetDict

    d = tmp_path / "saved_dict"
    # 'train' is deliberately not the first split
    DatasetDict(
        {
            "test": Dataset.from_dict({"text": ["test split a", "test split b"]}),
            "train": Dataset.from_dict({"text": TEXTS}),
            "validation": Dataset.from_dict({"text": ["validation split"]}),
        }
    ).save_to_disk(str(d))
    records = load_records(d)
    assert [r["text"] for r in records] == TEXTS


def test_directory_that_is_not_a_dataset(tmp_path):
    d = tmp_path / "not_a_dataset"
    d.mkdir()
    (d / "notes.txt").write_text("hello\n")
    with pytest.raises(IterisError, match="save_to_disk"):
        load_records(d)


# ------------------------------------------------------------------------------------------------
# Seeded selection


def test_same_seed_same_samples_different_seed_different_order(tmp_path):
    records = [{"text": t} for t in TEXTS]
    a = _texts(select_samples(records, _spec(seed=1), "mem"))
    b = _texts(select_samples(records, _spec(seed=1), "mem"))
    c = _texts(select_samples(records, _spec(seed=2), "mem"))
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c) == sorted(TEXTS)  # same population, drawn in another order
    assert a != TEXTS  # actually shuffled, not file order


def test_samples_caps_the_count():
    records = [{"text": t} for t in TEXTS]
    full = _texts(select_samples(records, _spec(seed=5), "mem"))
    capped = _texts(select_samples(records, _spec(seed=5, samples=4), "mem"))
    assert capped == full[:4]
    # the per-adapter ``samples`` argument overrides calibration.samples
    per_adapter = _texts(select_samples(records, _spec(seed=5, samples=4), "mem", samples=7))
    assert per_adapter == full[:7]
    # asking for more than there are gives what there is
    assert len(select_samples(records, _spec(samples=100), "mem")) == len(TEXTS)


def test_cap_counts_only_usable_samples():
    records = [{"text": ""}] * 20 + [{"text": t} for t in TEXTS]
    got = select_samples(records, _spec(seed=0, samples=5), "mem")
    assert len(got) == 5 and all(s.text in TEXTS for s in got)


# ------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    with pytest.raises(IterisError, match="not found") as info:
        load_records(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(info.value)


def test_missing_field_lists_available_fields(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"sentence": "a b", "label": 1}])
    with pytest.raises(IterisError) as info:
        select_samples(load_records(p), _spec(field="text"), str(p))
    msg = str(info.value)
    assert "'text'" in msg and "sentence" in msg and "label" in msg and "d.jsonl" in msg


def test_missing_prompt_field_lists_available_fields(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "response": "b"}])
    with pytest.raises(IterisError) as info:
        select_samples(load_records(p), _spec(prompt_field="prompt", response_field="response"), str(p))
    assert "'prompt'" in str(info.value) and "question" in str(info.value)


def test_invalid_json_line_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n{"text": "after"}\n', encoding="utf-8")
    with pytest.raises(IterisError, match=r"line 4") as info:
        load_records(p)
    assert "d.jsonl" in str(info.value)


def test_invalid_json_array(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"text": "a"}, {"text": ]', encoding="utf-8")
    with pytest.raises(IterisError, match="not valid JSON"):
        load_records(p)


def test_json_records_must_be_objects(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(["just", "strings"]), encoding="utf-8")
    with pytest.raises(IterisError, match="object"):
        load_records(p)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.txt", "\n\n  \n"), ("e.csv", "text,label\n"), ("e.json", "[]")])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(IterisError, match="no samples") as info:
        select_samples(load_records(p), _spec(), str(p))
    assert name in str(info.value)


def test_no_usable_values(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(IterisError, match="non-empty"):
        select_samples(load_records(p), _spec(), str(p))


@pytest.mark.parametrize("kw", [{"prompt_field": "prompt"}, {"response_field": "response"}])
def test_only_one_of_prompt_and_response_field(tmp_path, kw):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b", "text": "c"}])
    with pytest.raises(IterisError, match="prompt_field and response_field"):
        select_samples(load_records(p), _spec(**kw), str(p))


def test_csv_with_utf8_bom(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes("text,label\nhello there,1\n".encode("utf-8-sig"))
    samples = select_samples(load_records(p), _spec(), str(p))
    assert _texts(samples) == ["hello there"]


def test_prompt_response_pairs_reach_a_causal_lm(tiny_family_dir, adapters_for, calibration_file):
    import iteris
    from iteris.families.loading import load_tokenizer

    base = tiny_family_dir("llama")
    data = [calibration_file("jsonl_pr", n=3, seed=s) for s in (0, 1)]
    cfg = {
        "base_model": str(base),
        "method": "regmean",
        "device": "cpu",
        "progress": False,
        "calibration": {"samples": 3, "max_length": 64, "prompt_field": "prompt", "response_field": "response"},
        "adapters": [{"name": f"t{i}", "path": str(a), "data": str(d)} for i, (a, d) in enumerate(zip(adapters_for("llama", 2), data))],
    }
    report = iteris.merge(cfg).report
    tok = load_tokenizer(str(base))
    for entry, d in zip(report["adapters"], data):
        rows = [json.loads(line) for line in d.read_text().splitlines()]
        expected = sum(len(tok(r["prompt"] + "\n" + r["response"])["input_ids"]) for r in rows)
        assert entry["tokens"] == expected
