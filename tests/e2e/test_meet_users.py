"""What a user gets beside the merged weights: the model card, merging inside a live PeftModel, plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import iteris
from iteris.card import SCORES_START, update_scores
from iteris.cli import main


def _config(base, adapters, data, **extra):
    parameters = extra.pop("parameters", {"schedule": "sequential"} if extra.get("method", "iteris") == "iteris" else {})
    return {
        "base_model": str(base), "method": "iteris", "device": "cpu", "dtype": "float32", "progress": False,
        "parameters": parameters,
        "calibration": {"samples": 6, "max_length": 32, "batch_size": 3},
        "adapters": [{"name": f"task{i}", "path": str(a), "data": str(d), "weight": 1.0 + 0.5 * i}
                     for i, (a, d) in enumerate(zip(adapters, data))],
        **extra,
    }


@pytest.fixture(scope="module")
def setup(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", n=2)
    data = [calibration_file("jsonl", n=8, seed=s) for s in (0, 1)]
    return base, adapters, data


def test_every_merge_writes_a_model_card_the_hub_reads(tmp_path, setup):
    from huggingface_hub import ModelCard

    base, adapters, data = setup
    out = tmp_path / "merged"
    iteris.merge(_config(base, adapters, data), out=out)
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert "base_model" not in meta  # a local path: the Hub would refuse it (it is named in the body)
    assert f"`{base}`" in card.text
    assert meta["library_name"] == "peft"
    assert {"merge", "lora", "iteris"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-generation"  # the adapters' task type, CAUSAL_LM
    report = json.loads((out / "merge_report.json").read_text())
    text = card.text
    for entry in report["adapters"]:  # each adapter with its weight and its calibration counts, not its text
        assert f"| {entry['name']} | {entry['weight']:g} |" in text
        assert f"{entry['samples']} samples, {entry['tokens']} tokens" in text
    first_record = json.loads(Path(data[0]).read_text().splitlines()[0])
    assert next(iter(first_record.values()))[:30] not in text
    assert "schedule: sequential" in text and "Exact" in text
    assert SCORES_START in text


def test_merge_into_base_card_says_transformers(tmp_path, setup):
    from huggingface_hub import ModelCard

    base, adapters, data = setup
    out = tmp_path / "full"
    iteris.merge(_config(base, adapters, data, method="task_arithmetic", merge_into_base=True), out=out)
    meta = ModelCard.load(out / "README.md").data.to_dict()
    assert meta["library_name"] == "transformers" and "task_arithmetic" in meta["tags"]


def test_eval_update_cards_writes_scores_into_iteris_cards_only(tmp_path, setup, calibration_file):
    from huggingface_hub import ModelCard

    base, adapters, data = setup
    out = tmp_path / "merged"
    iteris.merge(_config(base, adapters, data), out=out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("# someone else's card\n")
    before = (foreign / "README.md").read_bytes()
    import shutil

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, foreign / name)
    eval_cfg = tmp_path / "eval.json"
    eval_cfg.write_text(json.dumps({
        "base_model": str(base), "device": "cpu", "dtype": "float32", "progress": False,
        "tasks": [{"name": f"t{i}", "data": str(d), "adapter": str(a), "limit": 4, "metric": "perplexity"}
                  for i, (a, d) in enumerate(zip(adapters, data))],
        "models": [{"name": "merged", "path": str(out)}, {"name": "foreign", "path": str(foreign)}],
    }))
    assert main(["eval", str(eval_cfg), "--update-cards", "--quiet"]) == 0
    card = ModelCard.load(out / "README.md")
    assert "| merged |" in card.text and "| individual |" in card.text and "| foreign |" not in card.text
    assert "Not scored yet" not in card.text
    assert (foreign / "README.md").read_bytes() == before


def test_update_scores_refuses_a_card_without_the_markers(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# mine\n")
    assert not update_scores(card, "scores")
    assert card.read_text() == "# mine\n"
    assert not update_scores(tmp_path / "absent.md", "scores")


def _lora_products(state: dict, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    names = {k[len(prefix):].rsplit(".lora_", 1)[0] for k in state if ".lora_A" in k}
    return {n: state[f"{prefix}{n}.lora_B.weight"].double() @ state[f"{prefix}{n}.lora_A.weight"].double()
            for n in names}


@pytest.mark.parametrize("method", ["iteris", "task_arithmetic"])
def test_add_merged_adapter_equals_the_file_merge(tmp_path, setup, load_tiny, method):
    from peft import PeftModel, get_peft_model_state_dict

    base, adapters, data = setup
    cfg = _config(base, adapters, data, method=method)
    out = tmp_path / "merged"
    iteris.merge(cfg, out=out)
    by_file = _lora_products(load_file(out / "adapter_model.safetensors"))
    model, tokenizer = load_tiny("llama")
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="task0")
    peft_model.load_adapter(str(adapters[1]), adapter_name="task1")
    report = iteris.add_merged_adapter(peft_model, ["task0", "task1"], data=[str(d) for d in data],
                                       tokenizer=tokenizer, method=method, adapter_name="both", weights=[1.0, 1.5],
                                       calibration=cfg["calibration"], **cfg["parameters"])
    assert report["adapter_name"] == "both" and "both" in peft_model.peft_config
    live = _lora_products(get_peft_model_state_dict(peft_model, adapter_name="both"))
    assert live.keys() == by_file.keys()
    for name, product in by_file.items():
        assert (live[name] - product).norm() <= 1e-6 * product.norm(), name
    # the new adapter is the one used once set, and the loaded ones are untouched
    peft_model.set_adapter("both")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        merged_logits = peft_model(input_ids=ids).logits
        peft_model.set_adapter("task0")
        own_logits = peft_model(input_ids=ids).logits
    assert not torch.allclose(merged_logits, own_logits)


def test_add_merged_adapter_says_what_is_wrong(setup, load_tiny):
    from peft import PeftModel

    base, adapters, data = setup
    model, tokenizer = load_tiny("llama")
    with pytest.raises(iteris.IterisError, match="PeftModel"):
        iteris.add_merged_adapter(model, ["a"], data=[])
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="task0")
    with pytest.raises(iteris.IterisError, match=r"\['missing'\] are not loaded"):
        iteris.add_merged_adapter(peft_model, ["task0", "missing"], data=[])
    with pytest.raises(iteris.IterisError, match="already has an adapter named 'task0'"):
        iteris.add_merged_adapter(peft_model, ["task0"], data=[str(data[0])], adapter_name="task0")
    with pytest.raises(iteris.IterisError, match="one entry per adapter"):
        iteris.add_merged_adapter(peft_model, ["task0"], data=None, tokenizer=tokenizer)
    with pytest.raises(iteris.IterisError, match="need a tokenizer"):
        iteris.add_merged_adapter(peft_model, ["task0"], data=[["some text"]])
    assert list(peft_model.peft_config) == ["task0"]  # nothing was added by a refused call


def test_plots_beside_the_merge_and_the_scores(tmp_path, setup):
    pytest.importorskip("matplotlib")
    from huggingface_hub import ModelCard

    base, adapters, data = setup
    out = tmp_path / "merged"
    iteris.merge(_config(base, adapters, data, parameters={"schedule": "global", "iterations": 2}), out=out,
                 plot=True)
    for name in ("merge_convergence.png", "merge_layer_error.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in ModelCard.load(out / "README.md").text
    eval_cfg = tmp_path / "eval.json"
    eval_cfg.write_text(json.dumps({
        "base_model": str(base), "device": "cpu", "dtype": "float32", "progress": False,
        "tasks": [{"name": "t0", "data": str(data[0]), "adapter": str(adapters[0]), "limit": 3, "metric": "perplexity"}],
        "models": [{"name": "merged", "path": str(out)}],
    }))
    assert main(["eval", str(eval_cfg), "--out", str(tmp_path / "scores"), "--plot", "--quiet"]) == 0
    assert (tmp_path / "scores" / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_fails_before_any_work(tmp_path, setup, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    base, adapters, data = setup
    with pytest.raises(iteris.IterisError, match=r"iteris\[plot\]"):
        iteris.merge(_config(base, adapters, data), out=tmp_path / "m", plot=True)
    assert not (tmp_path / "m").exists()


def test_card_names_the_base_by_its_hub_id():
    from huggingface_hub import ModelCard

    from iteris.card import hub_id, merge_card
    from iteris.config import load_config

    def config(base):
        return load_config({"base_model": base, "method": "ties", "adapters": [{"name": "a", "path": "p"}]})

    assert hub_id(config("HuggingFaceTB/SmolLM2-135M-Instruct")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id(config("/models/smollm2"), [{"base_model_name_or_path": "org/base"}] * 2) == "org/base"
    assert hub_id(config("/models/smollm2"), [{"base_model_name_or_path": "org/a"}, {"base_model_name_or_path": "org/b"}]) is None
    assert hub_id(config("/models/smollm2"), [{"base_model_name_or_path": "/elsewhere/base"}]) is None
    text = merge_card({"method": "ties"}, config("org/base"), library="peft", task_type="CAUSAL_LM")
    assert ModelCard(text).data.to_dict()["base_model"] == "org/base"
