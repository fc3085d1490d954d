"""Schedules as walkers: what each must hand the solves, on models where that is known without a reference."""

import iteris
from tests.helpers.merging import float64_config, rel


def test_sequential_moves_every_model_past_a_block_without_target_layers(tiny_family_dir, adapters_for,
                                                                          calibration_file):
    """Adapters on block 1 only: before block 1 every model is the base, so the first group the sequential
    schedule solves (block 1's q/k/v) sees the same inputs as the global schedule's first solve. A walk that
    left the adapters' own states behind at block 0 would pair block-1 rows of different inputs."""
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2, layers_to_transform=[1])
    data = [calibration_file("jsonl", n=6, seed=s) for s in (0, 1)]
    sequential = iteris.merge(float64_config(base, adapters, data, parameters={"schedule": "sequential"}))
    first_solve = iteris.merge(float64_config(base, adapters, data, parameters={"iterations": 0}))
    first_group = [n for n in sequential.deltas if ".layers.1.self_attn." in n and n.endswith(("q_proj", "k_proj",
                                                                                               "v_proj"))]
    assert first_group and all(".layers.0." not in n for n in sequential.deltas)
    for name in first_group:
        assert rel(sequential.deltas[name].dense(), first_solve.deltas[name].dense()) < 1e-9, name
