"""What several test modules merge with: a float64 CPU merge config over saved tiny models, and the relative
difference they compare merged deltas by."""

import torch


def float64_config(base, adapters, data, method="iteris", parameters=None, weights=None, **extra):
    """IterIS with the paper's global rounds unless ``parameters`` name a schedule (the references are the
    paper's)."""
    weights = weights or [1.0] * len(adapters)
    parameters = {"schedule": "global", **(parameters or {})} if method == "iteris" else parameters or {}
    return {
        "base_model": str(base),
        "method": method,
        "parameters": parameters,
        "dtype": "float64",
        "device": "cpu",
        "calibration": {"samples": 100, "batch_size": 3, "stats_dtype": "float64", "max_length": 64},
        "adapters": [
            {"name": f"t{i}", "path": str(a), "data": str(d), "weight": w}
            for i, (a, d, w) in enumerate(zip(adapters, data, weights))
        ],
        "progress": False,
        **extra,
    }


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))
