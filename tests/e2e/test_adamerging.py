"""AdaMerging against its plain float64 reference (tests/helpers/adamerging_reference.py)."""

import pytest

import iteris
from iteris.errors import IterisError
from iteris.families.loading import load_tokenizer
from tests.helpers.adamerging_reference import reference_adamerging
from tests.helpers.merging import float64_config, rel, samples_in_drawn_order


def test_adamerging_matches_reference(tiny_family_dir, adapters_for, calibration_file):
    """Three classifier adapters with their own heads, manual weights, batches of unequal counts (5 and 7
    samples in batches of 3), enough steps for the [0, 1] clamp to act."""
    base = tiny_family_dir("bert")
    adapters = adapters_for("bert", 3)
    data = [calibration_file("jsonl", n=n, seed=s) for n, s in ((5, 0), (7, 1), (5, 2))]
    weights = [1.0, 0.5, 2.0]
    params = {"steps": 12, "lr": 0.05, "init": 0.3}
    result = iteris.merge(float64_config(base, adapters, data, method="adamerging", weights=weights,
                                         parameters=params, modules_to_save="per_adapter"))
    names = sorted(result.deltas)
    samples = [samples_in_drawn_order(d) for d in data]
    expected = reference_adamerging(base, "bert", adapters, samples, load_tokenizer(str(base)),
                                    names, 3, 12, 0.05, 0.3, manual=weights)
    for name, d in expected.items():
        assert rel(result.deltas[name].dense(), d) < 1e-7, name
        assert result.deltas[name].rank == 3 * 4  # the exact LoRA: sum r_i
    coefficients = [c for cs in result.report["adamerging"]["coefficients"].values() for c in cs]
    assert any(abs(c - 0.3) > 1e-3 for c in coefficients)  # it moved
    assert all(0.0 <= c <= 1.0 for c in coefficients) and min(coefficients) == 0.0  # the clamp acted
    fit = result.report["adamerging"]
    assert fit["entropy_first_batches_after"] < fit["entropy_first_batches_before"]


def test_adamerging_refuses_models_without_a_classifier_head(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", n=4, seed=s) for s in (0, 1)]
    with pytest.raises(IterisError, match="classifier adapters"):
        iteris.merge(float64_config(base, adapters, data, method="adamerging"))
