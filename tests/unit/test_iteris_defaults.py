"""How IterIS's defaults resolve: the schedule by the model's shape and by what the user set, the
refinement by the device."""

import pytest

from iteris.errors import IterisError
from iteris.methods import get_method


def _params(**values):
    return get_method("iteris").parse_params(values)


def test_auto_schedule_is_sequential_on_a_chain_of_blocks_unless_a_global_setting_is_given():
    assert _params().resolved_schedule(walks_blocks=True) == "sequential"
    assert _params().resolved_schedule(walks_blocks=False) == "global"
    for only_global in ({"iterations": 3}, {"tol": 1e-4}, {"with_pretrain_matrix": True}):
        assert _params(**only_global).resolved_schedule(walks_blocks=True) == "global", only_global
    assert _params(schedule="global").resolved_schedule(walks_blocks=True) == "global"


def test_refinement_runs_by_default_on_a_gpu_only():
    p = _params()
    assert p.resolved_refine_steps("sequential", "cuda") == 256
    assert p.resolved_refine_steps("sequential", "cuda:1") == 256
    assert p.resolved_refine_steps("sequential", "cpu") == 0
    assert p.resolved_refine_steps("global", "cuda") == 0
    assert _params(refine_steps=5).resolved_refine_steps("sequential", "cpu") == 5
    assert _params(refine_steps=0).resolved_refine_steps("sequential", "cuda") == 0


@pytest.mark.parametrize("bad", [{"refine_steps": -1}, {"refine_lr": 0.0}, {"refine_loss": "mean"}, {"schedule": "global", "refine_steps": 4},
                                 {"with_pretrain_matrix": True, "refine_steps": 4}, {"schedule": "blocks"}])
def test_bad_refinement_settings_are_refused(bad):
    with pytest.raises(IterisError):
        _params(**bad)


def test_a_default_merge_reports_the_schedule_it_ran(tiny_family_dir, adapters_for, calibration_file):
    import iteris

    from tests.helpers.merging import float64_config

    llama = tiny_family_dir("llama")
    data = [calibration_file("jsonl", n=3, seed=s) for s in (0, 1)]
    cfg = float64_config(llama, adapters_for("llama", 2), data, parameters={"schedule": "auto"})
    report = iteris.merge(cfg).report
    assert report["schedule"] == "sequential" and "refinement" not in report  # (no refinement on a CPU)
    t5 = tiny_family_dir("t5")
    t5_data = [calibration_file("jsonl_t5", n=3, seed=s) for s in (0, 1)]
    cfg = float64_config(t5, adapters_for("t5", 2), t5_data, parameters={"schedule": "auto"})
    assert iteris.merge(cfg).report["schedule"] == "global"


def test_continuations_are_asked_for_where_the_merge_refines():
    from iteris.config import CalibrationConfig

    auto = CalibrationConfig()
    assert auto.generate == "auto"
    assert auto.resolved_generate(_params(), "cuda", causal=True)  # refines on a GPU: its own continuations
    assert not auto.resolved_generate(_params(), "cpu", causal=True)  # no refinement on a CPU by default
    assert auto.resolved_generate(_params(refine_steps=4), "cpu", causal=True)
    assert not auto.resolved_generate(_params(), "cuda", causal=False)  # encoders, encoder-decoders write none
    assert not auto.resolved_generate(get_method("regmean").parse_params({}), "cuda", causal=True)
    assert CalibrationConfig(generate=True).resolved_generate(get_method("regmean").parse_params({}), "cpu", True)
    assert not CalibrationConfig(generate=False).resolved_generate(_params(), "cuda", causal=True)
    # the data holds its own responses, or the model runs whole (global rounds: no refinement): prompts as given
    assert not CalibrationConfig(prompt_field="p", response_field="r").resolved_generate(_params(), "cuda", True)
    assert not CalibrationConfig(walk="model").resolved_generate(_params(), "cuda", True)


def test_a_generation_watch_flags_overflow_and_names_the_record_but_not_masks():
    import torch

    from iteris.finite import FiniteWatch, NonFiniteOutputs

    masked = FiniteWatch()
    scores = torch.zeros(2, 5)
    scores[:, 0] = float("-inf")  # a suppressed token (min_new_tokens, suppress_tokens): a mask, not an overflow
    masked(None, scores)
    masked.check(["record 1", "record 2"])
    broken = FiniteWatch()
    broken(None, scores)
    bad = scores.clone()
    bad[1, 3] = float("nan")
    broken(None, bad)
    with pytest.raises(NonFiniteOutputs, match="record 2"):
        broken.check(["record 1", "record 2"])


def test_generate_is_read_strictly():
    from iteris.config import load_config

    base = {"base_model": "b", "adapters": [{"name": "a", "path": "p"}]}
    for value in ("auto", True, False):
        assert load_config({**base, "calibration": {"generate": value}}).calibration.generate == value
    with pytest.raises(IterisError, match="generate"):
        load_config({**base, "calibration": {"generate": "yes"}})


def test_a_refining_merge_of_a_causal_lm_calibrates_on_continuations(tiny_family_dir, adapters_for, calibration_file):
    import iteris

    from tests.helpers.merging import float64_config

    data = [calibration_file("jsonl", n=3, seed=s) for s in (0, 1)]
    cfg = float64_config(tiny_family_dir("llama"), adapters_for("llama", 2), data,
                         parameters={"schedule": "sequential", "refine_steps": 2})
    prompts = iteris.merge(cfg).report
    cfg["calibration"] = {**cfg["calibration"], "generate": "auto", "max_new_tokens": 4}
    continued = iteris.merge(cfg).report
    assert prompts["calibration"]["generate"] is False and continued["calibration"]["generate"] is True
    for before, after in zip(prompts["adapters"], continued["adapters"]):
        assert after["tokens"] > before["tokens"]  # each sample carries the adapter's own continuation
