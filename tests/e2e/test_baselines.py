"""Every data-free merge method against a small float64 reference written here, on PEFT's own dense deltas.

The reference never touches iteris: each adapter's dW (d_out x d_in) comes from PEFT
(``PeftModel.from_pretrained`` + ``load_adapter`` + ``layer.get_delta_weight``, transposed for GPT-2's
Conv1D), and each method is re-implemented below in plain dense torch. Dense methods (TIES, DARE) are
SVD-truncated to ``rank`` by iteris; ``rank: 64`` (>= every tiny layer's smaller side) makes that exact.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

import iteris
from tests.helpers import fixtures as fx

F64 = torch.float64
FULL_RANK = 64  # >= min(d_out, d_in) of every layer of the tiny models

pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1:UserWarning")

# --------------------------------------------------------------------------------------------
# Independent reference: PEFT's deltas and dense float64 implementations of each method


_DELTA_CACHE: dict[tuple, list[dict[str, torch.Tensor]]] = {}


def peft_dense_deltas(base_dir, family, adapter_dirs) -> list[dict[str, torch.Tensor]]:
    """[{layer name: dW (d_out x d_in, float64)} per adapter], straight from PEFT."""
    key = (str(base_dir), family, tuple(map(str, adapter_dirs)))
    if key in _DELTA_CACHE:
        return _DELTA_CACHE[key]
    base = fx.auto_class(family).from_pretrained(str(base_dir), dtype=F64).eval()
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    out = [{} for _ in adapter_dirs]
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if not hasattr(layer, "lora_A") or not hasattr(layer, "get_delta_weight"):
                continue
            for i in range(len(adapter_dirs)):
                if f"a{i}" in layer.lora_A:
                    d = layer.get_delta_weight(f"a{i}").to(F64)
                    out[i][name] = d.T if isinstance(layer.base_layer, Conv1D) else d
    assert all(out), "PEFT found no LoRA layers"
    _DELTA_CACHE[key] = out
    return out


def layer_names(deltas):
    return sorted({n for d in deltas for n in d})


def present(deltas, weights, name):
    """(dW_i, w_i) of the adapters that touch ``name`` (an absent adapter's delta is zero there)."""
    return [(d[name], w) for d, w in zip(deltas, weights) if name in d]


def ref_weighted_sum(deltas, weights, name):
    return sum(w * D for D, w in present(deltas, weights, name))


def ref_trim(D, density):
    """Keep the int(density * numel) entries of largest magnitude (all of them at density 1)."""
    if density >= 1.0:
        return D.clone()
    k = int(density * D.numel())
    if k == 0:
        return torch.zeros_like(D)
    threshold = D.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(D.abs() >= threshold, D, torch.zeros_like(D))


def ref_ties(Ds, ws, density, sign_method):
    """Trim each delta, elect a sign per entry, average the weighted kept values that agree with it."""
    T = torch.stack([ref_trim(D, density) for D in Ds])
    if sign_method == "total":
        score = T.sum(0)
    else:
        score = torch.sign(T).sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(T.dtype)
    agree = torch.sign(T) == elected  # entries trimmed to 0 never agree
    weighted = T * torch.tensor(ws, dtype=T.dtype)[:, None, None]
    total = torch.where(agree, weighted, torch.zeros_like(weighted)).sum(0)
    count = agree.sum(0).clamp(min=1).to(T.dtype)
    return total / count


def best_rank_k(D, k):
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    err = float((S[k:].pow(2).sum() / S.pow(2).sum()).sqrt())
    return (U[:, :k] * S[:k]) @ Vh[:k], err


def rel(a, b):
    return float(torch.linalg.norm(a.to(F64) - b.to(F64)) / torch.linalg.norm(b.to(F64)))


# --------------------------------------------------------------------------------------------
# Setups: two full adapters plus one of lower rank on a subset of the layers, unequal weights

WEIGHTS = [1.0, 0.5, -0.75]


@pytest.fixture(scope="module")
def setup(tiny_family_dir, adapters_for):
    def make(family):
        base = tiny_family_dir(family)
        partial_targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn"]
        paths = adapters_for(family, 2) + adapters_for(
            family, 1, seed0=7, target_modules=partial_targets, r=2, lora_alpha=4
        )
        deltas = peft_dense_deltas(base, family, paths)
        return base, paths, deltas

    return make


def config(base, paths, method, parameters=None, weights=None, data=None, **extra):
    weights = weights or [1.0] * len(paths)
    data = data or [None] * len(paths)
    return {
        "base_model": str(base),
        "method": method,
        "parameters": parameters or {},
        "device": "cpu",
        "adapters": [
            {"name": f"t{i}", "path": str(p), "weight": w, **({"data": str(d)} if d else {})}
            for i, (p, w, d) in enumerate(zip(paths, weights, data))
        ],
        "progress": False,
        **extra,
    }


def ranks_sum(deltas, name, r=(4, 4, 2)):
    return sum(rk for d, rk in zip(deltas, r) if name in d)


# --------------------------------------------------------------------------------------------
# Exact methods: task_arithmetic, linear, cat


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_task_arithmetic_is_scaled_weighted_sum(setup, family):
    base, paths, deltas = setup(family)
    result = iteris.merge(config(base, paths, "task_arithmetic", {"scale": 0.7}, WEIGHTS))
    names = layer_names(deltas)
    assert sorted(result.deltas) == names
    for name in names:
        expected = 0.7 * ref_weighted_sum(deltas, WEIGHTS, name)
        assert rel(result.deltas[name].dense(), expected) < 1e-6, name
        assert result.deltas[name].rank == ranks_sum(deltas, name)
    assert result.report["output"]["exact"] is True
    assert all(e == 0.0 for e in result.report["output"]["relative_error"].values())


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_is_weighted_average(setup, family, normalize):
    base, paths, deltas = setup(family)
    result = iteris.merge(config(base, paths, "linear", {"normalize": normalize}, WEIGHTS))
    divisor = sum(WEIGHTS) if normalize else 1.0
    for name in layer_names(deltas):
        expected = ref_weighted_sum(deltas, WEIGHTS, name) / divisor
        assert rel(result.deltas[name].dense(), expected) < 1e-6, name


def test_linear_refuses_weights_summing_to_zero(setup):
    base, paths, _ = setup("llama")
    with pytest.raises(iteris.IterisError, match="sum to 0"):
        iteris.merge(config(base, paths[:2], "linear", {}, [1.0, -1.0]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cat_is_exact_weighted_sum_of_summed_rank(setup, family):
    base, paths, deltas = setup(family)
    result = iteris.merge(config(base, paths, "cat", {}, WEIGHTS))
    for name in layer_names(deltas):
        delta = result.deltas[name]
        assert rel(delta.dense(), ref_weighted_sum(deltas, WEIGHTS, name)) < 1e-6, name
        assert delta.rank == ranks_sum(deltas, name) == result.report["output"]["ranks"][name]
    assert result.report["output"]["exact"] is True


# --------------------------------------------------------------------------------------------
# svd (PEFT semantics: B = U_k S_k, A = Vh_k, optionally clamped)


@pytest.mark.parametrize("family,svd_rank", [("llama", None), ("gpt2", None), ("llama", 3)])
def test_svd_is_truncated_svd_of_weighted_sum(setup, family, svd_rank):
    base, paths, deltas = setup(family)
    params = {} if svd_rank is None else {"svd_rank": svd_rank}
    result = iteris.merge(config(base, paths, "svd", params, WEIGHTS))
    for name in layer_names(deltas):
        k = svd_rank or 4  # default: the largest adapter rank on the layer
        expected, _ = best_rank_k(ref_weighted_sum(deltas, WEIGHTS, name), k)
        delta = result.deltas[name]
        assert delta.rank == k == result.report["output"]["ranks"][name]
        assert rel(delta.dense(), expected) < 1e-5, name
        # PEFT's split: A = Vh_k has orthonormal rows, B = U_k S_k has orthogonal columns of norm S
        A, B = delta.A.to(F64), delta.B.to(F64)
        assert torch.allclose(A @ A.T, torch.eye(k, dtype=F64), atol=1e-5), name
        S = torch.linalg.svdvals(expected)[:k]
        assert torch.allclose(B.T @ B, torch.diag(S**2), atol=1e-4 * float(S[0] ** 2)), name


def test_svd_clamp_clamps_factors_at_quantile(setup):
    base, paths, deltas = setup("llama")
    q = 0.8
    result = iteris.merge(config(base, paths, "svd", {"svd_clamp": q}, WEIGHTS))
    clamped_somewhere = False
    for name in layer_names(deltas):
        k = 4
        U, S, Vh = torch.linalg.svd(ref_weighted_sum(deltas, WEIGHTS, name), full_matrices=False)
        B_ref, A_ref = U[:, :k] * S[:k], Vh[:k].clone()
        B, A = result.deltas[name].B.to(F64), result.deltas[name].A.to(F64)
        # singular vectors are defined up to a sign per pair: take iteris' sign (clamping keeps signs)
        flip = torch.sign((B * B_ref).sum(0))
        flip[flip == 0] = 1.0
        B_ref, A_ref = B_ref * flip, A_ref * flip[:, None]
        hi = float(torch.quantile(torch.cat([B_ref.flatten(), A_ref.flatten()]), q))
        clamped_somewhere |= bool((B_ref.abs() > hi).any() or (A_ref.abs() > hi).any())
        assert torch.allclose(B, B_ref.clamp(-hi, hi), atol=1e-5 * max(hi, 1.0)), name
        assert torch.allclose(A, A_ref.clamp(-hi, hi), atol=1e-5 * max(hi, 1.0)), name
        assert float(B.abs().max()) <= hi * (1 + 1e-5) and float(A.abs().max()) <= hi * (1 + 1e-5)
    assert clamped_somewhere, "the quantile clamp never bit: the test would not notice a missing clamp"


# --------------------------------------------------------------------------------------------
# TIES


TIES_CASES = [
    ("llama", 0.3, "total"),
    ("llama", 0.5, "frequency"),
    ("gpt2", 0.2, "total"),
    ("gpt2", 0.6, "frequency"),
    ("llama", 1.0, "total"),
]


@pytest.mark.parametrize("family,density,sign_method", TIES_CASES)
def test_ties_matches_reference(setup, family, density, sign_method):
    base, paths, deltas = setup(family)
    params = {"density": density, "majority_sign_method": sign_method}
    result = iteris.merge(config(base, paths, "ties", params, WEIGHTS, rank=FULL_RANK))
    for name in layer_names(deltas):
        Ds, ws = zip(*present(deltas, WEIGHTS, name))
        expected = ref_ties(list(Ds), list(ws), density, sign_method)
        got = result.deltas[name].dense()
        assert rel(got, expected) < 1e-5, name
        if density < 1.0:
            # trimming and the disjoint mean leave many exact zeros in the dense result
            assert torch.equal(got.abs() < 1e-6 * float(expected.abs().max()), expected == 0), name
    assert result.report["output"]["exact"] is True


def test_ties_total_and_frequency_differ(setup):
    """Guard for the parametrised test: the two sign rules really give different merges here."""
    base, paths, deltas = setup("llama")
    name = layer_names(deltas)[0]
    Ds, ws = zip(*present(deltas, WEIGHTS, name))
    assert rel(ref_ties(list(Ds), list(ws), 0.5, "total"), ref_ties(list(Ds), list(ws), 0.5, "frequency")) > 1e-3


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("task_arithmetic", {})])
def test_truncation_error_reported(setup, method, params):
    """Dense results are SVD-truncated to ``rank``; the report gives each layer's true relative error."""
    base, paths, deltas = setup("llama")
    k = 3
    result = iteris.merge(config(base, paths, method, params, WEIGHTS, rank=k))
    errors = result.report["output"]["relative_error"]
    assert result.report["output"]["exact"] is False
    for name in layer_names(deltas):
        pairs = present(deltas, WEIGHTS, name)
        if method == "ties":
            dense = ref_ties([D for D, _ in pairs], [w for _, w in pairs], 0.4, "total")
        else:
            dense = ref_weighted_sum(deltas, WEIGHTS, name)
        approx, err = best_rank_k(dense, k)
        assert result.deltas[name].rank == k
        assert err > 1e-3  # a real truncation
        assert errors[name] == pytest.approx(err, rel=1e-5), name
        assert rel(result.deltas[name].dense(), approx) < 1e-5, name
        true_err = rel(result.deltas[name].dense(), dense)
        assert true_err == pytest.approx(errors[name], rel=1e-4), name


def test_dense_default_rank_is_sum_of_ranks(setup):
    base, paths, deltas = setup("llama")
    result = iteris.merge(config(base, paths, "ties", {"density": 0.5}, WEIGHTS))
    for name in layer_names(deltas):
        assert result.report["output"]["ranks"][name] == ranks_sum(deltas, name)


# --------------------------------------------------------------------------------------------
# DARE


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dare_density_one_is_task_arithmetic_and_untrimmed_ties(setup, family):
    base, paths, deltas = setup(family)
    for sign_method in ("total", "frequency"):
        lin = iteris.merge(config(base, paths, "dare_linear", {"density": 1.0}, WEIGHTS, rank=FULL_RANK))
        tie = iteris.merge(
            config(base, paths, "dare_ties", {"density": 1.0, "majority_sign_method": sign_method}, WEIGHTS,
                   rank=FULL_RANK)
        )
        for name in layer_names(deltas):
            pairs = present(deltas, WEIGHTS, name)
            assert rel(lin.deltas[name].dense(), ref_weighted_sum(deltas, WEIGHTS, name)) < 1e-5, name
            expected = ref_ties([D for D, _ in pairs], [w for _, w in pairs], 1.0, sign_method)
            assert rel(tie.deltas[name].dense(), expected) < 1e-5, name


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_seed_reproducible_and_seed_dependent(setup, method):
    base, paths, deltas = setup("llama")
    runs = [
        iteris.merge(config(base, paths, method, {"density": 0.5, "seed": s}, WEIGHTS, rank=FULL_RANK))
        for s in (3, 3, 4)
    ]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = iteris.merge(config(base, paths, method, {"density": 0.5, "seed": 3}, WEIGHTS, rank=FULL_RANK))
    assert torch.equal(torch.rand(3), expected_draw), "the merge must leave the global RNG as it found it"
    for name in layer_names(deltas):
        a, b, c = (r.deltas[name].dense() for r in runs)
        assert torch.equal(a, b), name
        assert torch.equal(a, again.deltas[name].dense()), name
        assert rel(c, a) > 0.1, name


def _combos(pairs, density):
    """Every drop pattern of the present adapters: (keep flags, dropped-and-rescaled deltas)."""
    for keep in itertools.product((0.0, 1.0), repeat=len(pairs)):
        yield keep, [k * D / density for k, (D, _) in zip(keep, pairs)]


@pytest.mark.parametrize("method,sign_method", [("dare_linear", None), ("dare_ties", "total"), ("dare_ties", "frequency")])
def test_dare_entries_are_dropped_or_rescaled(setup, method, sign_method):
    """Each entry of the result is what the method gives for *some* keep/drop pattern of the adapters'
    entries, with kept entries divided by density; the kept fraction per adapter is about density."""
    base, paths, deltas = setup("llama")
    density = 0.4
    params = {"density": density, "seed": 11}
    if sign_method:
        params["majority_sign_method"] = sign_method
    result = iteris.merge(config(base, paths, method, params, WEIGHTS, rank=FULL_RANK))
    kept = [0.0, 0.0, 0.0]
    seen = [0, 0, 0]
    inner, norm = 0.0, 0.0
    for name in layer_names(deltas):
        pairs = present(deltas, WEIGHTS, name)
        ws = [w for _, w in pairs]
        got = result.deltas[name].dense()
        candidates, flags = [], []
        for keep, Ds in _combos(pairs, density):
            if method == "dare_linear":
                candidates.append(sum(w * D for w, D in zip(ws, Ds)))
            else:
                candidates.append(ref_ties(Ds, ws, 1.0, sign_method))
            flags.append(keep)
        dist = torch.stack([(got - c).abs() for c in candidates])
        best, which = dist.min(0)
        scale = float(max(D.abs().max() for D, _ in pairs)) / density
        assert float(best.max()) < 1e-5 * scale, name
        if method == "dare_linear":
            flags_t = torch.tensor(flags, dtype=F64)[which]  # (rows, cols, adapters)
            idx = [i for i, d in enumerate(deltas) if name in d]
            for j, i in enumerate(idx):
                kept[i] += float(flags_t[..., j].sum())
                seen[i] += got.numel()
            ws_sum = ref_weighted_sum(deltas, WEIGHTS, name)
            inner += float((got * ws_sum).sum())
            norm += float((ws_sum * ws_sum).sum())
    if method == "dare_linear":
        for k, n in zip(kept, seen):
            frac, sigma = k / n, (density * (1 - density) / n) ** 0.5
            assert abs(frac - density) < 5 * sigma + 1e-3, (frac, density)
        # E[result] = weighted sum: the projection of the result on it is close to its squared norm
        assert inner / norm == pytest.approx(1.0, abs=0.1)


def test_dare_masks_independent_across_adapters(setup):
    """With two copies of one adapter, every entry is 0, v/d or 2v/d; all three occur (independent masks)."""
    base, paths, deltas = setup("llama")
    density = 0.5
    same = [paths[0], paths[0]]
    result = iteris.merge(config(base, same, "dare_linear", {"density": density, "seed": 5}, [1.0, 1.0], rank=FULL_RANK))
    counts = torch.zeros(3)
    total = 0
    for name, D in deltas[0].items():
        got = result.deltas[name].dense()
        ratio = got / (D / density)
        near = torch.stack([(ratio - v).abs() for v in (0.0, 1.0, 2.0)])
        mask = D.abs() > 1e-3 * float(D.abs().max())
        best, which = near.min(0)
        assert float(best[mask].max()) < 1e-4, name
        counts += torch.bincount(which[mask].flatten(), minlength=3).to(counts.dtype)
        total += int(mask.sum())
    expected = torch.tensor([(1 - density) ** 2, 2 * density * (1 - density), density**2])
    assert torch.allclose(counts / total, expected, atol=0.03), counts / total


# --------------------------------------------------------------------------------------------
# Identical copies: averaging methods must give the adapter back


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_of_identical_copies_is_the_adapter(setup, family):
    base, paths, deltas = setup(family)
    result = iteris.merge(config(base, [paths[1], paths[1]], "linear", {}, [1.0, 3.0]))
    for name, D in deltas[1].items():
        assert rel(result.deltas[name].dense(), D) < 1e-6, name


@pytest.mark.parametrize(
    "family,method,params",
    [
        ("llama", "regmean", {"reduction": 0.9}),
        ("gpt2", "regmean", {"reduction": 0.5}),
        ("llama", "iteris", {"iterations": 2, "alpha1": 1e-8, "alpha2": 1e-8}),
        ("gpt2", "iteris", {"iterations": 1, "alpha1": 1e-8, "alpha2": 1e-8, "gamma": 0.3}),
    ],
)
def test_data_aware_merge_of_identical_copies_is_the_adapter(setup, calibration_file, family, method, params):
    base, paths, deltas = setup(family)
    data = calibration_file("jsonl", n=6, seed=0)
    cfg = config(
        base, [paths[0], paths[0]], method, params, [1.0, 3.0], data=[data, data], dtype="float64",
        calibration={"stats_dtype": "float64", "batch_size": 4},
    )
    result = iteris.merge(cfg)
    assert sorted(result.deltas) == sorted(deltas[0])
    for name, D in deltas[0].items():
        assert rel(result.deltas[name].dense(), D) < 1e-6, name


# --------------------------------------------------------------------------------------------
# Regression: an exact (factored) merge compressed to a rank between a layer's smaller side and the
# summed rank (deltas._truncate_factored once took a full_matrices SVD and failed with a size mismatch)


def test_exact_merge_compressed_to_rank_above_small_side(tiny_family_dir, adapters_for):
    base = tiny_family_dir("llama")
    paths = adapters_for("llama", 2, seed0=30, r=12, lora_alpha=12)  # sum of ranks 24 > 16 = k_proj's d_out
    deltas = peft_dense_deltas(base, "llama", paths)
    result = iteris.merge(config(base, paths, "task_arithmetic", {}, [1.0, 1.0], rank=20))
    for name in layer_names(deltas):
        expected = ref_weighted_sum(deltas, [1.0, 1.0], name)
        approx, err = best_rank_k(expected, 20)
        assert rel(result.deltas[name].dense(), approx) < 1e-6, name
        assert result.report["output"]["relative_error"][name] == pytest.approx(err, abs=1e-6)
