"""AdaMerging written the plain way, in float64: the merged classifier is the base with W0 + sum_i lambda_i w_i dW_i
in its weights (dW_i from PEFT itself) and task i's own head, called through ``torch.func.functional_call`` one
sample at a time (no padding). Shared with iteris: only the batching of each task's calibration samples (in
order, ``batch_size`` at a time) and the step's batch (step s takes batch s mod the task's count)."""

import torch
from torch.func import functional_call

from tests.helpers.reference import _inputs, load_peft, peft_delta, w0

F64 = torch.float64


def _heads(peft_model, n):
    """Each adapter's modules_to_save tensors by the base model's parameter path."""
    heads = [{} for _ in range(n)]
    for name, p in peft_model.named_parameters():
        for i in range(n):
            marker = f".modules_to_save.a{i}."
            if marker in name:
                path = name.replace("base_model.model.", "", 1).replace(marker, ".")
                heads[i][path] = p.detach().to(F64)
    return heads


def reference_adamerging(base_dir, family, adapter_dirs, task_samples, tokenizer, names, batch_size, steps, lr,
                         init, manual=None):
    base, peft_model = load_peft(base_dir, family, adapter_dirs)
    n = len(adapter_dirs)
    manual = manual or [1.0] * n
    own = {m: [(i, manual[i] * d) for i in range(n) if (d := peft_delta(peft_model, m, f"a{i}")) is not None]
           for m in names}
    heads = _heads(peft_model, n)
    lam = {m: torch.full((len(own[m]),), init, dtype=F64, requires_grad=True) for m in names}
    batches = [[samples[s:s + batch_size] for s in range(0, len(samples), batch_size)] for samples in task_samples]

    def entropy_of(i, batch):
        weights = {f"{m}.weight": w0(base, m) + sum(l * d for l, (_, d) in zip(lam[m], own[m])) for m in names}
        weights.update(heads[i])
        logits = torch.cat([functional_call(base, weights, (), _inputs(tokenizer, family, text, target)).logits
                            for text, target in batch])
        return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()

    optimizer = torch.optim.Adam(list(lam.values()), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        sum(entropy_of(i, b[step % len(b)]) for i, b in enumerate(batches)).backward()
        optimizer.step()
        with torch.no_grad():
            for t in lam.values():
                t.clamp_(0.0, 1.0)
    with torch.no_grad():
        return {m: sum(l * d for l, (_, d) in zip(lam[m], own[m])) for m in names}
