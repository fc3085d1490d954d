"""Split bf16 products (precision.py) against float64, and the LoRA update they feed (DeltaInjector)."""

import torch
from torch import nn

from iteris import precision
from iteris.engine import capture, inject
from iteris.adapters import LoraModule
from iteris.engine.inject import DeltaInjector


def _wide_float32(*shape, seed=0):
    """float32 values over many binades, where a single bf16 keeps only 8 significant bits."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-20, 20, shape, generator=gen).float())


def test_three_bf16_parts_hold_a_float32_exactly_and_two_hold_16_bits():
    t = _wide_float32(64, 48)
    three = sum(p.double() for p in precision.bf16_parts(t, 3))
    assert torch.equal(three, t.double())
    two = sum(p.double() for p in precision.bf16_parts(t, 2))
    assert ((two - t.double()).abs() / t.double().abs()).max() < 2.0**-16
    one = precision.bf16_parts(t, 1)[0].double()
    assert ((one - t.double()).abs() / t.double().abs()).max() > 2.0**-12  # one part alone is not enough


def test_split_products_equal_the_float64_product_to_float32_accuracy():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 96, generator=gen).bfloat16()
    w = torch.randn(24, 96, generator=gen)
    p = torch.randn(300, 24, generator=gen)
    want = x.double() @ w.double().T
    got = precision.split_mm(x, precision.split_rows(w), parts=3)
    assert got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 1e-6
    single = x.float() @ precision.bf16_parts(w, 1)[0].float().T  # what a plain bf16 copy of w would give
    assert (single.double() - want).norm() / want.norm() > 1e-4
    want_t = p.double().T @ x.double()
    got_t = precision.split_tmm(p, x)
    assert (got_t.double() - want_t).norm() / want_t.norm() < 1e-6


def _split_where(monkeypatch, callers=None):
    """Split products for bf16 tensors (as on a GPU; the CPU runs them through float32 copies), in the
    injector and the collector, or only where called from ``callers``."""
    import inspect

    def splits(*tensors):
        if callers is not None and inspect.stack()[1].function not in callers:
            return False
        return all(t.dtype == torch.bfloat16 for t in tensors)

    monkeypatch.setattr(capture, "splits_bf16", splits)
    monkeypatch.setattr(inject, "splits_bf16", splits)


def test_split_lora_update_rounds_once_like_a_float32_branch(monkeypatch):
    """The bf16 layer's output plus s B A x, computed in float64 and rounded to bf16 once: what PEFT's float32
    branch gives. Float32 rounding may flip the last bf16 bit where the exact sum is a near tie: the split
    update must flip no more often than the plain float32 one."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 300, bias=True).to(torch.bfloat16)
    lora = LoraModule(A=torch.randn(8, 256) * 0.2, B=torch.randn(300, 8) * 0.2, scale=1.7)
    x = torch.randn(4, 100, 256).bfloat16()
    agree = {}
    with torch.no_grad():
        base = layer(x)
        want = (base.double() + lora.scale * (x.double() @ lora.A.double().T) @ lora.B.double().T).to(torch.bfloat16)
        for split in (False, True):
            if split:
                _split_where(monkeypatch)
            injector = DeltaInjector(layer, {"layer": layer})
            injector.set_variant("own", {"layer": lora})
            assert injector.variants["own"]["layer"][0] == ("split" if split else "lowrank")
            with injector.use("own"):
                got = layer(x)
            injector.remove()
            ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-3)
            assert ((got.float() - want.float()).abs() <= ulp).all()
            agree[split] = (got == want).float().mean().item()
    assert agree[True] > 0.999 and agree[True] >= agree[False] - 2e-4
    twice_rounded = base + (want.double() - base.double()).to(torch.bfloat16)
    assert (twice_rounded == want).float().mean() < agree[True]


def test_split_statistics_are_as_close_to_float64_as_float32_casts(monkeypatch, tiny_family_dir, adapters_for,
                                                                    calibration_file):
    """A bf16 model's merge with float32 statistics: the projected cross terms through split products land
    as close to the float64-statistics answer as through float32 copies (same injector in all three)."""
    import iteris
    from tests.helpers.merging import float64_config as _config, rel as _rel

    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    cfg = _config(base, adapters, data, parameters={"iterations": 1, "alpha1": 1e-2, "alpha2": 1e-2}, dtype="bfloat16")
    reference = iteris.merge(cfg).deltas  # float64 statistics
    cfg["calibration"]["stats_dtype"] = "float32"
    plain = iteris.merge(cfg).deltas
    _split_where(monkeypatch, callers={"start", "_accumulate", "_project"})
    split = iteris.merge(cfg).deltas

    def distance(run):
        return max(_rel(run[n].dense(), reference[n].dense()) for n in reference)

    assert distance(split) < 1.5 * distance(plain) + 1e-6
    assert max(_rel(split[n].dense(), plain[n].dense()) for n in plain) > 0  # the split path did run
