"""Cases real models bring: tied weights, flattened layer inputs, several stop ids, layers run twice,
decoder-only classifiers without a pad id, dense merges folded into the base."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from torch import nn

import iteris
from iteris.engine import layers as engine_layers
from iteris.adapters import load_adapter
from iteris.engine.inject import DeltaInjector
from iteris.engine.layers import find_groups, token_rows
from iteris.engine.forward import Batch
from iteris.families.text import _cut_after_stop, _stop_ids
from tests.helpers import fixtures as fx
from tests.helpers.merging import float64_config as _config


def test_overriding_a_tied_weight_leaves_its_partner_alone(tiny_family_dir, tmp_path):
    """GPT-2 ties lm_head to the token embeddings; an adapter's own lm_head must not leak into them."""
    base_dir = tiny_family_dir("gpt2")
    adapter_dir = fx.make_lora_adapter(base_dir, tmp_path / "a", "gpt2", seed=3, modules_to_save=["lm_head"])
    adapter = load_adapter("a", adapter_dir)
    assert "lm_head.weight" in adapter.extra_tensors

    model, tok = fx.load_base(base_dir, "gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    embedding_before = model.transformer.wte.weight.detach().clone()
    layers = engine_layers.resolve_layers(model, list(adapter.modules))
    injector = DeltaInjector(model, layers)
    injector.set_variant("own", adapter.modules)
    inputs = tok(fx.sample_sentences(2), return_tensors="pt", padding=True)
    with torch.no_grad(), injector.use("own", adapter.extra_tensors):
        ours = model(**inputs).logits
    injector.remove()
    assert torch.equal(model.transformer.wte.weight, embedding_before)
    assert model.lm_head.weight is model.transformer.wte.weight  # restored

    peft_model = PeftModel.from_pretrained(fx.load_base(base_dir, "gpt2")[0], str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_token_rows_for_each_input_layout():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    masks = {3: mask}
    batch = Batch(inputs={}, masks=masks)
    assert torch.equal(token_rows(x, batch, "l"), x[mask])
    assert torch.equal(token_rows(x.reshape(6, 4), batch, "l"), x[mask])  # a flattened batch: padding dropped
    pooled = torch.randn(2, 4)
    assert torch.equal(token_rows(pooled, batch, "l"), pooled)  # one row per sample
    with pytest.raises(iteris.IterisError, match="routed expert"):
        token_rows(torch.randn(5, 4), batch, "experts.0.w1")  # a subset of tokens: cannot be paired


def test_generation_stops_at_any_configured_stop_id():
    class Cfg:
        eos_token_id = [7, 9]

    class Model:
        generation_config = Cfg()

    class Tok:
        eos_token_id = 2

    stops = _stop_ids(Model(), Tok())
    assert stops == {2, 7, 9}
    assert _cut_after_stop([5, 6, 9, 3, 3], stops) == [5, 6, 9]
    assert _cut_after_stop([5, 6], stops) == [5, 6]


def test_a_layer_run_twice_is_not_grouped_with_a_layer_run_once():
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.other = nn.Linear(4, 4)
            self.config = SimpleNamespace(is_encoder_decoder=False)

        def forward(self, input_ids, attention_mask=None):
            x = torch.nn.functional.one_hot(input_ids, 4).float()
            first = self.shared(x)
            second = first + 1
            return self.shared(second) + self.other(second)

    model = TwoCalls().eval()
    probe = Batch(inputs={"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)},
                  masks={3: torch.ones(1, 3, dtype=torch.bool)})
    groups = find_groups(model, {"shared": model.shared, "other": model.other}, probe)
    assert sorted(g.members for g in groups) == [["other"], ["shared"]]


def test_decoder_only_classifier_without_pad_id(tmp_path, calibration_file):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = fx.make_tokenizer(tmp_path / "base", "llama")
    config = LlamaConfig(vocab_size=fx.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    adapters = []
    for seed in (0, 1):
        peft_model = get_peft_model(
            LlamaForSequenceClassification.from_pretrained(tmp_path / "base"),
            LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj", "v_proj"]),
        )
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for name, p in peft_model.named_parameters():
                if "lora_" in name or "score" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(tmp_path / f"a{seed}")
    data = [calibration_file("jsonl", 4, s) for s in (0, 1)]
    cfg = _config(tmp_path / "base", adapters, data, parameters={"iterations": 1}, modules_to_save="per_adapter")
    result = iteris.merge(cfg)
    assert result.report["calibration"]["model_kind"] == "encoder" and tok.pad_token_id is not None


def test_trainable_token_adapters_are_refused(tiny_family_dir, tmp_path):
    adapter_dir = fx.make_lora_adapter(tiny_family_dir("llama"), tmp_path / "tt", "llama", seed=0,
                                       trainable_token_indices=[5, 6])
    with pytest.raises(iteris.IterisError, match="token"):
        load_adapter("tt", adapter_dir)


def test_dense_merge_folded_into_base_is_exact(tiny_family_dir, adapters_for, tmp_path):
    """TIES is dense: as an adapter it is cut to sum(r_i), but --merge-into-base keeps it whole."""
    from transformers import AutoModelForCausalLM

    base_dir = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    cfg = {"base_model": str(base_dir), "method": "ties", "parameters": {"density": 0.5}, "progress": False,
           "adapters": [{"name": f"t{i}", "path": str(a)} for i, a in enumerate(adapters)]}
    result = iteris.merge({**cfg, "merge_into_base": True}, out=tmp_path / "full")
    assert result.report["output"]["exact"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lossy = iteris.merge(cfg)
    assert not lossy.report["output"]["exact"]
    for name, delta in result.deltas.items():
        got = merged.get_submodule(name).weight.double() - base.get_submodule(name).weight.double()
        assert torch.allclose(got, delta.dense(), atol=1e-5), name


def test_nested_calibration_override(tiny_family_dir, adapters_for, calibration_file):
    cfg = _config(tiny_family_dir("llama"), adapters_for("llama", 2), [calibration_file("jsonl", 8, s) for s in (0, 1)],
                  parameters={"iterations": 0})
    result = iteris.merge(cfg, calibration={"samples": 3})
    assert [a["samples"] for a in result.report["adapters"]] == [3, 3]


def test_base_directory_without_weights(tiny_family_dir, adapters_for, calibration_file, tmp_path):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_family_dir("llama"), broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    cfg = _config(broken, adapters_for("llama", 2), [calibration_file("jsonl", 4, s) for s in (0, 1)])
    with pytest.raises(iteris.IterisError, match="weights"):
        iteris.merge(cfg)


def test_generate_needs_a_generating_model(tiny_family_dir, adapters_for, calibration_file):
    cfg = _config(tiny_family_dir("bert"), adapters_for("bert", 2), [calibration_file("jsonl", 4, s) for s in (0, 1)],
                  modules_to_save="per_adapter")
    cfg["calibration"]["generate"] = True
    with pytest.raises(iteris.IterisError, match="encoder"):
        iteris.merge(cfg)
