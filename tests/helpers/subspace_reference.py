"""TSV-M, Iso-C and Iso-CTS as their authors write them, on dense float64 updates: full SVDs of d_out x d_in
matrices, with ``K`` (the size of the space the updates span) where the authors use min(d_out, d_in). An
independent check of the core-space forms in ``iteris.methods.subspace``, which never form these matrices."""

import torch


def _svd(W, k):
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def _polar(X):
    u, _, vh = torch.linalg.svd(X, full_matrices=False)
    return u @ vh


def tsv_m(updates, K, scale, ranks):
    """``ranks``: each update's rank; every component is kept where they all fit in K (see subspace.tsv_merge)."""
    keep = ranks if sum(ranks) <= K else [int(K / len(updates))] * len(updates)
    parts = [_svd(W, k) for W, k in zip(updates, keep)]
    U = torch.cat([p[0] for p in parts], dim=1)
    S = torch.cat([p[1] for p in parts])
    V = torch.cat([p[2] for p in parts], dim=0)
    return scale * _polar(U) @ torch.diag(S) @ _polar(V.T).T


def iso_c(updates, K, scale):
    u, s, vh = _svd(sum(updates), K)
    return scale * s.mean() * u @ vh


def iso_cts(updates, K, scale, fraction):
    T = len(updates)
    common = int(K * fraction)
    shared = min(round((K - common) / T) * T, K // T * T)
    common, n = K - shared, shared // T
    u, s, vh = _svd(sum(updates), common)
    Us, Ss, Vs = [], [], []
    for W in updates:
        ut, st, vt = _svd(W - u @ u.T @ W, n)
        Us.append(ut), Ss.append(st), Vs.append(vt)
    U = torch.cat(Us + [u], dim=1)
    S = torch.cat(Ss + [s])
    V = torch.cat(Vs + [vh], dim=0)
    return scale * S.mean() * _polar(U) @ _polar(V.T).T
