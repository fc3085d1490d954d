"""TSV-M, Iso-C and Iso-CTS in the LoRA core space against their authors' dense float64 forms."""

import pytest
import torch

from iteris.adapters import LoraAdapter
from iteris.deltas import LoraModule
from iteris.methods import MergeContext, get_method
from tests.helpers import subspace_reference as ref


def _adapters(ranks, d_out=14, d_in=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        module = LoraModule(A=torch.randn(r, d_in, generator=gen), B=torch.randn(d_out, r, generator=gen),
                            scale=0.5 + i)
        out.append(LoraAdapter(name=f"t{i}", path=".", config={}, modules={"layer": module}))
    return out


def _merge(method, adapters, weights, params):
    spec = get_method(method)
    ctx = MergeContext(adapters=adapters, weights=weights, targets=["layer"], params=spec.parse_params(params))
    return spec.fn(ctx)["layer"]


@pytest.mark.parametrize("ranks, weights", [([2, 2, 2], [1.0, 1.0, 1.0]), ([3, 3], [1.0, 0.5]),
                                            ([2, 2, 2, 2], [1.0, 2.0, 1.0, 0.5]), ([2, 6], [1.0, 1.0]),
                                            ([4, 4, 4], [1.0, 1.0, 1.0])])
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_core_space_forms_equal_the_dense_ones(method, ranks, weights):
    adapters = _adapters(ranks)
    updates = [w * a.modules["layer"].delta(torch.float64) for a, w in zip(adapters, weights)]
    K = min(sum(ranks), 14, 11)
    expected = {
        "tsv_m": lambda: ref.tsv_m(updates, K, 1.3, ranks),
        "iso_c": lambda: ref.iso_c(updates, K, 1.3),
        "iso_cts": lambda: ref.iso_cts(updates, K, 1.3, 0.8),
    }[method]()
    delta = _merge(method, adapters, weights, {"scale": 1.3})
    got = delta.B.double() @ delta.A.double()
    assert delta.rank == K  # an exact LoRA: rank sum r_i, no d_out x d_in matrix
    assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-6  # (factors in float32)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    adapters = _adapters([2, 2])
    delta = _merge("iso_c", adapters, [1.0, 1.0], {"scale": 1.0})
    s = torch.linalg.svdvals(delta.B.double() @ delta.A.double())[:4]
    total = sum(a.modules["layer"].delta(torch.float64) for a in adapters)
    torch.testing.assert_close(s, torch.full_like(s, float(torch.linalg.svdvals(total)[:4].mean())),
                               rtol=1e-5, atol=0)


def test_tsv_m_of_orthogonal_tasks_is_their_sum():
    """Tasks in mutually orthogonal subspaces do not interfere: TSV-M then leaves their sum as it is."""
    gen = torch.Generator().manual_seed(3)
    Q_out, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    Q_in, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    adapters = []
    for i in range(2):
        B = (Q_out[:, 2 * i:2 * i + 2] * torch.tensor([3.0, 1.0], dtype=torch.float64)).float()
        A = Q_in[:, 2 * i:2 * i + 2].T.float()
        adapters.append(LoraAdapter(name=f"t{i}", path=".", config={}, modules={"layer": LoraModule(A=A, B=B, scale=1.0)}))
    delta = _merge("tsv_m", adapters, [1.0, 1.0], {})
    total = sum(a.modules["layer"].delta(torch.float64) for a in adapters)
    torch.testing.assert_close(delta.B.double() @ delta.A.double(), total, rtol=0, atol=1e-5)


def test_iso_cts_splits_any_core_size_without_a_negative_common_space():
    """K = 7 over 2 tasks at a small common fraction: the task-specific share must fit in K."""
    adapters = _adapters([3, 4])
    updates = [a.modules["layer"].delta(torch.float64) for a in adapters]
    for fraction in (0.0, 0.05, 0.1):
        delta = _merge("iso_cts", adapters, [1.0, 1.0], {"common_space_fraction": fraction})
        expected = ref.iso_cts(updates, 7, 1.0, fraction)  # one common direction, three of each task's
        got = delta.B.double() @ delta.A.double()
        assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-6, fraction
