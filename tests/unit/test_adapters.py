"""Reading PEFT LoRA directories (iteris.adapters) and the delta algebra (iteris.deltas).

Adapter deltas are checked against PEFT itself: ``PeftModel.from_pretrained`` on a float64 base and
``layer.get_delta_weight`` (transposed for GPT-2's Conv1D, which PEFT keeps as d_in x d_out).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

import iteris
from iteris.adapters import check_compatible, load_adapter
from iteris.deltas import DenseDelta, LowRankDelta, relative_change, svd_factors
from tests.helpers import fixtures as fx

F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")


def peft_deltas(base_dir, family, adapter_dir) -> dict[str, torch.Tensor]:
    """{layer name: dW (d_out x d_in, float64)} as PEFT computes it."""
    base = fx.auto_class(family).from_pretrained(str(base_dir), dtype=F64).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="a")
    out = {}
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if hasattr(layer, "lora_A") and hasattr(layer, "get_delta_weight") and "a" in layer.lora_A:
                d = layer.get_delta_weight("a").to(F64)
                out[name] = d.T if isinstance(layer.base_layer, Conv1D) else d
    return out


def rel(a, b):
    return float(torch.linalg.norm(a.to(F64) - b.to(F64)) / torch.linalg.norm(b.to(F64)))


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


# --------------------------------------------------------------------------------------------
# Scales and deltas against PEFT

LLAMA_PATTERNS = {
    "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
    "alpha_pattern": {"v_proj": 3, "layers.0.self_attn.o_proj": 16},
}
GPT2_PATTERNS = {"rank_pattern": {"c_attn": 2}, "alpha_pattern": {"h.1.mlp.c_proj": 3}}

# family, seed, LoraConfig kwargs, {layer: (rank, scale)} spot checks (r=4, lora_alpha=8 by default)
SCALE_CASES = [
    ("llama", 40, {}, {"model.layers.0.self_attn.q_proj": (4, 2.0)}),
    ("llama", 41, {"use_rslora": True}, {"model.layers.1.mlp.up_proj": (4, 8 / math.sqrt(4))}),
    (
        "llama", 42, LLAMA_PATTERNS,
        {
            "model.layers.0.self_attn.q_proj": (2, 4.0),
            "model.layers.1.mlp.down_proj": (6, 8 / 6),
            "model.layers.0.mlp.down_proj": (4, 2.0),
            "model.layers.1.self_attn.v_proj": (4, 3 / 4),
            "model.layers.0.self_attn.o_proj": (4, 4.0),
            "model.layers.1.self_attn.o_proj": (4, 2.0),
        },
    ),
    (
        "llama", 43, {"use_rslora": True, **LLAMA_PATTERNS},
        {
            "model.layers.1.self_attn.q_proj": (2, 8 / math.sqrt(2)),
            "model.layers.1.mlp.down_proj": (6, 8 / math.sqrt(6)),
            "model.layers.0.self_attn.v_proj": (4, 3 / 2),
        },
    ),
    ("gpt2", 44, {}, {"transformer.h.0.attn.c_attn": (4, 2.0)}),
    (
        "gpt2", 45, {"use_rslora": True, **GPT2_PATTERNS},
        {
            "transformer.h.0.attn.c_attn": (2, 8 / math.sqrt(2)),
            "transformer.h.1.mlp.c_proj": (4, 3 / 2),
            "transformer.h.1.attn.c_proj": (4, 4.0),
            "transformer.h.0.mlp.c_fc": (4, 4.0),
        },
    ),
]


@pytest.mark.parametrize("family,seed,kwargs,spots", SCALE_CASES, ids=lambda v: None)
def test_adapter_delta_equals_peft(tiny_family_dir, adapters_for, family, seed, kwargs, spots):
    (path,) = adapters_for(family, 1, seed0=seed, **kwargs)
    adapter = load_adapter("x", path)
    expected = peft_deltas(tiny_family_dir(family), family, path)
    assert sorted(adapter.modules) == sorted(expected)
    for name, dW in expected.items():
        mod = adapter.modules[name]
        assert mod.delta().shape == dW.shape, name  # (d_out, d_in), also for GPT-2's Conv1D
        assert rel(mod.delta(), dW) < 1e-12, name
    for name, (rank, scale) in spots.items():
        assert adapter.modules[name].rank == rank, name
        assert adapter.modules[name].scale == pytest.approx(scale, rel=1e-12), name
    if family == "gpt2":
        assert adapter.config["fan_in_fan_out"] is True
        c_attn = adapter.modules["transformer.h.1.attn.c_attn"]
        assert (c_attn.out_features, c_attn.in_features) == (96, 32)


def test_bin_adapter_loads_like_safetensors(adapters_for, tmp_path):
    (src,) = adapters_for("gpt2", 1, seed0=45, use_rslora=True, **GPT2_PATTERNS)
    d = copy_adapter(src, tmp_path / "bin")
    torch.save(load_file(str(d / "adapter_model.safetensors")), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    a, b = load_adapter("st", src), load_adapter("bin", d)
    assert sorted(a.modules) == sorted(b.modules)
    for name, m in a.modules.items():
        assert torch.equal(m.A, b.modules[name].A) and torch.equal(m.B, b.modules[name].B), name
        assert m.scale == b.modules[name].scale
    assert a.config == b.config


def test_missing_weights_is_an_iteris_error(adapters_for, tmp_path):
    (src,) = adapters_for("llama", 1)
    d = copy_adapter(src, tmp_path / "empty")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(iteris.IterisError, match="adapter_model"):
        load_adapter("x", d)


def test_rank_disagreeing_with_config_is_refused(adapters_for, tmp_path):
    (src,) = adapters_for("llama", 1)
    d = copy_adapter(src, tmp_path / "r")
    edit_config(d, r=8)
    with pytest.raises(iteris.IterisError, match="rank 4"):
        load_adapter("x", d)


# --------------------------------------------------------------------------------------------
# check_compatible


def _widen(src, dst, width=48):
    """The adapter as if trained on a base of hidden size ``width`` (every 32-wide side becomes 48)."""
    d = copy_adapter(src, dst)
    tensors = load_file(str(d / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for key, t in list(tensors.items()):
        shape = [width if s == 32 else s for s in t.shape]
        tensors[key] = torch.randn(shape, generator=g)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    edit_config(d, base_model_name_or_path="some/other-base")
    return d


def test_check_compatible_accepts_same_base_and_partial_targets(adapters_for):
    paths = adapters_for("llama", 2) + adapters_for(
        "llama", 1, seed0=7, target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4
    )
    check_compatible([load_adapter(f"a{i}", p) for i, p in enumerate(paths)])  # no error


def test_check_compatible_refuses_other_base_shapes(tiny_family_dir, adapters_for, tmp_path):
    a, b = adapters_for("llama", 2)
    wide = _widen(b, tmp_path / "wide")
    adapters = [load_adapter("a", a), load_adapter("wide", wide)]
    assert adapters[1].modules["model.layers.0.self_attn.q_proj"].in_features == 48
    with pytest.raises(iteris.IterisError, match=r"different base models") as info:
        check_compatible(adapters)
    message = str(info.value)
    found = re.search(r"module '([^']+)' is (\d+)x(\d+) in adapter 'a' but (\d+)x(\d+) in adapter 'wide'", message)
    assert found, message
    name, *dims = found.groups()
    for adapter, (out_f, in_f) in zip(adapters, (dims[:2], dims[2:])):
        mod = adapter.modules[name]
        assert (mod.out_features, mod.in_features) == (int(out_f), int(in_f))
    assert "some/other-base" in message
    # and merge() refuses before any work
    cfg = {
        "base_model": str(tiny_family_dir("llama")), "method": "task_arithmetic", "progress": False,
        "adapters": [{"name": "a", "path": str(a)}, {"name": "wide", "path": str(wide)}],
    }
    with pytest.raises(iteris.IterisError, match="different base models"):
        iteris.merge(cfg)


def test_check_compatible_refuses_different_task_types(adapters_for, tmp_path):
    a, b = adapters_for("llama", 2)
    other = copy_adapter(b, tmp_path / "cls")
    edit_config(other, task_type="SEQ_CLS")
    with pytest.raises(iteris.IterisError, match="task_type"):
        check_compatible([load_adapter("a", a), load_adapter("b", other)])


def test_check_compatible_refuses_fan_in_fan_out_mismatch_and_duplicate_names(adapters_for, tmp_path):
    a, b = adapters_for("llama", 2)
    flipped = copy_adapter(b, tmp_path / "fifo")
    edit_config(flipped, fan_in_fan_out=True)
    with pytest.raises(iteris.IterisError, match="fan_in_fan_out"):
        check_compatible([load_adapter("a", a), load_adapter("b", flipped)])
    with pytest.raises(iteris.IterisError, match="unique"):
        check_compatible([load_adapter("a", a), load_adapter("a", b)])


# --------------------------------------------------------------------------------------------
# Kinds that cannot be merged


def test_dora_is_refused(adapters_for, tmp_path):
    (src,) = adapters_for("llama", 1, seed0=20, use_dora=True)
    with pytest.raises(iteris.IterisError, match="DoRA"):
        load_adapter("dora", src)
    # even when the config flag is gone, the magnitude vectors give it away
    d = copy_adapter(src, tmp_path / "dora")
    edit_config(d, use_dora=False)
    with pytest.raises(iteris.IterisError) as info:
        load_adapter("dora", d)
    assert "DoRA" in re.sub(r"'[^']*'", "", str(info.value))


def test_embedding_lora_is_refused(adapters_for):
    (src,) = adapters_for("llama", 1, seed0=21, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(iteris.IterisError) as info:
        load_adapter("emb", src)
    # the explanation itself, not just a quoted tensor name ('...lora_embedding_A'), must say why
    assert "embedding" in re.sub(r"'[^']*'", "", str(info.value))


# --------------------------------------------------------------------------------------------
# iteris.deltas


def _best(D, k):
    U, S, Vh = torch.linalg.svd(D.to(F64), full_matrices=False)
    k = min(k, len(S))
    err = float((S[k:].pow(2).sum() / S.pow(2).sum()).sqrt())
    return (U[:, :k] * S[:k]) @ Vh[:k], err, S


def _lowrank(d_out, d_in, r, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(B=torch.randn(d_out, r, generator=g, dtype=dtype), A=torch.randn(r, d_in, generator=g, dtype=dtype))


@pytest.mark.parametrize("shape,r,k,dtype", [((40, 30), 6, 3, F64), ((20, 50), 8, 1, F64), ((24, 24), 5, 4, torch.float32)])
def test_lowrank_to_lora_is_best_rank_k(shape, r, k, dtype):
    delta = _lowrank(*shape, r, dtype=dtype)
    out, err = delta.to_lora(k)
    expected, true_err, S = _best(delta.dense(), k)
    assert out.rank == k and out.shape == shape
    assert rel(out.dense(), expected) < 1e-10
    assert err == pytest.approx(true_err, rel=1e-10)
    assert rel(out.dense(), delta.dense()) == pytest.approx(err, rel=1e-8)
    # singular values shared evenly between the factors: B^T B = A A^T = diag(S_k)
    assert torch.allclose(out.B.T @ out.B, torch.diag(S[:k]), atol=1e-9 * float(S[0]))
    assert torch.allclose(out.A @ out.A.T, torch.diag(S[:k]), atol=1e-9 * float(S[0]))


def test_lowrank_to_lora_at_or_above_rank_is_unchanged():
    delta = _lowrank(30, 20, 5)
    for k in (None, 5, 9):
        out, err = delta.to_lora(k)
        assert err == 0.0
        assert torch.equal(out.dense(), delta.dense())


def test_lowrank_to_lora_between_small_side_and_rank():
    """Regression: min(d_out, d_in) < k < rank on a non-square layer once raised a size mismatch."""
    delta = _lowrank(16, 32, 24)  # true rank 16
    out, err = delta.to_lora(20)
    assert rel(out.dense(), delta.dense()) < 1e-10
    assert err == pytest.approx(0.0, abs=1e-10)


def test_dense_to_lora():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(20, 30, generator=g, dtype=torch.float32)
    exact, err = DenseDelta(D).to_lora(None)
    assert err == 0.0 and exact.rank == 20
    assert rel(exact.dense(), D) < 1e-12
    for k in (4, 100):
        out, err = DenseDelta(D).to_lora(k)
        expected, true_err, _ = _best(D, k)
        assert out.rank == min(k, 20)
        assert rel(out.dense(), expected) < 1e-10 if k < 20 else rel(out.dense(), D) < 1e-12
        assert err == pytest.approx(true_err, rel=1e-10, abs=1e-15)
    zero, err = DenseDelta(torch.zeros(5, 6)).to_lora(2)
    assert err == 0.0 and float(zero.dense().abs().max()) == 0.0


def test_svd_factors_match_dense_svd():
    delta = _lowrank(18, 26, 7, seed=3)
    expected, _, S = _best(delta.dense(), 4)
    for d in (delta, DenseDelta(delta.dense())):
        U, Sk, Vh = svd_factors(d, 4)
        assert torch.allclose(Sk, S[:4], rtol=1e-10)
        assert rel((U * Sk) @ Vh, expected) < 1e-10
        assert torch.allclose(U.T @ U, torch.eye(4, dtype=F64), atol=1e-10)


def test_norm_sq_and_relative_change_match_dense():
    old = _lowrank(12, 9, 3, seed=4)
    same_b = LowRankDelta(B=old.B.clone(), A=old.A + 0.1 * _lowrank(12, 9, 3, seed=5).A)
    other = _lowrank(12, 9, 4, seed=6)
    dense_other = DenseDelta(other.dense() + 0.01)
    for d in (old, other, dense_other):
        assert d.norm_sq() == pytest.approx(float(d.dense().pow(2).sum()), rel=1e-12)
    for new in (same_b, other, dense_other):
        for ref in (old, dense_other):
            diff, base = relative_change(new, ref)
            assert diff == pytest.approx(float((new.dense() - ref.dense()).pow(2).sum()), rel=1e-10)
            assert base == pytest.approx(float(ref.dense().pow(2).sum()), rel=1e-12)
    diff, _ = relative_change(old, LowRankDelta(B=old.B.clone(), A=old.A.clone()))
    assert diff == 0.0
