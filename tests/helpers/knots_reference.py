"""KnOTS-TIES as its authors write it, on dense float64 updates: per layer the d_out x (T d_in) concatenation
of the updates and its SVD (singular values above 1e-5), each task's S V_i^T flattened over all layers into
one vector, TIES masks on those vectors (top-k by magnitude, signs by the sum of values), the masked vectors
scaled, their disjoint mean, and U times it per layer."""

import torch


def knots_ties(updates_by_layer, scale, top_k):
    """updates_by_layer: {layer: [dW_i (d_out x d_in), one per task]} -> {layer: merged dW}."""
    bases, parts = {}, {}
    for name, updates in updates_by_layer.items():
        u, s, vh = torch.linalg.svd(torch.cat(updates, dim=1), full_matrices=False)
        keep = s > 1e-5
        bases[name] = u[:, keep]
        sv = torch.diag(s[keep]) @ vh[keep]
        parts[name] = list(sv.split(updates[0].shape[1], dim=1))
    names = list(updates_by_layer)
    n = len(updates_by_layer[names[0]])
    vectors = torch.stack([torch.cat([parts[name][i].flatten() for name in names]) for i in range(n)])
    if top_k < 100:
        d = vectors.shape[1]
        kth = vectors.abs().kthvalue(d - int(d * top_k / 100), dim=1, keepdim=True).values
        vectors = vectors * (vectors.abs() >= kth)
    sign = torch.sign(vectors.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, vectors > 0, vectors < 0)
    kept = scale * vectors * agree
    merged = kept.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    out, start = {}, 0
    for name in names:
        shape = parts[name][0].shape
        out[name] = bases[name] @ merged[start:start + shape.numel()].reshape(shape)
        start += shape.numel()
    return out
