"""Guards against non-finite numbers where they enter or can arise: a NaN anywhere spreads through every
solve that reads it, so each is stopped where it first appears and named, and nothing non-finite is written."""

from __future__ import annotations

import torch

from .errors import IterisError

# A LoRA update beyond this (Frobenius-norm bound) overflows the float32 arithmetic of every merge
FLOAT32_MAX = torch.finfo(torch.float32).max


def count_bad(t: torch.Tensor) -> int:
    """Non-finite entries of a floating tensor (0 for any other dtype)."""
    if not t.is_floating_point() and not t.is_complex():
        return 0
    return int((~torch.isfinite(t)).sum())


def require_finite(t: torch.Tensor, what: str, fix: str = "") -> None:
    bad = count_bad(t)
    if bad:
        raise IterisError(f"{what} holds {bad} non-finite value(s) (NaN or Inf){'; ' + fix if fix else ''}")


def all_finite(tensors) -> bool:
    """One host sync for many tensors (on the GPU, one per device). Through each tensor's smallest and
    largest entry, which are NaN or infinite where any entry is: no tensor of flags as large as the tensor."""
    flags = [torch.isfinite(torch.stack(torch.aminmax(t))).all() for t in tensors
             if t is not None and t.is_floating_point() and t.numel()]
    if not flags:
        return True
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for f in flags:
        by_device.setdefault(f.device, []).append(f)
    return all(bool(torch.stack(fs).all()) for fs in by_device.values())


def check_parameters(model: torch.nn.Module, where: str) -> None:
    """Every floating parameter finite: a NaN or Inf in any base weight (an embedding row, a norm) poisons
    every activation that passes it."""
    params = [(name, _local(p)) for name, p in model.named_parameters()]
    if all_finite(t for _, t in params):
        return
    for name, t in params:
        require_finite(t, f"{where}: parameter '{name}'", "the model's weights are corrupt; re-download or re-save them")


def _local(p: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's local rows (each process checks its own)."""
    to_local = getattr(p, "to_local", None)
    return to_local() if callable(to_local) else p


def check_deltas(deltas: dict, when: str, written_as: torch.dtype | None = None) -> None:
    """Every factor (or dense update) of a set of merged layers finite (``written_as``: also once cast to the
    dtype they are written in, where a float64 number beyond float32's range would become Inf)."""
    cast = (lambda t: t.to(written_as)) if written_as is not None else (lambda t: t)
    tensors = {name: [cast(t) for t in vars(d).values() if isinstance(t, torch.Tensor)] for name, d in deltas.items()}
    if all_finite(t for ts in tensors.values() for t in ts):
        return
    bad = sorted(name for name, ts in tensors.items() if not all_finite(ts))
    raise IterisError(
        f"{when}: the merged update of {len(bad)} layer(s) is not finite (first: '{bad[0]}'), so nothing is written. "
        "The least-squares problem is singular or overflows: raise alpha1/alpha2, check the adapters' weights, "
        "or use stats_dtype: float64"
    )


def statistics_tensors(st) -> list[torch.Tensor]:
    """What of one task's statistics for a layer group shows a non-finite input: the Gram's diagonal (a NaN or
    Inf anywhere in the inputs, or a square that overflows, reaches it), the kept inputs, the projections,
    the norms."""
    out = []
    if st.gram is not None:
        out.append(st.gram.diagonal())
    for t in (st.packed, st.rows, st.cross_norm):
        if isinstance(t, torch.Tensor):
            out.append(t)
    out += list(st.proj.values()) + list(st.own_proj.values())
    out += [torch.tensor(v, dtype=torch.float64) for v in st.out_sq.values()]
    return out


class NonFiniteOutputs(IterisError):
    """A model's outputs (logits) are not finite; the caller names the model and the data."""

    def __init__(self, where: str = ""):
        super().__init__(f"the model's outputs are not finite (NaN or Inf){where}")


class FiniteWatch:
    """A generation logits processor that notes, without a host sync per step, whether any logits were not
    finite (greedy decoding would otherwise turn them into a token quietly)."""

    def __init__(self):
        self.bad: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        # per row (the record can be named); -inf alone is a mask generation's own processors set (suppressed
        # tokens, min_new_tokens), not an overflow, unless the whole row is -inf
        flag = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1) | torch.isneginf(scores).all(dim=-1)
        self.bad = flag if self.bad is None else self.bad | flag
        return scores

    def check(self, origins: list | None = None) -> None:
        """Raises where any step's logits were not finite, naming the first such row's record (``origins``)."""
        if self.bad is None or not bool(self.bad.any()):
            return
        row = int(self.bad.nonzero()[0, 0])
        origin = origins[row] if origins and row < len(origins) else None
        raise NonFiniteOutputs(f" while writing a continuation of {origin}" if origin else "")


class NonFiniteStatistics(IterisError):
    """A task's statistics for a layer group are not finite; the engine names the sample that caused it."""

    def __init__(self, task: int, group: str):
        super().__init__(f"task {task}, layer '{group}'")
        self.task = task
        self.group = group


def check_statistics(per_task: list[dict], groups: list[str]) -> None:
    tensors = [t for stats in per_task for g in groups if g in stats for t in statistics_tensors(stats[g])]
    if all_finite(tensors):
        return
    for task, stats in enumerate(per_task):
        for g in groups:
            if g in stats and not all_finite(statistics_tensors(stats[g])):
                raise NonFiniteStatistics(task, g)
