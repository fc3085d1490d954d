"""KnOTS-TIES in the LoRA core space against its authors' dense float64 form."""

import pytest
import torch

from iteris.adapters import LoraAdapter
from iteris.deltas import LoraModule
from iteris.methods import MergeContext, get_method
from tests.helpers.knots_reference import knots_ties as reference


def _adapters(ranks, layers=("l0", "l1"), d_out=13, d_in=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [LoraAdapter(name=f"t{i}", path=".", config={}, modules={
        name: LoraModule(A=torch.randn(r, d_in, generator=gen), B=torch.randn(d_out, r, generator=gen), scale=1.0 + i)
        for name in layers}) for i, r in enumerate(ranks)]


@pytest.mark.parametrize("top_k", [100.0, 40.0])
@pytest.mark.parametrize("ranks, weights", [([2, 2, 2], [1.0, 1.0, 1.0]), ([3, 1], [0.5, 1.5])])
def test_core_space_knots_ties_equals_the_dense_one(ranks, weights, top_k):
    adapters = _adapters(ranks)
    spec = get_method("knots_ties")
    params = spec.parse_params({"scale": 0.5, "top_k": top_k})
    ctx = MergeContext(adapters=adapters, weights=weights, targets=["l0", "l1"], params=params)
    got = spec.fn(ctx)
    updates = {name: [w * a.modules[name].delta(torch.float64) for a, w in zip(adapters, weights)]
               for name in ("l0", "l1")}
    expected = reference(updates, 0.5, top_k)
    for name in ("l0", "l1"):
        dense = got[name].B.double() @ got[name].A.double()
        assert got[name].rank <= sum(ranks)  # an exact LoRA in the shared basis
        assert float(torch.linalg.norm(dense - expected[name]) / torch.linalg.norm(expected[name])) < 1e-5, name


def test_one_adapter_comes_back_scaled():
    """Nothing to elect or average with one task: KnOTS-TIES returns it, times its scale."""
    adapters = _adapters([3])
    spec = get_method("knots_ties")
    ctx = MergeContext(adapters=adapters, weights=[1.0], targets=["l0"], params=spec.parse_params({"scale": 0.5}))
    got = spec.fn(ctx)["l0"]
    torch.testing.assert_close(got.B.double() @ got.A.double(), 0.5 * adapters[0].modules["l0"].delta(torch.float64),
                               rtol=1e-5, atol=1e-6)
