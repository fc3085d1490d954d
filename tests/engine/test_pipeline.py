"""End to end: saved adapters reload in PEFT, statistics ignore padding, runs are deterministic, memory is flat."""

import copy

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

import iteris
from iteris.engine import Engine
from iteris.engine.inject import DeltaInjector
from tests.helpers import fixtures as fx
from tests.helpers.merging import float64_config as _config


def _inputs(tok, family):
    texts = fx.sample_sentences(3, seed=5)
    enc = tok(texts, return_tensors="pt", padding=True)
    kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family == "t5":
        dec = tok(text_target=texts[::-1], return_tensors="pt", padding=True)["input_ids"]
        kwargs["decoder_input_ids"] = torch.cat([torch.zeros(3, 1, dtype=torch.long), dec], dim=1)
    return kwargs


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_saved_adapter_reloads_in_peft_and_matches_merged_weights(
    family, tmp_path, tiny_family_dir, adapters_for, calibration_file
):
    base_dir = tiny_family_dir(family)
    adapters = adapters_for(family, 2)
    kind = "jsonl_t5" if family == "t5" else "jsonl"
    data = [calibration_file(kind, n=6, seed=s) for s in (0, 1)]
    cfg = _config(base_dir, adapters, data, parameters={"iterations": 1}, dtype="float32")
    cfg["calibration"]["stats_dtype"] = "float32"
    if family == "bert":
        cfg["modules_to_save"] = "t1"
    out = tmp_path / "merged"
    result = iteris.merge(cfg, out=out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "merge_report.json").is_file()

    base, tok = fx.load_base(base_dir, family)
    base = base.double()  # compare in float64 so only real differences show
    expected_model = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in result.deltas.items():
            layer = expected_model.get_submodule(name)
            # the adapter file holds float32 factors: build the expectation from exactly those
            d = delta.B.float().double() @ delta.A.float().double()
            layer.weight += d.T if isinstance(layer, Conv1D) else d
        if family == "bert":  # the chosen adapter's own head
            head = iteris.adapters.load_adapter("t1", adapters[1]).extra_tensors
            for key, value in head.items():
                expected_model.get_parameter(key).copy_(value)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    inputs = _inputs(tok, family)
    with torch.no_grad():
        want = expected_model(**inputs).logits
        got = loaded(**inputs).logits
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (got - want).abs().max()
    # and the merge actually changed the model
    with torch.no_grad():
        assert not torch.allclose(fx.load_base(base_dir, family)[0].double()(**inputs).logits, got, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_statistics_do_not_depend_on_batching_or_padding(family, tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir(family)
    adapters = adapters_for(family, 2)
    data = [calibration_file("jsonl_t5" if family == "t5" else "jsonl", n=7, seed=s) for s in (0, 1)]
    results = []
    for batch_size in (1, 3, 7):
        cfg = _config(base, adapters, data, parameters={"iterations": 1, "alpha1": 1e-5, "alpha2": 1e-5})
        cfg["calibration"]["batch_size"] = batch_size
        if family == "bert":
            cfg["modules_to_save"] = "per_adapter"
        results.append(iteris.merge(cfg))
    for other in results[1:]:
        for name, delta in results[0].deltas.items():
            diff = torch.linalg.norm(delta.dense() - other.deltas[name].dense()) / torch.linalg.norm(delta.dense())
            assert diff < 1e-9, name


def test_runs_are_deterministic(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("gpt2")
    adapters = adapters_for("gpt2", 2)
    data = [calibration_file("jsonl", n=12, seed=s) for s in (0, 1)]

    def run(seed):
        cfg = _config(base, adapters, data, parameters={"iterations": 1}, dtype="float32")
        cfg["calibration"].update(samples=5, seed=seed, stats_dtype="float32")
        return iteris.merge(cfg)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a.deltas[n].A, b.deltas[n].A) for n in a.deltas)
    assert any(not torch.allclose(a.deltas[n].A, c.deltas[n].A) for n in a.deltas)  # other samples drawn


def test_layers_reading_one_input_share_one_gram(tiny_family_dir, adapters_for, calibration_file):
    llama = iteris.merge(
        _config(tiny_family_dir("llama"), adapters_for("llama", 2), [calibration_file("jsonl", 4, s) for s in (0, 1)],
                parameters={"iterations": 0})
    )
    shared = llama.report["calibration"]["shared_input_groups"]
    members = sorted(tuple(sorted(m.rsplit(".", 1)[1] for m in v)) for v in shared.values())
    assert members == [("gate_proj", "up_proj")] * 2 + [("k_proj", "q_proj", "v_proj")] * 2
    assert llama.report["calibration"]["layer_groups"] == 2 * 4  # qkv, o, gate/up, down per block

    t5 = iteris.merge(
        _config(tiny_family_dir("t5"), adapters_for("t5", 2), [calibration_file("jsonl_t5", 4, s) for s in (0, 1)],
                parameters={"iterations": 0})
    )
    groups = t5.report["calibration"]["shared_input_groups"].values()
    # cross-attention keys/values of every decoder block read the same encoder output: one Gram for all four
    assert any(sorted(g) == sorted(f"decoder.block.{b}.layer.1.EncDecAttention.{p}" for b in (0, 1) for p in "kv") for g in groups)


def _stats_elements(base, adapter_dirs, n_samples, calibration_file, tmp_path):
    """Total elements held in the statistics after capturing n_samples per task."""
    from iteris.adapters import load_adapter, target_modules
    from iteris.data import load_records, select_samples
    from iteris.config import CalibrationConfig
    from iteris.engine import CaptureSpec, EngineOptions, GlobalSweep
    from iteris.engine.forward import token_batcher
    from iteris.engine.inject import own
    from iteris.engine.layers import resolve_layers
    from iteris.families.loading import load_base_model, load_tokenizer
    from iteris.families.text import tokenize_samples

    adapters = [load_adapter(f"t{i}", d) for i, d in enumerate(adapter_dirs)]
    tok = load_tokenizer(str(base))
    model = load_base_model(str(base), "CAUSAL_LM", {}, torch.float32, "cpu")
    layers = resolve_layers(model, target_modules(adapters))
    spec = CalibrationConfig(samples=n_samples)
    samples = [
        tokenize_samples(tok, select_samples(load_records(calibration_file("jsonl", 40, s)), spec, "x"), model, 64)
        for s in (0, 1)
    ]
    injector = DeltaInjector(model, layers)
    for i, adapter in enumerate(adapters):
        injector.set_variant(own(i), adapter.modules)
    calib = Engine(model, layers, injector, adapters, samples, token_batcher(tok.pad_token_id, "cpu"),
                   EngineOptions(batch_size=4, stats_dtype=torch.float32))
    seen = []

    def record(group, stats):
        seen.append((group.name, stats))
        return {}

    calib.sweep(GlobalSweep(CaptureSpec()), record, label="x")
    own_stats = [{name: stats[i] for name, stats in seen} for i in range(2)]
    calib.set_merged({n: a.modules[n] for a in adapters[:1] for n in a.modules})
    seen.clear()
    calib.sweep(GlobalSweep(CaptureSpec(paired=True, gamma=0.5, cross="norm")), record, label="x")
    paired = {name: stats[0] for name, stats in seen}
    calib.close()

    def count(stats):
        return sum(st.gram.numel() + (st.cross.numel() if st.cross is not None else 0)
                   + sum(p.numel() for p in st.proj.values()) for st in stats.values())

    tokens = sum(st.tokens for st in own_stats[0].values())
    return sum(count(s) for s in own_stats) + count(paired), tokens


def test_statistics_memory_is_flat_in_samples(tiny_family_dir, adapters_for, calibration_file, tmp_path):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    small, small_tokens = _stats_elements(base, adapters, 3, calibration_file, tmp_path)
    large, large_tokens = _stats_elements(base, adapters, 30, calibration_file, tmp_path)
    assert large_tokens > 5 * small_tokens
    assert small == large


def test_tolerance_stops_early(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    cfg = _config(base, adapters_for("llama", 2), [calibration_file("jsonl", 4, s) for s in (0, 1)],
                  parameters={"iterations": 5, "tol": 1e6})
    result = iteris.merge(cfg)
    assert len(result.report["iterations"]) == 2 and result.report["converged"] is True


@pytest.mark.parametrize("family,kind", [("t5", "jsonl"), ("llama", "jsonl")])
def test_generated_targets(family, kind, tiny_family_dir, adapters_for, calibration_file):
    """Encoder-decoder without targets: the decoder reads each adapter's own greedy output.
    Causal LM with generate: the adapter's continuation is appended to the sample."""
    base = tiny_family_dir(family)
    data = [calibration_file(kind, 4, s) for s in (0, 1)]
    cfg = _config(base, adapters_for(family, 2), data, parameters={"iterations": 1})
    cfg["calibration"].update(max_new_tokens=5, generate=True)
    plain = dict(cfg, calibration=dict(cfg["calibration"], generate=False))
    report = iteris.merge(cfg).report
    with_gen = report["adapters"]
    assert 0 < report["timings"]["generate"] <= report["timings"]["load"]  # reported apart, inside the load
    if family == "llama":
        without = iteris.merge(plain).report
        assert "generate" not in without["timings"]
        without = without["adapters"]
        assert all(a["tokens"] > b["tokens"] for a, b in zip(with_gen, without))
    else:
        assert all(a["tokens"] > 0 for a in with_gen)
