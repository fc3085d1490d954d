"""WUDI from the LoRA factors against its authors' dense autograd loop (float64)."""

import torch

from iteris.adapters import LoraAdapter
from iteris.deltas import LoraModule
from iteris.methods import MergeContext, get_method
from tests.helpers.wudi_reference import wudi as reference


def test_factored_wudi_equals_the_dense_autograd_loop():
    gen = torch.Generator().manual_seed(0)
    adapters = [LoraAdapter(name=f"t{i}", path=".", config={}, modules={"l": LoraModule(
        A=torch.randn(r, 9, generator=gen, dtype=torch.float64), B=torch.randn(12, r, generator=gen, dtype=torch.float64),
        scale=0.5 + i)}) for i, r in enumerate([2, 3, 2])]
    weights = [1.0, 0.5, 2.0]
    spec = get_method("wudi")
    params = spec.parse_params({"iterations": 50, "lr": 1e-2})  # a large step, so the loop moves far
    with torch.no_grad():  # as merges run
        got = spec.fn(MergeContext(adapters=adapters, weights=weights, targets=["l"], params=params))["l"].D
    updates = [w * a.modules["l"].delta(torch.float64) for a, w in zip(adapters, weights)]
    expected = reference(updates, 50, 1e-2)
    start = sum(updates)
    assert float(torch.linalg.norm(expected - start) / torch.linalg.norm(start)) > 0.05  # it did move
    assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-10
    assert torch.linalg.matrix_rank(got) > 7  # Adam's elementwise steps leave the rank-7 span: a dense result
