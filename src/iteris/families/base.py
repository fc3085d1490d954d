"""What every family gives the one orchestrator (``merge.py``): a job that holds the loaded models as
``Unit``s (one per model the method runs on), is told of each unit's merged result, and builds the result
that saves atomically."""

from __future__ import annotations

from typing import Protocol

from ..deltas import LowRankDelta
from ..run import Unit


class Job(Protocol):
    units: list[Unit]
    report: dict

    def before(self, unit: Unit, merged: dict[str, dict[str, LowRankDelta]]) -> None:
        """Anything a unit needs of the units merged before it (a denoiser: the merged text encoders)."""

    def finish(self, merged: dict[str, dict[str, LowRankDelta]], errors: dict[str, dict[str, float]], t0: float):
        """The result (with ``save(out, force)``) from every unit's merged LoRA and compression errors."""

    def close(self) -> None:
        """Free what the units hold (hooks), whether or not the merge finished."""
