"""solve.py against dense float64 formulas written out directly (DESIGN.md §2), on random matrices."""

import pytest
import torch

from iteris.adapters import LoraModule
from iteris.errors import IterisError
from iteris.solve import TaskLayerStats, adaptive_weight, iteris_solve, regmean_solve, solve_right, solve_right_many, weight_norm_sq

F64 = torch.float64


def _problem(seed, n_tasks=3, d_in=12, d_out=9, tokens=40, ranks=(2, 3, 1), missing=()):
    g = torch.Generator().manual_seed(seed)
    loras, X, Xt = [], [], []
    for i in range(n_tasks):
        r = ranks[i]
        loras.append(
            None if i in missing else LoraModule(A=torch.randn(r, d_in, generator=g, dtype=F64),
                                                 B=torch.randn(d_out, r, generator=g, dtype=F64), scale=0.5 + i)
        )
        x = torch.randn(tokens + 5 * i, d_in, generator=g, dtype=F64) * (1 + i)
        X.append(x)
        Xt.append(x + 0.3 * torch.randn(x.shape, generator=g, dtype=F64))
    W0 = torch.randn(d_out, d_in, generator=g, dtype=F64)
    return loras, X, Xt, W0


def _dense_reference(loras, X, Xt, W0, c, gamma, a1, a2, with_pretrain):
    d_out, d_in = W0.shape
    eye = torch.eye(d_in, dtype=F64)
    P = torch.zeros(d_out, d_in, dtype=F64)
    Q = torch.zeros(d_in, d_in, dtype=F64)
    for lora, x, xt, ci in zip(loras, X, Xt, c):
        xh = (1 - gamma) * xt + gamma * x
        C, G = x.T @ xh, xh.T @ xh
        dW = lora.scale * lora.B @ lora.A if lora is not None else torch.zeros_like(W0)
        target = W0 + dW if with_pretrain else dW
        P += ci * target @ (C + a1 * torch.linalg.norm(C) * eye)
        Q += ci * (G + a2 * torch.linalg.norm(G) * eye)
    sol = P @ torch.linalg.inv(Q)
    return sol - W0 if with_pretrain else sol


def _stats(loras, X, Xt, c, gamma):
    out = []
    for lora, x, xt, ci in zip(loras, X, Xt, c):
        xh = (1 - gamma) * xt + gamma * x
        C = x.T @ xh
        out.append(TaskLayerStats(gram=xh.T @ xh, cross_proj=None if lora is None else lora.A @ C,
                                  cross_norm=float(torch.linalg.norm(C)), weight=ci))
    return out


@pytest.mark.parametrize("gamma,a1,a2", [(0.0, 0.0, 0.0), (0.25, 1e-3, 1e-2), (1.0, 0.1, 0.0)])
@pytest.mark.parametrize("missing", [(), (1,)])
def test_factored_solve_equals_dense_formula(gamma, a1, a2, missing):
    loras, X, Xt, W0 = _problem(0, missing=missing)
    c = [0.7, 1.3, 2.0]
    delta, how = iteris_solve(_stats(loras, X, Xt, c, gamma), loras, a1, a2)
    expected = _dense_reference(loras, X, Xt, W0, c, gamma, a1, a2, with_pretrain=False)
    assert how == "cholesky"
    assert delta.rank == sum(l.rank for l in loras if l is not None)  # exactly rank sum r_i, no SVD
    assert torch.allclose(delta.dense(), expected, rtol=1e-10, atol=1e-10)


def test_with_pretrain_matrix_equals_dense_formula():
    loras, X, Xt, W0 = _problem(1)
    c = [1.0, 0.5, 2.0]
    a1 = 1e-3
    stats = _stats(loras, X, Xt, c, 0.2)
    eye = torch.eye(W0.shape[1], dtype=F64)
    base_rhs = sum(
        ci * W0 @ ((x.T @ xh) + a1 * torch.linalg.norm(x.T @ xh) * eye)
        for x, xh, ci in zip(X, [(0.8 * xt + 0.2 * x) for x, xt in zip(X, Xt)], c)
    )
    delta, _ = iteris_solve(stats, loras, a1, 1e-3, base_weight=W0, base_rhs=base_rhs)
    expected = _dense_reference(loras, X, Xt, W0, c, 0.2, a1, 1e-3, with_pretrain=True)
    assert torch.allclose(delta.dense(), expected, rtol=1e-9, atol=1e-9)


def test_identical_adapters_merge_to_themselves():
    loras, X, _, _ = _problem(2)
    same = [loras[0]] * 3
    stats = _stats(same, X, X, [1.0, 2.0, 0.5], 0.0)
    delta, _ = iteris_solve(stats, same, 0.0, 0.0)
    assert torch.allclose(delta.dense(), same[0].delta(), rtol=1e-9, atol=1e-9)


def test_weight_norm_of_base_plus_lora_without_the_dense_sum():
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(7, 5, generator=g, dtype=F64)
    lora = LoraModule(A=torch.randn(2, 5, generator=g, dtype=F64), B=torch.randn(7, 2, generator=g, dtype=F64), scale=1.5)
    assert weight_norm_sq(W0, lora) == pytest.approx(float((W0 + lora.delta()).pow(2).sum()), rel=1e-12)
    assert weight_norm_sq(W0, None) == pytest.approx(float(W0.pow(2).sum()), rel=1e-12)


def test_adaptive_weight_formula():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(7, 5, generator=g, dtype=F64)
    X = torch.randn(30, 5, generator=g, dtype=F64)
    expected = (W.pow(2).sum() / (X @ W.T).pow(2).sum()).item()
    out_sq = float((X @ W.T).pow(2).sum())
    assert adaptive_weight(float(W.pow(2).sum()), out_sq) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(IterisError, match="all-zero inputs"):
        adaptive_weight(1.0, 0.0)


def test_regmean_formula():
    loras, X, _, _ = _problem(4)
    grams = [x.T @ x for x in X]
    red = 0.9
    reduced = [red * G + (1 - red) * torch.diag(torch.diag(G)) for G in grams]
    expected = sum(l.delta() @ G for l, G in zip(loras, reduced)) @ torch.linalg.inv(sum(reduced))
    delta, _ = regmean_solve(grams, loras, red)
    assert torch.allclose(delta.dense(), expected, rtol=1e-10, atol=1e-10)


def test_singular_system_falls_back_to_pseudo_inverse():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, generator=g, dtype=F64)  # 3 tokens, 8 features: Gram of rank 3
    Q = x.T @ x
    R = torch.randn(2, 8, generator=g, dtype=F64) @ Q  # consistent right-hand side
    sol, how = solve_right(Q, R)
    assert how == "pinv"
    assert torch.allclose(sol @ Q, R, atol=1e-8)


def test_batched_solves_match_one_by_one_and_fall_back_when_singular():
    g = torch.Generator().manual_seed(7)
    Qs, Rs = [], []
    for k in range(4):
        X = torch.randn(30 if k != 2 else 3, 6, generator=g, dtype=F64)  # k = 2: rank 3 of 6, singular
        Qs.append(X.T @ X)
        Rs.append(torch.randn(5, 6, generator=g, dtype=F64))
    Qs.append(torch.eye(4, dtype=F64))  # another shape: solved on its own
    Rs.append(torch.randn(5, 4, generator=g, dtype=F64))
    batched = solve_right_many(Qs, Rs)
    for (sol, how), Q, R in zip(batched, Qs, Rs):
        want, want_how = solve_right(Q, R)
        assert how == want_how
        torch.testing.assert_close(sol, want, rtol=1e-9, atol=1e-9)
    assert [how for _, how in batched] == ["cholesky", "cholesky", "pinv", "cholesky", "cholesky"]


@pytest.mark.parametrize("d, block", [(37, 8), (64, 64), (130, 64), (200, 512)])
def test_blocked_right_solve_equals_a_dense_solve(d, block):
    from iteris.solve import blocked_right_solve

    gen = torch.Generator().manual_seed(d)
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    Q = M @ M.T + d * torch.eye(d, dtype=torch.float64)
    R = torch.randn(7, d, generator=gen, dtype=torch.float64)
    want = torch.linalg.solve(Q, R.T).T
    for blocked in (True, False):
        got = blocked_right_solve(torch.linalg.cholesky(Q), R, block, blocked=blocked)
        assert float((got - want).norm() / want.norm()) < 1e-12


@pytest.mark.parametrize("alpha1", [0.0, 1e-3])
def test_sample_space_solve_equals_the_gram_solve_on_random_rows(alpha1):
    """n < d_in tokens: the n x n solve and the d_in x d_in one agree, with an adapter absent from the layer."""
    from iteris.solve import iteris_solve_many, iteris_solve_samples

    gen = torch.Generator().manual_seed(3)
    d, ranks, counts = 40, [3, 2, 4], [7, 5, 9]
    members = []
    for m in range(2):
        loras = [LoraModule(A=torch.randn(r, d, generator=gen, dtype=torch.float64),
                            B=torch.randn(6, r, generator=gen, dtype=torch.float64), scale=1.5) for r in ranks]
        loras[1] = None if m == 0 else loras[1]
        members.append(loras)
    rows = [torch.randn(n, d, generator=gen, dtype=torch.float64) for n in counts]
    own = [torch.randn(n, d, generator=gen, dtype=torch.float64) for n in counts]
    layers_rows, layers_gram = [], []
    for m, loras in enumerate(members):
        as_rows, as_gram = [], []
        for i, (X_hat, X) in enumerate(zip(rows, own)):
            c = 0.5 + 0.3 * i + 0.1 * m
            lora = loras[i]
            proj = None if lora is None else X @ lora.A.T
            cross_proj = None if lora is None else proj.T @ X_hat
            norm = float(torch.linalg.norm(X.T @ X_hat))
            as_rows.append(TaskLayerStats(gram=None, cross_proj=cross_proj, cross_norm=norm, weight=c, rows=X_hat, own_proj=proj))
            as_gram.append(TaskLayerStats(gram=X_hat.T @ X_hat, cross_proj=cross_proj, cross_norm=norm, weight=c))
        layers_rows.append((as_rows, loras))
        layers_gram.append((as_gram, loras))
    for (got, how), (want, _) in zip(iteris_solve_samples(layers_rows, alpha1, 1e-3),
                                     iteris_solve_many(layers_gram, alpha1, 1e-3)):
        assert how == "cholesky"
        assert float((got.dense() - want.dense()).norm() / want.dense().norm()) < 1e-10
