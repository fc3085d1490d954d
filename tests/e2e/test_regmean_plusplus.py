"""RegMean++ against its plain float64 reference (tests/helpers/regmean_plusplus_reference.py)."""

import json

import pytest

import iteris
from iteris.errors import IterisError
from iteris.families.loading import load_tokenizer
from tests.helpers.merging import float64_config, rel
from tests.helpers.regmean_plusplus_reference import reference_regmean_plusplus


def _samples(path):
    return [(json.loads(line)["text"], None) for line in path.read_text().splitlines() if line.strip()]


def test_regmean_plusplus_matches_reference(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 3)
    data = [calibration_file("jsonl", n=5, seed=s) for s in (0, 1, 2)]
    result = iteris.merge(float64_config(base, adapters, data, method="regmean_plusplus",
                                         parameters={"reduction": 0.9}))
    expected = reference_regmean_plusplus(base, "llama", adapters, [_samples(d) for d in data],
                                          load_tokenizer(str(base)), sorted(result.deltas), 0.9)
    for name, d in expected.items():
        assert rel(result.deltas[name].dense(), d) < 1e-7, name
    # the first block sees the base model's inputs either way: there RegMean++ is RegMean
    plain = iteris.merge(float64_config(base, adapters, data, method="regmean", parameters={"reduction": 0.9}))
    first = [n for n in expected if ".layers.0." in n]
    later = [n for n in expected if ".layers.0." not in n]
    assert all(rel(result.deltas[n].dense(), plain.deltas[n].dense()) < 1e-9 for n in first)
    assert all(rel(result.deltas[n].dense(), plain.deltas[n].dense()) > 1e-6 for n in later)


def test_regmean_plusplus_needs_a_chain_of_blocks(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("t5")
    adapters = adapters_for("t5", 2)
    data = [calibration_file("jsonl_t5", n=3, seed=s) for s in (0, 1)]
    with pytest.raises(IterisError, match="plain chain of blocks; use regmean"):
        iteris.merge(float64_config(base, adapters, data, method="regmean_plusplus"))
