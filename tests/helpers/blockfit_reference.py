"""The block-level fits written the plain way, in float64: each adapter's model and the merged model are
copies of the base with W0 + dW written into their weights, run one sample at a time (no padding); a block is
fitted by calling it with its weights replaced (``torch.func.functional_call``), never through iteris's
hooks. Shared with iteris: only the visiting order of the batches (documented: a seeded permutation of the
(task, batch) pairs, taken from its end, drawn again when used up)."""

import math
import re

import torch
from torch.func import functional_call

from tests.helpers.reference import load_peft, merged_copy, peft_delta, _inputs

F64 = torch.float64


def _block_of(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def _calls(model, k, tokenizer, family, samples):
    """Per sample: block k's input hidden state, its other arguments, and its output."""
    block = model.model.layers[k]
    seen = []

    def pre(module, args, kwargs):
        seen.append({"args": args, "kwargs": dict(kwargs)})

    def post(module, args, kwargs, output):
        seen[-1]["out"] = output[0] if isinstance(output, (tuple, list)) else output

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            for text, target in samples:
                model(**_inputs(tokenizer, family, text, target), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for call in seen:
        args, kwargs = call["args"], call["kwargs"]
        call["x"] = (args[0] if args else kwargs["hidden_states"])[0]
        call["rest"] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
    return seen


def _run(block, weights, call, x):
    args, kwargs = call["rest"]
    out = functional_call(block, weights, (x[None], *args), kwargs) if call["args"] else \
        functional_call(block, weights, (), {**kwargs, "hidden_states": x[None]})
    return (out[0] if isinstance(out, (tuple, list)) else out)[0]


def reference_block_fit(base_dir, family, adapter_dirs, task_samples, tokenizer, names, batch_size, steps_per_block,
                        lr, *, start=None, coefficients=None, balanced, relative_lr, manual=None, seed=0):
    """Dense merged deltas. ``start`` (IterIS refinement): {layer: (B, A)}, fitted as factors; else
    ``coefficients``: ProDistill's element-wise coefficients, all starting at that value. ``steps_per_block``:
    a number, or a function of the number of (task, batch) pairs."""
    base, peft_model = load_peft(base_dir, family, adapter_dirs)
    n = len(adapter_dirs)
    manual = manual or [1.0] * n
    own = [{m: _detached(peft_delta(peft_model, m, f"a{i}")) for m in names} for i in range(n)]
    own_models = [merged_copy(base, {m: d for m, d in own[i].items() if d is not None}) for i in range(n)]
    batches = [[list(range(s, min(s + batch_size, len(samples)))) for s in range(0, len(samples), batch_size)]
               for samples in task_samples]
    pairs = [(i, j) for i in range(n) for j in range(len(batches[i]))]
    steps = steps_per_block(len(pairs)) if callable(steps_per_block) else steps_per_block
    merged_weights: dict = {}
    for k in sorted({_block_of(m) for m in names}):
        here = [m for m in names if _block_of(m) == k]
        merged = merged_copy(base, merged_weights)
        block = merged.model.layers[k]
        prefix = f"model.layers.{k}."
        ins = [_calls(merged, k, tokenizer, family, task_samples[i]) for i in range(n)]
        outs = [_calls(own_models[i], k, tokenizer, family, task_samples[i]) for i in range(n)]
        energy = []
        for i in range(n):
            total = sum(float((c["out"][0] - c["x"]).pow(2).sum()) for c in outs[i])
            energy.append(total / sum(c["x"].shape[0] for c in outs[i]))
        w0 = {m: base.get_submodule(m).weight.detach().to(F64) for m in here}
        if start is not None:
            params = {m: [start[m][0].to(F64).clone().requires_grad_(True),
                          start[m][1].to(F64).clone().requires_grad_(True)] for m in here}

            def delta(m):
                return params[m][0] @ params[m][1]
        else:
            updates = {m: [(i, manual[i] * own[i][m]) for i in range(n) if own[i][m] is not None] for m in here}
            params = {m: [torch.full_like(d, coefficients, requires_grad=True) for _, d in updates[m]] for m in here}

            def delta(m):
                return sum(c * d for c, (_, d) in zip(params[m], updates[m]))
        weight = [manual[i] / energy[i] if balanced and energy[i] > 0 else manual[i] for i in range(n)] \
            if start is not None else [1.0] * n

        def loss(i, j):
            weights = {f"{m[len(prefix):]}.weight": w0[m] + delta(m) for m in here}
            errors, tokens = 0.0, 0
            for s in batches[i][j]:
                y = _run(block, weights, ins[i][s], ins[i][s]["x"])
                errors = errors + (y - outs[i][s]["out"][0]).pow(2).sum()
                tokens += y.shape[0]
            return weight[i] * (errors / tokens if balanced else errors)

        flat = [t for m in here for t in params[m]]
        kept = [t.detach().clone() for t in flat]
        with torch.no_grad():
            before = sum(float(loss(i, j)) for i, j in pairs)
        optimizer = torch.optim.Adam(
            [{"params": [t], "lr": lr * (float(t.detach().pow(2).mean().sqrt()) or 1.0) if relative_lr else lr}
             for t in flat])
        generator = torch.Generator().manual_seed(seed)
        order = []
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(pairs), generator=generator).tolist()
            i, j = pairs[order.pop()]
            optimizer.zero_grad()
            loss(i, j).backward()
            optimizer.step()
        with torch.no_grad():
            after = sum(float(loss(i, j)) for i, j in pairs) if steps else before
            if not after <= before or math.isnan(after):
                for t, s in zip(flat, kept):
                    t.copy_(s)
            for m in here:
                merged_weights[m] = delta(m).detach()
    return merged_weights


def _detached(d):
    return None if d is None else d.detach()
