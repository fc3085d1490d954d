"""Block-by-block walk against whole-model passes, and the sequential schedule against the global fixed point."""

import pytest
import torch

import iteris
from iteris.engine import blocks, forward, layers as engine_layers
from tests.helpers.merging import float64_config as _config, rel as _rel


def _merge(base, adapters, data, walk, **parameters):
    # per_adapter: each task's model runs with its own head (PEFT modules_to_save), also block by block
    cfg = _config(base, adapters, data, parameters=parameters, modules_to_save="per_adapter")
    cfg["calibration"]["walk"] = walk
    return iteris.merge(cfg)


def _dense(result):
    return {n: d.dense() for n, d in result.deltas.items()}


def _max_rel(a, b):
    return max(_rel(a[n], b[n]) for n in b)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("params", [
    {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4},
    {"iterations": 1, "gamma": 0.4, "alpha1": 1e-3, "alpha2": 1e-3, "with_pretrain_matrix": True},
    # gamma = 0 and alpha1 = 0: later rounds reuse the adapters' remembered projected inputs
    {"iterations": 2, "alpha1": 0.0, "alpha2": 1e-3},
])
def test_block_walk_equals_whole_model_passes(family, params, tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir(family)
    # bert's default targets include the pooler, outside the stack (that model then runs whole)
    targets = {"bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense"]}.get(family)
    adapters = adapters_for(family, 2, target_modules=targets) if targets else adapters_for(family, 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    blocks = _merge(base, adapters, data, "blocks", **params)
    whole = _merge(base, adapters, data, "model", **params)
    assert blocks.report["calibration"]["walk"] == "blocks" and whole.report["calibration"]["walk"] == "model"
    assert _max_rel(_dense(blocks), _dense(whole)) < 1e-10
    # and the answer is not trivially the same for any parameters: iterations move it
    once = _merge(base, adapters, data, "blocks", **{**params, "iterations": 0})
    assert _max_rel(_dense(once), _dense(whole)) > 1e-4


def test_regmean_block_walk_equals_whole_model(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    runs = {}
    for walk in ("blocks", "model"):
        cfg = _config(base, adapters, data, method="regmean")
        cfg["calibration"]["walk"] = walk
        runs[walk] = _dense(iteris.merge(cfg))
    assert _max_rel(runs["blocks"], runs["model"]) < 1e-10


def test_encoder_decoder_falls_back_to_whole_passes(tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("t5")
    data = [calibration_file("jsonl_t5", 4, s) for s in (0, 1)]
    result = _merge(base, adapters_for("t5", 2), data, "auto", iterations=1)
    assert result.report["calibration"]["walk"] == "model"
    with pytest.raises(iteris.IterisError, match="plain chain of blocks"):
        _merge(base, adapters_for("t5", 2), data, "blocks", iterations=1)
    with pytest.raises(iteris.IterisError, match="schedule: global"):
        _merge(base, adapters_for("t5", 2), data, "auto", schedule="sequential")


def test_stack_found_for_decoders_only_where_it_is_a_plain_chain(load_tiny):
    for family, expected in (("llama", "model.layers"), ("gpt2", "transformer.h"), ("t5", None)):
        model, tok = load_tiny(family)
        names = [n for n, m in model.named_modules() if engine_layers.is_mergeable_layer(m) and ("attn" in n or "Attention" in n or "SelfAttention" in n)]
        layers = engine_layers.resolve_layers(model, names)
        ids = tok(["the river runs under the old bridge"], return_tensors="pt")
        probe = forward.make_batch([forward.TokenSample(input_ids=ids["input_ids"][0].tolist(),
                                                      decoder_ids=[0, 5, 6] if family == "t5" else None)], 0, "cpu")
        stack = blocks.find_stack(model, layers, probe)
        if expected is None:
            assert stack is None
        else:
            assert stack is not None and stack.blocks[0] is model.get_submodule(expected)[0]
            assert set(stack.block_of.values()) == set(range(len(stack.blocks)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequential_schedule_reaches_the_global_fixed_point(family, tiny_family_dir, adapters_for, calibration_file):
    """On a feed-forward stack the fixed point of the global rounds is exactly what one sequential sweep
    computes: each layer's merged inputs come only from the layers before it."""
    base = tiny_family_dir(family)
    adapters = adapters_for(family, 2, r=2, lora_alpha=1)  # small deltas: the global rounds converge fast
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    params = {"alpha1": 1e-3, "alpha2": 1e-3}
    sequential = _dense(_merge(base, adapters, data, "auto", schedule="sequential", **params))
    converged = _merge(base, adapters, data, "auto", iterations=40, tol=1e-13, **params)
    assert converged.report["converged"]
    few = _dense(_merge(base, adapters, data, "auto", iterations=1, **params))
    assert _max_rel(sequential, _dense(converged)) < 1e-9
    assert _max_rel(few, _dense(converged)) > 1e3 * _max_rel(sequential, _dense(converged))


@pytest.mark.parametrize("params", [
    {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4},
    {"iterations": 1, "gamma": 0.4, "alpha1": 1e-3, "alpha2": 1e-3, "with_pretrain_matrix": True},
])
def test_overlapped_solves_give_the_same_merge(params, tiny_family_dir, adapters_for, calibration_file):
    """Each block solved on a worker thread while the next is captured: the same deltas, the same report."""
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    runs = {}
    for overlap in ("on", "off"):
        cfg = _config(base, adapters, data, parameters=params)
        cfg["calibration"]["overlap"] = overlap
        runs[overlap] = iteris.merge(cfg)
    assert _max_rel(_dense(runs["on"]), _dense(runs["off"])) < 1e-12
    assert runs["on"].report["iterations"][-1]["relative_change"] == pytest.approx(
        runs["off"].report["iterations"][-1]["relative_change"], rel=1e-9)


def test_a_failing_overlapped_solve_surfaces_its_error():
    from iteris.engine.overlap import OverlappedSolves

    def failing():
        raise RuntimeError("solve broke")

    overlapped = OverlappedSolves("cpu")
    try:
        assert overlapped.submit(failing, []) == {}
        with pytest.raises(RuntimeError, match="solve broke"):
            overlapped.finish()
    finally:
        overlapped.close()


@pytest.mark.parametrize("params, samples", [
    ({"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4}, 2),
    # 4 samples: more tokens than features everywhere; forced, the sample space still gives the same answer
    ({"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4}, 4),
    ({"iterations": 2, "alpha1": 0.0, "alpha2": 1e-3}, 2),  # later rounds recall the remembered projections
    ({"iterations": 1, "gamma": 0.3, "alpha1": 1e-3, "alpha2": 1e-2, "adaptive_weights": False}, 2),
])
def test_sample_space_solve_equals_the_gram_solve(params, samples, tiny_family_dir, adapters_for, calibration_file):
    """Fewer tokens than features: the n x n solve on the kept rows gives the d_in x d_in solve's answer."""
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    runs = {}
    for space in ("samples", "features", "auto"):
        cfg = _config(base, adapters, data, parameters={**params, "solve_space": space})
        cfg["calibration"]["samples"] = samples  # ~25 tokens per sample, against d_in = 32 and 64 (down_proj)
        runs[space] = iteris.merge(cfg)
    assert len(runs["samples"].report["sample_space_groups"]) == 8  # every layer group
    assert "sample_space_groups" not in runs["features"].report
    # auto: only where all tasks' tokens together are fewer than d_in (2 samples: down_proj)
    chosen = runs["auto"].report.get("sample_space_groups", [])
    assert all(g.endswith("down_proj") for g in chosen) and len(chosen) == (2 if samples == 2 else 0)
    assert _max_rel(_dense(runs["samples"]), _dense(runs["features"])) < 1e-9
    assert _max_rel(_dense(runs["auto"]), _dense(runs["features"])) < 1e-9


@pytest.mark.parametrize("method, params", [
    ("iteris", {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4}),
    ("iteris", {"iterations": 1, "alpha1": 1e-3, "alpha2": 1e-3, "with_pretrain_matrix": True}),
    ("regmean", {}),
])
def test_offloaded_statistics_give_the_same_merge(method, params, tiny_family_dir, adapters_for, calibration_file):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    runs = {}
    for offload in (True, False):
        cfg = _config(base, adapters, data, method=method, parameters=params)
        cfg["calibration"]["offload_stats"] = offload
        runs[offload] = _dense(iteris.merge(cfg))
    assert _max_rel(runs[True], runs[False]) < 1e-12


def test_merge_loaded_builds_no_autograd_graph_for_trainable_models():
    """A model fresh from from_pretrained has trainable parameters; the captures must not record a graph
    (it would keep every batch's activations alive until the statistics are freed)."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from iteris.adapters import LoraAdapter, LoraModule
    from iteris.merge import merge_loaded

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    assert all(p.requires_grad for p in model.parameters())
    adapters = []
    for i in range(2):
        modules = {name: LoraModule(A=torch.randn(4, m.in_features), B=torch.randn(m.out_features, 4) * 0.1, scale=1.0)
                   for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
        adapters.append(LoraAdapter(name=f"t{i}", path=Path("."), config={"r": 4, "lora_alpha": 4}, modules=modules))
    samples = [[forward.TokenSample(input_ids=list(range(i, i + 12))) for _ in range(3)] for i in range(2)]
    params = {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4}
    deltas, report = merge_loaded(model, adapters, samples, parameters=params)
    assert report["calibration"]["walk"] == "blocks"
    assert not any(d.A.requires_grad or d.B.requires_grad for d in deltas.values())
    model.requires_grad_(False)
    frozen, _ = merge_loaded(model, adapters, samples, parameters=params)
    assert all(torch.equal(deltas[n].dense(), frozen[n].dense()) for n in deltas)
