"""RegMean++ written the plain way, in float64: for block k, each adapter's features are those of a copy of
the base whose earlier blocks hold the merged weights and whose later blocks hold the adapter's own
(W0 + dW written into the weights), run one sample at a time; block k is then solved by RegMean. It shares
no code with iteris (the helpers it uses from ``reference`` rely on transformers, peft and torch only)."""

import re

import torch

from tests.helpers.reference import features, load_peft, merged_copy, peft_delta


def reference_regmean_plusplus(base_dir, family, adapter_dirs, task_samples, tokenizer, names, reduction):
    base, peft_model = load_peft(base_dir, family, adapter_dirs)
    own = [{n: peft_delta(peft_model, n, f"a{i}") for n in names} for i in range(len(adapter_dirs))]
    block = {n: int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in names}
    merged: dict = {}
    for k in sorted(set(block.values())):
        here = [n for n in names if block[n] == k]
        grams = {n: [] for n in here}
        for i, samples in enumerate(task_samples):
            weights = dict(merged)
            weights.update({n: d for n, d in own[i].items() if block[n] >= k and d is not None})
            hybrid = merged_copy(base, weights)
            found = features(hybrid, hybrid, here, tokenizer, family, samples)
            for n in here:
                G = found[n].T @ found[n]
                grams[n].append(reduction * G + (1 - reduction) * torch.diag(torch.diag(G)))
        for n in here:
            num = sum(own[i][n] @ G for i, G in enumerate(grams[n]) if own[i][n] is not None)
            merged[n] = num @ torch.linalg.inv(sum(grams[n]))
    return merged
