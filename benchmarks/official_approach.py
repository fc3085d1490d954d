"""COMPARISON BASELINE: the official IterIS code's approach, reimplemented for comparison; not how iteris computes.

The speed benchmark sets iteris against this module. The maths is the same as iteris's (DESIGN.md
section 2). The method is what the official code does:

* every target layer's input features are stored for every token of every sample, for each adapter's
  own model and again for the merged model, one copy per module (q/k/v and gate/up each keep their
  own copy of the same hidden state), in the model's dtype on the model's device;
* every layer is solved densely in float64 with ``torch.linalg.solve`` over all ``d_out`` right-hand
  sides, and the merged update is a dense ``d_out x d_in`` matrix;
* each iteration installs all the new updates at once and runs the merged model over every task's
  samples again.

Two differences from the official code, both on purpose. Features come from one plain forward over
whole sequences. The official code uses ``model.generate`` and keeps only the last generation step's
inputs, so its features are not the objective's. Inputs carry no padding, so no padding rows enter
the statistics.

    from benchmarks import official_approach   # from the repository root
    deltas, info = official_approach.official_merge(model, adapters, task_tokens, iterations=3)
"""

from __future__ import annotations

import time

import torch
from torch import nn

F64 = torch.float64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nbytes(features: list[dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for f in features for t in f.values())


def _capture(model, names, tokens, batch_size, device, updates) -> dict[str, torch.Tensor]:
    """Run ``tokens`` with ``updates[name](x)`` added to those layers' outputs; return every target layer's
    inputs (tokens x d_in), each layer keeping its own copy. The hooks are removed even on error."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(name):
        return lambda module, args: store[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

    def add(update):
        return lambda module, args, out: out + update(args[0]).to(out.dtype)

    handles = []
    try:
        for n in names:
            layer = model.get_submodule(n)
            handles.append(layer.register_forward_pre_hook(keep(n)))
            if n in updates:
                handles.append(layer.register_forward_hook(add(updates[n])))
        for s in range(0, len(tokens), batch_size):
            model(input_ids=tokens[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def _own_updates(adapter, cdtype, device):
    """Adapter i's own model: ``scale * (x A^T) B^T`` in ``cdtype``, never written into the weights
    (bf16 weights would round the delta)."""
    updates = {}
    for name, mod in adapter.modules.items():
        At, Bt = mod.A.to(device, cdtype).T, mod.B.to(device, cdtype).T
        updates[name] = lambda x, At=At, Bt=Bt, s=mod.scale, c=cdtype: s * ((x.to(c) @ At) @ Bt)
    return updates


def _solve(W0, deltas, coefs, own, merged, alpha1, alpha2, gamma):
    """One layer, densely in float64: dW* = P Q^-1, with Q symmetric so solve(Q, P^T)^T."""
    d_in = W0.shape[1]
    eye = torch.eye(d_in, dtype=F64, device=W0.device)
    P = torch.zeros_like(W0)
    Q = torch.zeros(d_in, d_in, dtype=F64, device=W0.device)
    for dW, c, X, Xm in zip(deltas, coefs, own, merged):
        X = X.to(F64)
        Xh = (1 - gamma) * Xm.to(F64) + gamma * X
        C, G = X.T @ Xh, Xh.T @ Xh
        if dW is not None:
            P += c * dW @ (C + alpha1 * torch.linalg.norm(C) * eye)
        Q += c * (G + alpha2 * torch.linalg.norm(G) * eye)
    return torch.linalg.solve(Q, P.T).T


@torch.no_grad()
def official_merge(model, adapters, task_tokens, *, iterations=10, alpha1=1e-7, alpha2=1e-7, gamma=0.0,
                   adaptive_weights=True, batch_size=8) -> tuple[dict[str, torch.Tensor], dict]:
    """IterIS merge of ``adapters`` done the official code's way (see the module docstring).

    ``task_tokens[i]`` (samples x tokens, no padding) calibrates ``adapters[i]``. Returns
    ({layer: dense float64 dW* (d_out x d_in)}, info). info has "iterations_seconds" (round 0 = own
    capture, adaptive weights and initial solve; round k = merged capture and solve), "capture_seconds",
    "solve_seconds" (the adaptive weights included), "feature_bytes" (features held at the peak) and
    "total_seconds".
    """
    if len(task_tokens) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(task_tokens)} token sets")
    names = sorted(set().union(*(a.modules for a in adapters)))
    for n in names:
        if not isinstance(model.get_submodule(n), nn.Linear):
            raise TypeError(f"{n} is not an nn.Linear; this baseline handles plain linear layers only")
    weight = model.get_submodule(names[0]).weight
    device = weight.device
    cdtype = F64 if weight.dtype == F64 else torch.float32

    def delta(i, name):
        mod = adapters[i].modules.get(name)
        return None if mod is None else mod.scale * (mod.B.to(device, F64) @ mod.A.to(device, F64))

    def w0(name):
        return model.get_submodule(name).weight.detach().to(F64)

    info = {"iterations_seconds": [], "capture_seconds": 0.0, "solve_seconds": 0.0, "feature_bytes": 0}
    start = time.perf_counter()
    _sync(device)

    # Round 0: own features of every adapter, adaptive weights, initial solve (X_merged = X_own).
    t = round0 = time.perf_counter()
    own = [_capture(model, names, tok, batch_size, device, _own_updates(a, cdtype, device)) for a, tok in zip(adapters, task_tokens)]
    _sync(device)
    info["capture_seconds"] += time.perf_counter() - t
    info["feature_bytes"] = _nbytes(own)

    t = time.perf_counter()
    coefs = {}
    for name in names:
        row = []
        for i, feats in enumerate(own):
            if adaptive_weights:
                d = delta(i, name)
                W = w0(name) if d is None else w0(name) + d
                row.append(float((W**2).sum() / ((feats[name].to(F64) @ W.T) ** 2).sum()))
            else:
                row.append(1.0)
        coefs[name] = row
    _sync(device)
    info["solve_seconds"] += time.perf_counter() - t

    merged = own
    result: dict[str, torch.Tensor] = {}
    for k in range(iterations + 1):
        t_round = round0 if k == 0 else time.perf_counter()
        if k > 0:
            # Install every new dW* at once and rerun the merged model over every task's samples.
            updates = {n: (lambda x, Dt=D.T: x.to(cdtype) @ Dt) for n, D in result.items()}
            merged = None  # the previous merged features go before the new ones come
            t = time.perf_counter()
            merged = [_capture(model, names, tok, batch_size, device, updates) for tok in task_tokens]
            _sync(device)
            info["capture_seconds"] += time.perf_counter() - t
            info["feature_bytes"] = max(info["feature_bytes"], _nbytes(own) + _nbytes(merged))
            del updates
        t = time.perf_counter()
        last = k == iterations
        new = {}
        for name in names:
            sol = _solve(w0(name), [delta(i, name) for i in range(len(adapters))], coefs[name],
                         [f[name] for f in own], [f[name] for f in merged], alpha1, alpha2, gamma)
            # Only the last solve is returned in float64; earlier ones are only installed.
            new[name] = sol if last else sol.to(cdtype)
        result = new
        _sync(device)
        info["solve_seconds"] += time.perf_counter() - t
        info["iterations_seconds"].append(time.perf_counter() - t_round)
    info["total_seconds"] = time.perf_counter() - start
    return result, info
