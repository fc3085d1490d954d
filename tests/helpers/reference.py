"""An independent float64 IterIS, written the straightforward way: PEFT runs each adapter, every layer's
features are stored in full (one sample per forward, so there is no padding at all), the merged model
is a copy of the base with W0 + dW written into its weights, and each layer is solved densely with
torch.linalg.solve. It shares no code with iteris beyond transformers/peft/torch."""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

from tests.helpers import fixtures as fx

F64 = torch.float64


def load_peft(base_dir, family, adapter_dirs):
    base = fx.auto_class(family).from_pretrained(base_dir, dtype=F64).eval().requires_grad_(False)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.eval()
    return base, model


def peft_delta(model, name, adapter):
    """dW (d_out x d_in) of one adapter on one layer, from PEFT itself; None if the adapter lacks it."""
    layer = model.base_model.model.get_submodule(name)
    if adapter not in layer.lora_A:
        return None
    d = layer.get_delta_weight(adapter).to(F64)
    return d.T if isinstance(layer.base_layer, Conv1D) else d


def w0(base, name):
    m = base.get_submodule(name)
    return (m.weight.T if isinstance(m, Conv1D) else m.weight).detach().to(F64)


def _inputs(tokenizer, family, text, target):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    kwargs = {"input_ids": ids}
    if family == "t5":
        tgt = tokenizer(text_target=target)["input_ids"]
        kwargs["decoder_input_ids"] = torch.tensor([[0] + tgt])  # decoder start = pad id 0
    return kwargs


@torch.no_grad()
def features(model, root, names, tokenizer, family, samples):
    """{layer: (tokens x d_in) float64} over all samples, hooks on ``root.get_submodule(name)``."""
    store = {n: [] for n in names}
    hooks = [
        root.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: store[n].append(a[0].reshape(-1, a[0].shape[-1]).to(F64)))
        for n in names
    ]
    try:
        for text, target in samples:
            model(**_inputs(tokenizer, family, text, target))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def merged_copy(base, deltas):
    m = copy.deepcopy(base)
    with torch.no_grad():
        for name, d in deltas.items():
            layer = m.get_submodule(name)
            layer.weight += d.T if isinstance(layer, Conv1D) else d
    return m


def reference_iteris(
    base_dir, family, adapter_dirs, task_samples, tokenizer, names, iterations, gamma=0.0, alpha1=0.0, alpha2=0.0,
    adaptive=True, manual=None, with_pretrain=False,
):
    """Dense merged deltas after the initial solve and ``iterations`` inference-solving rounds."""
    base, peft_model = load_peft(base_dir, family, adapter_dirs)
    n = len(adapter_dirs)
    manual = manual or [1.0] * n
    own = []
    for i in range(n):
        peft_model.set_adapter(f"a{i}")
        own.append(features(peft_model, peft_model.base_model.model, names, tokenizer, family, task_samples[i]))
    dW = {name: [peft_delta(peft_model, name, f"a{i}") for i in range(n)] for name in names}
    coef = {}
    for name in names:
        row = []
        for i in range(n):
            W = w0(base, name) + (dW[name][i] if dW[name][i] is not None else 0)
            X = own[i][name]
            row.append(manual[i] * (float((W**2).sum() / ((X @ W.T) ** 2).sum()) if adaptive else 1.0))
        coef[name] = row

    merged_inputs = own
    result = None
    for _ in range(iterations + 1):
        result = {}
        for name in names:
            W0 = w0(base, name)
            P = torch.zeros_like(W0)
            Q = torch.zeros(W0.shape[1], W0.shape[1], dtype=F64)
            for i in range(n):
                X = own[i][name]
                Xh = (1 - gamma) * merged_inputs[i][name] + gamma * X
                C = X.T @ Xh
                G = Xh.T @ Xh
                eye = torch.eye(G.shape[0], dtype=F64)
                target = (W0 if with_pretrain else 0) + (dW[name][i] if dW[name][i] is not None else torch.zeros_like(W0))
                P += coef[name][i] * target @ (C + alpha1 * torch.linalg.norm(C) * eye)
                Q += coef[name][i] * (G + alpha2 * torch.linalg.norm(G) * eye)
            sol = torch.linalg.solve(Q.T, P.T).T
            result[name] = sol - W0 if with_pretrain else sol
        merged = merged_copy(base, result)
        merged_inputs = [features(merged, merged, names, tokenizer, family, task_samples[i]) for i in range(n)]
    return result


def reference_regmean(base_dir, family, adapter_dirs, task_samples, tokenizer, names, reduction):
    base, peft_model = load_peft(base_dir, family, adapter_dirs)
    out = {}
    feats = []
    for i in range(len(adapter_dirs)):
        peft_model.set_adapter(f"a{i}")
        feats.append(features(peft_model, peft_model.base_model.model, names, tokenizer, family, task_samples[i]))
    for name in names:
        grams, num = [], 0
        for i, f in enumerate(feats):
            G = f[name].T @ f[name]
            G = reduction * G + (1 - reduction) * torch.diag(torch.diag(G))
            grams.append(G)
            d = peft_delta(peft_model, name, f"a{i}")
            if d is not None:
                num = num + d @ G
        out[name] = num @ torch.linalg.inv(sum(grams))
    return out


def dense_iteris(base, deltas, task_inputs, names, iterations, alpha1, alpha2, run, adaptive=True, merged_inputs=None):
    """IterIS written the plain way for any model: each adapter's model is a copy of ``base`` with W0 + dW in
    its weights, ``run(model, inputs)`` runs one sample (so no row is padding), every layer input is kept.

    deltas: per adapter {layer: dW (d_out x d_in)}; task_inputs: per adapter, a list of one-sample inputs;
    merged_inputs: what the merged model runs instead (same rows), where it receives other inputs."""
    n = len(deltas)

    def weights_added(delta):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, d in delta.items():
                w = m.get_submodule(name).weight
                w += d.to(w.dtype).reshape(w.shape)  # (a 1x1 convolution's weight has two unit axes)
        return m

    def rows(module, x):
        x = x.movedim(1, -1) if isinstance(module, torch.nn.Conv2d) else x  # 1x1 convolution: channels per pixel
        return x.reshape(-1, x.shape[-1]).to(F64)

    def collect(model, inputs_list):
        store = {name: [] for name in names}
        hooks = [model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: store[name].append(rows(m, a[0]))) for name in names]
        with torch.no_grad():
            for inputs in inputs_list:
                run(model, inputs)
        for h in hooks:
            h.remove()
        return {name: torch.cat(v) for name, v in store.items()}

    own = [collect(weights_added(deltas[i]), task_inputs[i]) for i in range(n)]
    weight = {name: base.get_submodule(name).weight.detach().to(F64).flatten(1) for name in names}
    full = [{name: deltas[i].get(name, torch.zeros_like(weight[name])) for name in names} for i in range(n)]
    coef = {}
    for name in names:
        W0 = weight[name]
        coef[name] = [float(((W0 + full[i][name]) ** 2).sum() / ((own[i][name] @ (W0 + full[i][name]).T) ** 2).sum())
                      if adaptive else 1.0 for i in range(n)]
    merged = own
    result = None
    for _ in range(iterations + 1):
        result = {}
        for name in names:
            d = own[0][name].shape[1]
            eye = torch.eye(d, dtype=F64)
            P, Q = 0, torch.zeros(d, d, dtype=F64)
            for i in range(n):
                X, Xh = own[i][name], merged[i][name]
                C, G = X.T @ Xh, Xh.T @ Xh
                P = P + coef[name][i] * full[i][name] @ (C + alpha1 * torch.linalg.norm(C) * eye)
                Q = Q + coef[name][i] * (G + alpha2 * torch.linalg.norm(G) * eye)
            result[name] = torch.linalg.solve(Q.T, P.T).T
        model = weights_added(result)
        merged = [collect(model, (merged_inputs or task_inputs)[i]) for i in range(n)]
    return result
