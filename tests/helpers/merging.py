"""What several test modules merge with: a float64 CPU merge config over saved tiny models, and the relative
difference they compare merged deltas by, and the order iteris draws calibration samples in."""

import json
import random

import torch


def float64_config(base, adapters, data, method="iteris", parameters=None, weights=None, **extra):
    """IterIS with the paper's global rounds unless ``parameters`` name a schedule (the references are the
    paper's), calibrated on the prompts alone (as the references are)."""
    weights = weights or [1.0] * len(adapters)
    parameters = {"schedule": "global", **(parameters or {})} if method == "iteris" else parameters or {}
    return {
        "base_model": str(base),
        "method": method,
        "parameters": parameters,
        "dtype": "float64",
        "device": "cpu",
        "calibration": {"samples": 100, "batch_size": 3, "stats_dtype": "float64", "max_length": 64, "generate": False},
        "adapters": [
            {"name": f"t{i}", "path": str(a), "data": str(d), "weight": w}
            for i, (a, d, w) in enumerate(zip(adapters, data, weights))
        ],
        "progress": False,
        **extra,
    }


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def samples_in_drawn_order(path):
    """A calibration file's texts in the order iteris draws them (calibration.seed 42): the batches, and so
    each optimiser step of a fit, hold the same samples."""
    texts = [(json.loads(line)["text"], None) for line in path.read_text().splitlines() if line.strip()]
    order = list(range(len(texts)))
    random.Random(42).shuffle(order)
    return [texts[i] for i in order]
