"""The command line: ``iteris methods``, ``iteris merge CONFIG --out DIR`` and its flags, errors, merge_report.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import iteris
from iteris.cli import main
from tests.helpers.fixtures import run_cli

N_LAYERS = 2 * 7  # tiny llama: 2 blocks x 7 target projections

YAML = """\
# every path below is relative to this file
base_model: base
method: iteris
device: cpu
dtype: float32
progress: false
parameters:
  iterations: 2
  alpha1: 1e-7   # PyYAML reads this as a string
  alpha2: 1e-6
calibration:
  samples: 4
  max_length: 32
  batch_size: 4
adapters:
  - name: first
    path: adapters/a0
    data: data/d0.jsonl
  - name: second
    path: adapters/a1
    data: data/d1.jsonl
    weight: 0.5
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_family_dir, adapters_for, calibration_file):
    """A directory holding merge.yaml with relative paths, plus an unrelated working directory."""
    root = tmp_path_factory.mktemp("cli")
    proj = root / "project"
    shutil.copytree(tiny_family_dir("llama"), proj / "base")
    for i, a in enumerate(adapters_for("llama", 2)):
        shutil.copytree(a, proj / "adapters" / f"a{i}")
    (proj / "data").mkdir()
    for i in range(2):
        shutil.copy(calibration_file("jsonl", n=6, seed=i), proj / "data" / f"d{i}.jsonl")
    (proj / "merge.yaml").write_text(YAML)
    # a data-free variant without iteris parameters, so --method can switch it to any method
    (proj / "plain.yaml").write_text(YAML.replace("  iterations: 2\n  alpha1: 1e-7   # PyYAML reads this as a string\n  alpha2: 1e-6\n", "  {}\n"))
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return proj, elsewhere


_run = run_cli


@pytest.fixture(scope="module")
def adapter_run(project):
    """One plain run of the YAML from another working directory: (out dir, stdout)."""
    proj, elsewhere = project
    out = elsewhere / "merged_adapter"
    code, stdout, stderr = _run(["merge", proj / "merge.yaml", "--out", out], elsewhere)
    assert code == 0, stderr
    return out, stdout


def _report(out: Path) -> dict:
    return json.loads((out / "merge_report.json").read_text())


# ------------------------------------------------------------------------------------------------
# iteris methods


def test_methods_lists_every_method_and_iteris_parameters(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    headers = {line.split()[0] for line in text.splitlines() if line and not line.startswith(" ")}
    assert headers == set(iteris.METHODS)
    assert len(iteris.METHODS) >= 5
    # the iteris block names its parameters with their defaults
    blocks = {b.split()[0]: b for b in text.strip().split("\n\n")}
    block = blocks["iteris"]
    assert "[needs calibration data]" in block
    for pname in ("gamma", "alpha1", "alpha2", "iterations"):
        assert f"    {pname} = " in block
    assert "    gamma = 0.0" in block


def test_python_dash_m_methods():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "iteris", "methods"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "task_arithmetic" in proc.stdout and "alpha1" in proc.stdout


# ------------------------------------------------------------------------------------------------
# iteris merge


def test_merge_yaml_with_relative_paths(project, adapter_run):
    proj, _ = project
    out, stdout = adapter_run
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    report = _report(out)
    assert report["summary"] in stdout and f"Written to {out}" in stdout
    # relative paths were resolved against the YAML's directory, not the working directory
    assert Path(report["base_model"]) == proj / "base"
    assert [Path(a["path"]) for a in report["adapters"]] == [proj / "adapters" / "a0", proj / "adapters" / "a1"]
    assert [Path(a["data"]) for a in report["adapters"]] == [proj / "data" / "d0.jsonl", proj / "data" / "d1.jsonl"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == proj / "base"


def test_merge_report_fields(adapter_run):
    out, _ = adapter_run
    report = _report(out)
    assert report["method"] == "iteris"
    params = report["parameters"]
    assert params["iterations"] == 2 and params["alpha1"] == 1e-7 and params["alpha2"] == 1e-6
    assert params["gamma"] == 0.0 and params["adaptive_weights"] is True

    assert [a["name"] for a in report["adapters"]] == ["first", "second"]
    assert [a["weight"] for a in report["adapters"]] == [1.0, 0.5]
    for a in report["adapters"]:
        assert a["samples"] == 4
        assert isinstance(a["tokens"], int) and a["tokens"] > a["samples"]
        assert a["layers"] == N_LAYERS and a["ranks"] == [4]

    its = report["iterations"]
    assert [it["iteration"] for it in its] == [0, 1, 2]
    assert its[0]["relative_change"] is None
    layer_names = set(report["output"]["ranks"])
    assert len(layer_names) == N_LAYERS
    for it in its[1:]:
        assert isinstance(it["relative_change"], float) and 0.0 < it["relative_change"] < float("inf")
        assert set(it["per_module"]) == layer_names
        assert all(isinstance(v, float) and v >= 0.0 for v in it["per_module"].values())
    # the overall change combines the per-module ones: it lies within their range
    per = its[1]["per_module"].values()
    assert min(per) - 1e-12 <= its[1]["relative_change"] <= max(per) + 1e-12

    t = report["timings"]
    for key in ("load", "merge", "capture", "solve", "write", "total"):
        assert isinstance(t[key], float) and t[key] >= 0.0, key
    assert t["total"] >= t["merge"] >= t["capture"]

    assert report["peak_memory"]["cpu_max_rss_mb"] > 10
    assert set(report["output"]["ranks"].values()) == {8}  # exact: sum of the two ranks
    assert report["output"]["exact"] is True
    assert isinstance(report["summary"], str) and "iteris" in report["summary"] and "second" in report["summary"]


def test_rank_flag_compresses_every_layer(project, tmp_path):
    proj, elsewhere = project
    out = tmp_path / "rank2"
    code, _, stderr = _run(["merge", proj / "merge.yaml", "--out", out, "--rank", "2", "--quiet"], elsewhere)
    assert code == 0, stderr
    report = _report(out)
    ranks = report["output"]["ranks"]
    assert len(ranks) == N_LAYERS and set(ranks.values()) == {2}
    assert report["output"]["exact"] is False
    errors = report["output"]["relative_error"]
    assert set(errors) == set(ranks)
    assert all(0.0 < e < 1.0 for e in errors.values())  # rank 8 -> 2 loses something, never everything
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and not config.get("rank_pattern")
    sd = load_file(str(out / "adapter_model.safetensors"))
    a_shapes = {v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")}
    assert a_shapes == {2}


def test_merge_into_base_matches_adapter_logits(project, adapter_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proj, elsewhere = project
    adapter_out, _ = adapter_run
    out = tmp_path / "full"
    code, _, stderr = _run(["merge", proj / "merge.yaml", "--out", out, "--merge-into-base"], elsewhere)
    assert code == 0, stderr
    assert not (out / "adapter_config.json").exists() and not (out / ".adapter").exists()
    assert _report(out)["method"] == "iteris"

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))  # the tokenizer is saved beside the model
    ids = tok(["the river runs under the old bridge", "a small bird sings"], padding=True, return_tensors="pt")

    base = AutoModelForCausalLM.from_pretrained(str(proj / "base"), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(adapter_out)).eval()(**ids).logits
        merged_logits = merged(**ids).logits
    # float32 W0 + dW against PEFT's x A^T B^T: rounding grows with ||dW||, which these test adapters make large
    torch.testing.assert_close(merged_logits, peft_logits, atol=3e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the merge changed the model


def test_force_and_method_override(project, tmp_path):
    proj, elsewhere = project
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = _run(["merge", proj / "plain.yaml", "--out", out, "--method", "task_arithmetic"], elsewhere)
    assert code == 2 and "--force" in err and (out / "old.txt").exists()
    code, _, err = _run(["merge", proj / "plain.yaml", "--out", out, "--method", "task_arithmetic", "--force"], elsewhere)
    assert code == 0, err
    assert not (out / "old.txt").exists()
    assert _report(out)["method"] == "task_arithmetic"


# ------------------------------------------------------------------------------------------------
# Errors: exit code 2 and one line on stderr


def _assert_one_line_error(capsys, code, *words):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("iteris: error: ")
    assert "Traceback" not in captured.err
    for word in words:
        assert word in lines[0]


def test_bad_config_exit_code_and_message(project, tmp_path, capsys):
    proj, _ = project
    bad = proj / "bad_method.yaml"
    bad.write_text(YAML.replace("method: iteris", "method: iteriss"))
    code = main(["merge", str(bad), "--out", str(tmp_path / "out")])
    _assert_one_line_error(capsys, code, "unknown method 'iteriss'", "task_arithmetic")
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_yaml(project, tmp_path, capsys):
    proj, _ = project
    bad = proj / "bad_key.yaml"
    bad.write_text(YAML.replace("progress: false", "progres: false"))
    code = main(["merge", str(bad), "--out", str(tmp_path / "out")])
    _assert_one_line_error(capsys, code, "progres", "valid keys")


def test_missing_config_file(tmp_path, capsys):
    code = main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    _assert_one_line_error(capsys, code, "nope.yaml", "not found")


def test_yaml_that_is_not_a_mapping(tmp_path, capsys):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- a\n- b\n")
    code = main(["merge", str(cfg), "--out", str(tmp_path / "out")])
    _assert_one_line_error(capsys, code, "mapping")


def test_invalid_yaml_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("base_model: [base\nmethod: iteris\n")
    code = main(["merge", str(cfg), "--out", str(tmp_path / "out")])
    _assert_one_line_error(capsys, code, "broken.yaml", "YAML")


def test_rank_zero_is_refused(project, tmp_path, capsys):
    proj, elsewhere = project
    code = main(["merge", str(proj / "plain.yaml"), "--out", str(tmp_path / "out"), "--rank", "0",
                 "--method", "task_arithmetic"])
    _assert_one_line_error(capsys, code, "rank")


def test_method_override_runs_the_new_method_with_its_defaults(tmp_path, tiny_family_dir, adapters_for, capsys):
    import yaml

    adapters = adapters_for("llama", 2)
    cfg = {"base_model": str(tiny_family_dir("llama")), "method": "ties", "parameters": {"density": 0.3},
           "progress": False, "adapters": [{"name": f"t{i}", "path": str(a)} for i, a in enumerate(adapters)]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), "--out", str(tmp_path / "o"), "--method", "task_arithmetic", "--quiet"]) == 0
    report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["parameters"] == {"scale": 1.0}
    assert "default parameters" in capsys.readouterr().out
