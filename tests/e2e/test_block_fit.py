"""The block-level fits (IterIS's refinement, ProDistill) against their plain float64 reference
(tests/helpers/blockfit_reference.py)."""

import pytest

import iteris
from iteris.errors import IterisError
from iteris.families.loading import load_tokenizer
from tests.helpers.blockfit_reference import reference_block_fit
from tests.helpers.merging import float64_config, rel, samples_in_drawn_order


def test_prodistill_matches_reference(tiny_family_dir, adapters_for, calibration_file):
    """Two blocks, so the second is fitted on the merged states that leave the fitted first one."""
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 3)
    data = [calibration_file("jsonl", n=5, seed=s) for s in (0, 1, 2)]
    weights = [1.0, 0.5, 2.0]
    result = iteris.merge(float64_config(base, adapters, data, method="prodistill", weights=weights, rank=4096,
                                         parameters={"epochs": 2, "lr": 0.01}))
    names = sorted(result.deltas)
    expected = reference_block_fit(base, "llama", adapters, [samples_in_drawn_order(d) for d in data], load_tokenizer(str(base)),
                                   names, 3, lambda pairs: 2 * pairs, 0.01, coefficients=0.5, balanced=False,
                                   relative_lr=False, manual=weights)
    assert {n[: n.index(".layers.") + 10] for n in names} == {"model.layers.0.", "model.layers.1."}
    for name, d in expected.items():
        assert rel(result.deltas[name].dense(), d) < 1e-7, name
    fits = result.report["block_fit"]
    assert all(f["loss_after"] < f["loss_before"] for f in fits.values())


@pytest.mark.parametrize("loss", ["balanced", "sum"])
def test_iteris_refinement_matches_reference(tiny_family_dir, adapters_for, calibration_file, loss):
    """Adapters on block 0: the refinement starts from the sequential closed form there (the same inputs in
    both schedules), fitted as LoRA factors with the task-balanced residual or the plain sum."""
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 3, layers_to_transform=[0])
    data = [calibration_file("jsonl", n=5, seed=s) for s in (0, 1, 2)]
    weights = [1.0, 1.0, 3.0]
    closed = iteris.merge(float64_config(base, adapters, data, weights=weights, parameters={"schedule": "sequential"}))
    params = {"schedule": "sequential", "refine_steps": 6, "refine_lr": 1e-4, "refine_loss": loss}
    refined = iteris.merge(float64_config(base, adapters, data, weights=weights, parameters=params))
    names = sorted(refined.deltas)
    start = {n: (closed.deltas[n].B, closed.deltas[n].A) for n in names}
    expected = reference_block_fit(base, "llama", adapters, [samples_in_drawn_order(d) for d in data], load_tokenizer(str(base)),
                                   names, 3, 6, 1e-4, start=start, balanced=loss == "balanced", relative_lr=True,
                                   manual=weights)
    for name, d in expected.items():
        assert rel(refined.deltas[name].dense(), d) < 1e-7, name
        assert rel(refined.deltas[name].dense(), closed.deltas[name].dense()) > 1e-5, name  # it moved
        assert refined.deltas[name].rank == closed.deltas[name].rank  # still the exact rank sum r_i LoRA
    fit = next(iter(refined.report["refinement"].values()))
    assert fit["loss_after"] < fit["loss_before"] and not fit["kept_closed_form"]


def test_a_refinement_that_does_not_help_keeps_the_closed_form(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2, layers_to_transform=[0])
    data = [calibration_file("jsonl", n=4, seed=s) for s in (0, 1)]
    closed = iteris.merge(float64_config(base, adapters, data, parameters={"schedule": "sequential"}))
    wild = iteris.merge(float64_config(base, adapters, data, parameters={"schedule": "sequential", "refine_steps": 3,
                                                                          "refine_lr": 50.0}))
    fit = next(iter(wild.report["refinement"].values()))
    assert fit["kept_closed_form"]
    for name, d in closed.deltas.items():
        assert rel(wild.deltas[name].dense(), d.dense()) < 1e-12, name


def test_block_fits_need_a_chain_of_blocks_and_the_sequential_schedule(tiny_family_dir, adapters_for,
                                                                      calibration_file):
    base = tiny_family_dir("t5")
    adapters = adapters_for("t5", 2)
    data = [calibration_file("jsonl_t5", n=3, seed=s) for s in (0, 1)]
    with pytest.raises(IterisError, match="block-level fit walks the model block by block"):
        iteris.merge(float64_config(base, adapters, data, method="prodistill"))
    with pytest.raises(IterisError, match="refine_steps needs schedule: sequential"):
        iteris.merge(float64_config(base, adapters, data, parameters={"schedule": "global", "refine_steps": 5}))
