"""`iteris demo`: the pipeline end to end on the tiny model it builds, and the real demo's refusals."""

import json
from pathlib import Path

import pytest
import iteris.demo as demo
from iteris.cli import main
from iteris.errors import IterisError


def test_tiny_demo_writes_results_and_adapters(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "iteris" in printed and "task_arithmetic" in printed and str(out) in printed
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["sports", "cooking", "finance"]
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["base", "individual", "task_arithmetic", "ties", "regmean", "iteris"]
    for row in rows.values():
        assert set(row) == {"method", "scores", "normalized_mean"} and set(row["scores"]) == set(results["tasks"])
    # each trained adapter lowers its own domain's perplexity; IterIS keeps more of that than the base has
    for task in results["tasks"]:
        assert rows["individual"]["scores"][task] < rows["base"]["scores"][task]
    assert rows["individual"]["normalized_mean"] == pytest.approx(1.0)
    assert rows["iteris"]["normalized_mean"] > rows["base"]["normalized_mean"]
    for method in ("task_arithmetic", "ties", "regmean", "iteris"):
        assert (out / method / "adapter_model.safetensors").is_file()
    assert json.loads((out / "iteris" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_demo_refuses_a_non_empty_output_before_work(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(IterisError, match="not empty"):
        demo.run_demo(out=str(out), tiny=True, quiet=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_real_demo_without_adapters_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_ASSETS", tmp_path / "nowhere")
    with pytest.raises(IterisError, match="package data.*reinstall iteris.*--tiny"):
        demo.shipped_assets(samples=2, limit=2)


QUALITY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality"


def test_package_demo_assets_are_the_benchmarks_files():
    """The demo's package data (what the wheel carries) is byte for byte the benchmark's adapters and task
    files, and nothing else: a retrained adapter or a re-drawn test set is copied to both or the demo drifts."""
    root = demo._assets_dir()
    shipped = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    expected = sorted([f"adapters/{t}/{f}" for t in demo.DEMO_TASKS
                       for f in ("adapter_config.json", "adapter_model.safetensors")]
                      + [f"data/{t}/{f}" for t in demo.DEMO_TASKS
                         for f in ("calibration.jsonl", "task.json", "test.jsonl")])
    assert shipped == expected
    for rel in shipped:
        kind, task, name = rel.split("/")
        source = QUALITY / ("adapters/smollm2" if kind == "adapters" else "data") / task / name
        assert (root / rel).read_bytes() == source.read_bytes(), rel
