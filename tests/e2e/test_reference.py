"""iteris against the independent float64 reference (tests/helpers/reference.py) on tiny models of four families."""

import json

import pytest

import iteris
from iteris.deltas import LowRankDelta
from iteris.families.loading import load_tokenizer
from tests.helpers import reference as ref
from tests.helpers.merging import float64_config as _config, rel as _rel


def _samples(path):
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["text"], r.get("target")) for r in rows]


CASES = [
    # family, iterations, gamma, alpha1, alpha2, adaptive, manual weights, with_pretrain
    ("llama", 2, 0.0, 1e-6, 1e-6, True, None, False),  # alpha = 0 is ill-posed with so few tokens
    ("gpt2", 2, 0.3, 1e-3, 1e-2, True, None, False),
    ("t5", 1, 0.0, 1e-4, 1e-4, False, [1.0, 2.0], False),
    ("bert", 1, 0.5, 0.0, 1e-3, True, [0.5, 1.0], False),
    ("llama", 1, 0.0, 1e-3, 1e-3, True, None, True),
]


@pytest.mark.parametrize("family,iterations,gamma,alpha1,alpha2,adaptive,manual,with_pretrain", CASES)
def test_iteris_matches_float64_reference(
    tiny_family_dir, adapters_for, calibration_file, family, iterations, gamma, alpha1, alpha2, adaptive, manual,
    with_pretrain,
):
    base = tiny_family_dir(family)
    adapters = adapters_for(family, 2)
    kind = "jsonl_t5" if family == "t5" else "jsonl"
    data = [calibration_file(kind, n=6, seed=s) for s in (0, 1)]
    params = {
        "iterations": iterations, "gamma": gamma, "alpha1": alpha1, "alpha2": alpha2,
        "adaptive_weights": adaptive, "with_pretrain_matrix": with_pretrain,
    }
    extra = {"modules_to_save": "per_adapter"} if family == "bert" else {}
    # full rank keeps dense (with_pretrain_matrix) results exact, so the comparison sees only the solve
    result = iteris.merge(_config(base, adapters, data, parameters=params, weights=manual, rank=64, **extra))

    tok = load_tokenizer(str(base))
    names = sorted(result.deltas)
    expected = ref.reference_iteris(
        base, family, adapters, [_samples(d) for d in data], tok, names, iterations, gamma, alpha1, alpha2,
        adaptive, manual, with_pretrain,
    )
    for name in names:
        assert _rel(result.deltas[name].dense(), expected[name]) < 1e-8, name
    assert len(result.report["iterations"]) == iterations + 1


def test_regmean_matches_reference(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 3)
    data = [calibration_file("jsonl", n=5, seed=s) for s in (0, 1, 2)]
    result = iteris.merge(_config(base, adapters, data, method="regmean", parameters={"reduction": 0.9}))
    tok = load_tokenizer(str(base))
    expected = ref.reference_regmean(base, "llama", adapters, [_samples(d) for d in data], tok, sorted(result.deltas), 0.9)
    for name, d in expected.items():
        assert _rel(result.deltas[name].dense(), d) < 1e-7, name


def test_iteration_zero_without_weights_or_regularisers_is_regmean(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("gpt2")
    adapters = adapters_for("gpt2", 2)
    data = [calibration_file("jsonl", n=6, seed=s) for s in (0, 1)]
    plain = {"iterations": 0, "adaptive_weights": False, "alpha1": 0.0, "alpha2": 0.0, "gamma": 0.0}
    it0 = iteris.merge(_config(base, adapters, data, parameters=plain))
    rm = iteris.merge(_config(base, adapters, data, method="regmean", parameters={"reduction": 1.0}))
    for name in it0.deltas:
        assert _rel(it0.deltas[name].dense(), rm.deltas[name].dense()) < 1e-9


def test_adapters_with_different_targets(tiny_family_dir, adapters_for, calibration_file):
    """A layer that one adapter does not touch has dW_i = 0 there, but its inputs still shape the solve."""
    base = tiny_family_dir("llama")
    full = adapters_for("llama", 1, seed0=0)
    partial = adapters_for("llama", 1, seed0=7, target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4)
    adapters = full + partial
    data = [calibration_file("jsonl", n=6, seed=s) for s in (0, 1)]
    result = iteris.merge(_config(base, adapters, data, parameters={"iterations": 1}))
    tok = load_tokenizer(str(base))
    names = sorted(result.deltas)
    expected = ref.reference_iteris(base, "llama", adapters, [_samples(d) for d in data], tok, names, 1, 0.0, 1e-7, 1e-7)
    ranks = result.report["output"]["ranks"]
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.self_attn.k_proj"] == 4
    for name in names:
        assert isinstance(result.deltas[name], LowRankDelta)
        assert _rel(result.deltas[name].dense(), expected[name]) < 1e-8, name
