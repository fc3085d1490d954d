"""Error path only: when a stage's statistics are not finite, say which adapter, layer and sample is to
blame, and whether the base model alone is fine there."""

from __future__ import annotations

import torch

from ..finite import NonFiniteStatistics
from .forward import StopForward, run_forward
from .inject import MERGED, Variant, own

_FACTORS = "check its lora_A and lora_B (factors of very different sizes overflow even when their product is moderate)"


def explain(engine, exc: NonFiniteStatistics, label: str) -> str:
    """One message for non-finite statistics of ``exc.group`` on adapter ``exc.task``'s data."""
    task = engine.task_names[exc.task]
    found = _non_finite_sample(engine, exc.task, exc.group)
    what, culprit = "inputs", ""
    advice = ("Check that sample, the base model's weights (an embedding row), or the dtype (activations that "
              "overflow in float16: use dtype: float32 or bfloat16)")
    if found == ():
        what, culprit = "statistics", ", though every sample's inputs there are finite"
        advice = (f"What overflows are the statistics that involve adapter '{task}''s update (its inputs projected "
                  f"on lora_A, or the layer's outputs with the update): {_FACTORS}")
    elif found is not None:
        sample, variant, in_base = found
        model = "the merged" if variant == MERGED else "its own"
        culprit = f"; {getattr(sample, 'origin', None) or 'one of its samples'} gives them in {model} model"
        if in_base:
            culprit += " but not in the base model"
            advice = (f"adapter '{task}''s update overflows there: {_FACTORS}" if variant != MERGED
                      else "the merged update overflows there: raise alpha1/alpha2")
    return (f"{label}: the {what} of layer '{exc.group}' are not finite (NaN or Inf) on adapter '{task}''s "
            f"calibration data{culprit}. {advice}")


def _non_finite_sample(engine, task: int, group: str):
    """The first of a task's samples whose input to ``group`` is not finite, run alone through the adapter's
    own model, then the merged one, and whether the base model alone gives it finite inputs there; () if
    every sample's inputs are finite; None where this cannot be run here (several processes)."""
    if engine.ranks is not None or engine.sharded:
        return None
    seen: list[bool] = []

    def hook(module, args):
        seen.append(bool(torch.isfinite(args[0]).all()))
        raise StopForward

    def finite_in(variant: Variant | None, overrides, sample) -> bool:
        seen.clear()
        batch = next(iter(engine.batcher([sample], 1)))
        with engine.injector.use(variant, overrides):
            try:
                run_forward(engine.model, batch.for_merged() if variant == MERGED else batch)
            except StopForward:
                pass
        return not seen or seen[0]

    handle = engine.layers[group].register_forward_pre_hook(hook)
    try:
        for variant, overrides in ((own(task), engine.own_overrides[task]), (MERGED, engine.merged_overrides[task])):
            if variant not in engine.injector.variants:
                continue
            for sample in engine.task_samples[task]:
                if not finite_in(variant, overrides, sample):
                    return sample, variant, finite_in(None, {}, sample)
    finally:
        handle.remove()
    return ()
