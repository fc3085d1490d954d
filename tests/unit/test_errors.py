"""Every bad input gets a clear IterisError before any long work; outputs are written atomically."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import iteris
from iteris import IterisError
from iteris.methods import get_method

merge_mod = importlib.import_module("iteris.merge")  # ``iteris.merge`` is the function
model_job = importlib.import_module("iteris.families.transformers")
models_mod = importlib.import_module("iteris.families.loading")
run_mod = importlib.import_module("iteris.run")


def _cfg(base, adapters, data=None, method="task_arithmetic", **extra):
    entries = []
    for i, path in enumerate(adapters):
        entry = {"name": f"t{i}", "path": str(path)}
        if data is not None:
            entry["data"] = str(data[i])
        entries.append(entry)
    return {
        "base_model": str(base),
        "method": method,
        "device": "cpu",
        "calibration": {"samples": 4, "max_length": 32, "batch_size": 4},
        "adapters": entries,
        "progress": False,
        **extra,
    }


def _refuse(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was reached: the error should have been raised before it")

    return fail


@pytest.fixture
def no_adapter_loading(monkeypatch):
    """Config/parameter/output errors must come before any adapter or model is read."""
    monkeypatch.setattr(model_job, "load_adapter", _refuse("load_adapter"))
    monkeypatch.setattr(models_mod, "load_base_model", _refuse("load_base_model"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Errors about adapters and data must come before the base model is loaded."""
    monkeypatch.setattr(models_mod, "load_base_model", _refuse("load_base_model"))


@pytest.fixture
def llama(tiny_family_dir, adapters_for):
    return tiny_family_dir("llama"), adapters_for("llama", 2)


@pytest.fixture
def llama_data(calibration_file):
    return [calibration_file("jsonl", n=6, seed=s) for s in (0, 1)]


def _siblings(out):
    """Temporary directories atomic_directory may leave beside ``out``."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-") or p.name.startswith(f".{out.name}.old-"))


# ------------------------------------------------------------------------------------------------
# Method and parameters


def test_unknown_method_lists_available(llama, tmp_path, no_adapter_loading):
    base, adapters = llama
    with pytest.raises(IterisError) as info:
        iteris.merge(_cfg(base, adapters, method="iterris"), out=tmp_path / "out")
    msg = str(info.value)
    assert "iterris" in msg
    for name in iteris.METHODS:
        assert name in msg
    assert not (tmp_path / "out").exists()


def test_unknown_parameter_lists_valid_ones(llama, tmp_path, no_adapter_loading):
    base, adapters = llama
    with pytest.raises(IterisError) as info:
        iteris.merge(_cfg(base, adapters, method="iteris", parameters={"gama": 0.5}), out=tmp_path / "out")
    msg = str(info.value)
    assert "gama" in msg
    for valid in ("gamma", "alpha1", "alpha2", "iterations", "adaptive_weights"):
        assert valid in msg


@pytest.mark.parametrize(
    "method,params,word",
    [
        ("iteris", {"iterations": -1}, "iterations"),
        ("iteris", {"gamma": 2}, "gamma"),
        ("iteris", {"alpha1": -1.0}, "alpha1"),
        ("iteris", {"iterations": "many"}, "iterations"),
        ("iteris", {"iterations": 1.5}, "iterations"),
        ("iteris", {"gamma": "high"}, "gamma"),
        ("iteris", {"solve_space": "tokens"}, "solve_space"),
        ("iteris", {"solve_space": "samples", "alpha2": 0.0}, "alpha2 > 0"),
        ("ties", {"density": 0}, "density"),
        ("dare_linear", {"density": 1.5}, "density"),
    ],
)
def test_bad_parameter_values(llama, tmp_path, no_adapter_loading, method, params, word):
    base, adapters = llama
    with pytest.raises(IterisError, match=word):
        iteris.merge(_cfg(base, adapters, method=method, parameters=params), out=tmp_path / "out")


def test_string_and_int_numbers_are_accepted_for_floats():
    params = get_method("iteris").parse_params({"alpha1": "1e-7", "alpha2": "2.5e-3", "gamma": 1, "iterations": 3})
    assert params.alpha1 == 1e-7 and isinstance(params.alpha1, float)
    assert params.alpha2 == 2.5e-3
    assert params.gamma == 1.0 and isinstance(params.gamma, float)
    assert params.iterations == 3 and isinstance(params.iterations, int)


@pytest.mark.parametrize("params,word", [({"adaptive_weights": "false"}, "true or false"),
                                         ({"adaptive_weights": 0}, "true or false"),
                                         ({"iterations": "3"}, "integer"), ({"iterations": True}, "integer")])
def test_booleans_and_integers_are_not_guessed_from_other_types(params, word):
    """A quoted 'false' is a string, and a string is true: one typed reading refuses it instead of guessing."""
    with pytest.raises(IterisError, match=word):
        get_method("iteris").parse_params(params)


def test_string_float_parameter_in_a_merge(llama):
    base, adapters = llama
    half = iteris.merge(_cfg(base, adapters, parameters={"scale": "5e-1"}))
    full = iteris.merge(_cfg(base, adapters, parameters={"scale": 1}))
    assert half.report["parameters"]["scale"] == 0.5
    for name, d in full.deltas.items():
        torch.testing.assert_close(half.deltas[name].dense(), 0.5 * d.dense())


@pytest.mark.parametrize("params", [{"alpha1": "nan"}, {"alpha2": float("nan")}, {"tol": "nan"}])
def test_nan_parameters_are_refused(params):
    with pytest.raises(IterisError):
        get_method("iteris").parse_params(params)


# ------------------------------------------------------------------------------------------------
# Config structure


@pytest.mark.parametrize(
    "mutate,words",
    [
        (lambda c: c.update(methd="iteris"), ["methd", "base_model", "parameters"]),
        (lambda c: c["calibration"].update(sample=3), ["sample", "samples", "max_length"]),
        (lambda c: c["adapters"][0].update(wieght=2.0), ["wieght", "weight", "adapters[0]"]),
    ],
)
def test_unknown_config_keys(llama, tmp_path, no_adapter_loading, mutate, words):
    base, adapters = llama
    cfg = _cfg(base, adapters)
    mutate(cfg)
    with pytest.raises(IterisError) as info:
        iteris.merge(cfg, out=tmp_path / "out")
    for word in words:
        assert word in str(info.value)


def test_unknown_keyword_override(llama, no_adapter_loading):
    base, adapters = llama
    with pytest.raises(IterisError, match="unknown option 'ranks'"):
        iteris.merge(_cfg(base, adapters), ranks=2)


@pytest.mark.parametrize("key", ["base_model", "adapters"])
def test_missing_required_keys(llama, no_adapter_loading, key):
    base, adapters = llama
    cfg = _cfg(base, adapters)
    del cfg[key]
    with pytest.raises(IterisError, match=f"'{key}'"):
        iteris.merge(cfg)


def test_empty_adapter_list(llama, no_adapter_loading):
    base, _ = llama
    with pytest.raises(IterisError, match="adapters"):
        iteris.merge(_cfg(base, []))


@pytest.mark.parametrize(
    "mutate,word",
    [
        (lambda c: c.update(rank=0), "rank"),
        (lambda c: c["calibration"].update(samples=0), "samples"),
        (lambda c: c["calibration"].update(stats_dtype="float16"), "stats_dtype"),
        (lambda c: c["calibration"].update(overlap="yes"), "overlap"),
        (lambda c: c["calibration"].update(offload_stats="yes"), "offload_stats"),
        (lambda c: c.update(device_map="everywhere"), "device_map"),
        (lambda c: c.update(device_map="auto", device="cpu"), "device_map"),
        (lambda c: c["calibration"].update(walk="layers"), "walk"),
        (lambda c: c["adapters"][0].update(weight="heavy"), "weight"),
        (lambda c: c.update(parameters=[1, 2]), "parameters"),
    ],
)
def test_bad_config_values(llama, no_adapter_loading, mutate, word):
    base, adapters = llama
    cfg = _cfg(base, adapters)
    mutate(cfg)
    with pytest.raises(IterisError, match=word):
        iteris.merge(cfg)


def test_duplicate_adapter_names(llama, no_adapter_loading):
    base, adapters = llama
    cfg = _cfg(base, adapters)
    cfg["adapters"][1]["name"] = "t0"
    with pytest.raises(IterisError, match="unique") as info:
        iteris.merge(cfg)
    assert "t0" in str(info.value)


def test_duplicate_default_names_from_paths(llama, tmp_path, no_adapter_loading):
    """Without `name`, an adapter is named after its directory; two 'adapter' directories clash."""
    base, adapters = llama
    paths = []
    for i, src in enumerate(adapters):
        dst = tmp_path / f"run{i}" / "adapter"
        shutil.copytree(src, dst)
        paths.append(dst)
    cfg = _cfg(base, adapters)
    cfg["adapters"] = [{"path": str(p)} for p in paths]
    with pytest.raises(IterisError, match="unique"):
        iteris.merge(cfg)


@pytest.mark.parametrize("rank", [0, -1])
def test_bad_rank_override(llama, tmp_path, no_adapter_loading, rank):
    base, adapters = llama
    with pytest.raises(IterisError, match="rank"):
        iteris.merge(_cfg(base, adapters), out=tmp_path / "out", rank=rank)


@pytest.mark.parametrize("samples", [0, -1, "10"])
def test_bad_per_adapter_samples(llama, llama_data, no_model_loading, samples):
    base, adapters = llama
    cfg = _cfg(base, adapters, llama_data, method="iteris")
    cfg["adapters"][0]["samples"] = samples
    with pytest.raises(IterisError, match="samples"):
        iteris.merge(cfg)


# ------------------------------------------------------------------------------------------------
# Adapters and data


def test_adapter_path_without_adapter_config(llama, tmp_path, no_model_loading):
    base, adapters = llama
    empty = tmp_path / "not_an_adapter"
    empty.mkdir()
    (empty / "adapter_model.safetensors").write_bytes(b"")
    cfg = _cfg(base, [adapters[0], empty])
    with pytest.raises(IterisError) as info:
        iteris.merge(cfg, out=tmp_path / "out")
    msg = str(info.value)
    assert "t1" in msg and "adapter_config.json" in msg and "not_an_adapter" in msg
    assert not (tmp_path / "out").exists()


def test_adapter_path_that_does_not_exist(llama, tmp_path, no_model_loading):
    base, adapters = llama
    with pytest.raises(IterisError, match="adapter_config.json"):
        iteris.merge(_cfg(base, [adapters[0], tmp_path / "missing"]))


def test_data_file_missing(llama, llama_data, tmp_path, no_model_loading):
    base, adapters = llama
    data = [llama_data[0], tmp_path / "no_such_data.jsonl"]
    with pytest.raises(IterisError, match="not found") as info:
        iteris.merge(_cfg(base, adapters, data, method="iteris"), out=tmp_path / "out")
    assert "no_such_data.jsonl" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_data_missing_for_data_aware_method(llama, tmp_path, no_model_loading):
    base, adapters = llama
    with pytest.raises(IterisError, match="data") as info:
        iteris.merge(_cfg(base, adapters, method="iteris"), out=tmp_path / "out")
    assert "t0" in str(info.value) and "t1" in str(info.value)


def test_data_not_needed_for_task_arithmetic(llama, tmp_path, no_model_loading):
    base, adapters = llama
    out = tmp_path / "out"
    result = iteris.merge(_cfg(base, adapters), out=out)
    assert (out / "adapter_config.json").is_file() and (out / "merge_report.json").is_file()
    assert "samples" not in result.report["adapters"][0]


def test_missing_field_in_data_is_reported_before_the_model_loads(llama, tmp_path, no_model_loading):
    base, adapters = llama
    data = tmp_path / "d.jsonl"
    data.write_text('{"sentence": "the river"}\n')
    with pytest.raises(IterisError, match="sentence"):
        iteris.merge(_cfg(base, adapters, [data, data], method="iteris"))


def test_adapters_for_another_base_model(tiny_family_dir, adapters_for, llama_data, tmp_path, monkeypatch):
    monkeypatch.setattr(run_mod, "Engine", _refuse("Engine (statistics capture)"))
    gpt2 = tiny_family_dir("gpt2")
    adapters = adapters_for("llama", 2)
    with pytest.raises(IterisError) as info:
        iteris.merge(_cfg(gpt2, adapters, llama_data, method="iteris"), out=tmp_path / "out")
    msg = str(info.value)
    assert "GPT2" in msg and "_proj" in msg
    assert not (tmp_path / "out").exists()


def test_adapters_for_another_base_model_data_free(tiny_family_dir, adapters_for, tmp_path):
    gpt2 = tiny_family_dir("gpt2")
    adapters = adapters_for("llama", 2)
    with pytest.raises(IterisError):
        iteris.merge(_cfg(gpt2, adapters), out=tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Output directory


def test_non_empty_output_without_force(llama, tmp_path, no_adapter_loading):
    base, adapters = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(IterisError, match="force") as info:
        iteris.merge(_cfg(base, adapters), out=out)
    assert "not empty" in str(info.value)
    assert (out / "precious.txt").read_text() == "keep me"


def test_output_is_a_file(llama, tmp_path, no_adapter_loading):
    base, adapters = llama
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(IterisError, match="not a directory"):
        iteris.merge(_cfg(base, adapters), out=out, force=True)


def test_empty_existing_output_is_fine_without_force(llama, tmp_path):
    base, adapters = llama
    out = tmp_path / "out"
    out.mkdir()
    iteris.merge(_cfg(base, adapters), out=out)
    assert (out / "adapter_model.safetensors").is_file()


def test_force_replaces_output(llama, tmp_path):
    base, adapters = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    iteris.merge(_cfg(base, adapters), out=out, force=True)
    assert not (out / "old.txt").exists()
    assert (out / "adapter_config.json").is_file() and (out / "merge_report.json").is_file()
    assert _siblings(out) == []


# ------------------------------------------------------------------------------------------------
# Atomicity


def _fail_in_write_report(monkeypatch):
    def boom(directory, report):
        (directory / "merge_report.json").write_text("{partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(model_job, "write_report", boom)


def _fail_after_write_adapter(monkeypatch):
    real = model_job.write_adapter

    def boom(directory, *args, **kwargs):
        real(directory, *args, **kwargs)  # the adapter files exist in the temporary directory...
        raise OSError("disk full (simulated)")  # ...when the save fails

    monkeypatch.setattr(model_job, "write_adapter", boom)


@pytest.mark.parametrize("breaker", [_fail_in_write_report, _fail_after_write_adapter])
def test_failed_save_leaves_nothing(llama, tmp_path, monkeypatch, breaker):
    base, adapters = llama
    out = tmp_path / "nested" / "out"
    breaker(monkeypatch)
    with pytest.raises(IterisError, match="cannot write the output .*simulated"):
        iteris.merge(_cfg(base, adapters), out=out)
    assert not out.exists()
    assert _siblings(out) == []


@pytest.mark.parametrize("breaker", [_fail_in_write_report, _fail_after_write_adapter])
def test_failed_save_with_force_keeps_old_contents(llama, tmp_path, monkeypatch, breaker):
    base, adapters = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("deep")
    breaker(monkeypatch)
    with pytest.raises(IterisError, match="cannot write the output .*simulated"):
        iteris.merge(_cfg(base, adapters), out=out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt", "sub"]
    assert (out / "old.txt").read_text() == "old" and (out / "sub" / "deep.txt").read_text() == "deep"
    assert _siblings(out) == []


def test_failed_save_via_result_save(llama, tmp_path, monkeypatch):
    base, adapters = llama
    result = iteris.merge(_cfg(base, adapters))
    _fail_in_write_report(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(IterisError, match="cannot write the output"):
        result.save(out)
    assert not out.exists() and _siblings(out) == []
    monkeypatch.undo()
    result.save(out)
    assert json.loads((out / "merge_report.json").read_text())["method"] == "task_arithmetic"


# ------------------------------------------------------------------------------------------------
# modules_to_save (bert classifier heads)


@pytest.fixture
def bert(tiny_family_dir, adapters_for):
    base, adapters = tiny_family_dir("bert"), adapters_for("bert", 2)
    heads = []
    for a in adapters:
        sd = load_file(str(a / "adapter_model.safetensors"))
        heads.append({k: v for k, v in sd.items() if ".classifier." in k})
    assert heads[0] and not torch.equal(heads[0]["base_model.model.classifier.weight"], heads[1]["base_model.model.classifier.weight"])
    return base, adapters, heads


def test_conflicting_heads_need_a_policy(bert, tmp_path):
    base, adapters, _ = bert
    with pytest.raises(IterisError) as info:
        iteris.merge(_cfg(base, adapters), out=tmp_path / "out")
    msg = str(info.value)
    assert "per_adapter" in msg and "classifier" in msg and "t0" in msg and "t1" in msg
    assert not (tmp_path / "out").exists()


def test_unknown_heads_policy(bert, no_model_loading):
    base, adapters, _ = bert
    with pytest.raises(IterisError) as info:
        iteris.merge(_cfg(base, adapters, modules_to_save="per-adapter"))
    assert "per_adapter" in str(info.value) and "t0" in str(info.value)


def _peft_classifier(base, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    wrapper = peft_model.base_model.model.classifier
    return peft_model, wrapper.modules_to_save["default"]


def test_per_adapter_heads(bert, tmp_path):
    base, adapters, heads = bert
    out = tmp_path / "out"
    iteris.merge(_cfg(base, adapters, modules_to_save="per_adapter"), out=out)
    assert sorted(p.name for p in out.iterdir()) == ["merge_report.json", "t0", "t1"]
    loras = []
    for i, name in enumerate(["t0", "t1"]):
        sub = out / name
        sd = load_file(str(sub / "adapter_model.safetensors"))
        torch.testing.assert_close(sd["base_model.model.classifier.weight"], heads[i]["base_model.model.classifier.weight"])
        loras.append({k: v for k, v in sd.items() if "lora_" in k})
        # loadable by PEFT on the bert base, and the loaded head is this adapter's own
        peft_model, head = _peft_classifier(base, sub)
        torch.testing.assert_close(head.weight.detach(), heads[i]["base_model.model.classifier.weight"])
        torch.testing.assert_close(head.bias.detach(), heads[i]["base_model.model.classifier.bias"])
        logits = peft_model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
        assert logits.shape == (1, 3)
    # the merged LoRA itself is the same in every sub-directory
    assert loras[0].keys() == loras[1].keys() and loras[0]
    for k in loras[0]:
        assert torch.equal(loras[0][k], loras[1][k])
    report = json.loads((out / "merge_report.json").read_text())
    assert report["output"]["modules_to_save"] == "per_adapter"


def test_named_adapter_head(bert, tmp_path):
    base, adapters, heads = bert
    out = tmp_path / "out"
    iteris.merge(_cfg(base, adapters, modules_to_save="t1"), out=out)
    assert (out / "adapter_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    _, head = _peft_classifier(base, out)
    torch.testing.assert_close(head.weight.detach(), heads[1]["base_model.model.classifier.weight"])
    torch.testing.assert_close(head.bias.detach(), heads[1]["base_model.model.classifier.bias"])


def test_drop_heads(bert, tmp_path):
    base, adapters, _ = bert
    out = tmp_path / "out"
    iteris.merge(_cfg(base, adapters, modules_to_save="drop"), out=out)
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert not any("classifier" in k for k in sd)


def test_device_map_without_a_gpu_is_refused_before_loading(llama, llama_data, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, adapters = llama
    cfg = _cfg(base, adapters, data=llama_data, method="iteris", device="auto", device_map="auto")
    with pytest.raises(IterisError, match="no CUDA GPU"):
        iteris.merge(cfg)
