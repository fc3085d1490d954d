"""``iteris merge --dry-run``: the merge's checks and its plan, with no weights loaded and nothing written; its
memory estimate against the peak a real merge of the same config reaches."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from iteris.cli import main


@pytest.fixture()
def config(tmp_path, tiny_family_dir, adapters_for, calibration_file):
    cfg = {
        "base_model": str(tiny_family_dir("llama")), "method": "iteris", "device": "cpu", "dtype": "float32",
        "progress": False, "parameters": {"schedule": "sequential"},
        "calibration": {"samples": 8, "max_length": 48, "batch_size": 4},
        "adapters": [{"name": f"t{i}", "path": str(a), "data": str(calibration_file("jsonl", n=8, seed=i))}
                     for i, a in enumerate(adapters_for("llama", n=2))],
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_prints_the_plan_and_loads_no_weights(config, tmp_path, capsys, monkeypatch):
    from iteris.families import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded the base model's weights")

    monkeypatch.setattr(loading, "load_base_model", refuse)
    out = tmp_path / "out"
    assert main(["merge", str(config), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert "t0: weight 1, rank 4, 14 layers, 8 samples" in printed
    assert "output: a LoRA of rank 8" in printed  # sum of the ranks: exact
    assert re.search(r"estimated peak CPU \(resident\) memory: \d+ MB", printed)
    assert re.search(r"estimated time: [0-9.e+-]+ s \(capture", printed)


def test_continuations_are_timed_with_an_adapter_in_every_target_layer(config, tmp_path, capsys, monkeypatch):
    """The merge writes each adapter's continuations through the hooks that add its update, watched for
    overflow; the probe must time that, not the bare base model (on a GPU, those hooks are most of a step)."""
    from iteris import finite
    from iteris.engine import inject

    cfg = yaml.safe_load(config.read_text())
    cfg["calibration"]["generate"] = True
    config.write_text(yaml.safe_dump(cfg))
    active, seen = [], []
    use = inject.DeltaInjector.use

    @__import__("contextlib").contextmanager
    def tracked(self, key, overrides=None):
        with use(self, key, overrides):
            active.append(len(self.variants[key]) if key is not None else 0)
            try:
                yield
            finally:
                active.pop()

    watch = finite.FiniteWatch.__call__
    monkeypatch.setattr(inject.DeltaInjector, "use", tracked)
    monkeypatch.setattr(finite.FiniteWatch, "__call__",
                        lambda self, ids, scores: (seen.append(list(active)), watch(self, ids, scores))[1])
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"estimated time: [0-9.e+-]+ s \(generate [0-9.e+-]+ s, capture", printed)
    assert {tuple(layers) for layers in seen} == {(7,), (14,)}  # the 1- and 2-block pieces' target layers


def test_dry_run_refuses_what_the_merge_would_refuse(config, tmp_path, capsys):
    cfg = yaml.safe_load(config.read_text())
    cfg["adapters"][1]["path"] = str(tmp_path / "nowhere")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(bad), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "nowhere" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert main(["merge", str(config), "--out", str(taken), "--dry-run"]) == 2
    assert (taken / "mine.txt").read_text() == "keep"


def _run(args) -> str:
    done = subprocess.run([sys.executable, "-m", "iteris", *args], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_memory_estimate_within_a_quarter_of_the_measured_peak(config, tmp_path):
    """Each in a fresh process, as a user runs them: the estimate printed by the dry run against the peak
    resident memory the merge reports."""
    printed = _run(["merge", str(config), "--out", str(tmp_path / "plan"), "--dry-run"])
    estimate = float(re.search(r"memory: (\d+) MB", printed).group(1))
    _run(["merge", str(config), "--out", str(tmp_path / "merged"), "--quiet"])
    measured = json.loads((tmp_path / "merged" / "merge_report.json").read_text())["peak_memory"]["cpu_max_rss_mb"]
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)
