"""The engine: runs the base model as each adapter's own model and as the merged model, gathers what every
target layer receives, and hands each layer group's statistics to a method's solve, on a schedule.

Methods use ``CaptureSpec`` (what to gather), a schedule (``GlobalSweep``, ``SequentialSweep``,
``DistilledSweep``, ``WholeModelFit``) and the ``Sweeps`` protocol; families build an ``Engine`` from a model, its layers,
samples and a ``Batcher``.
"""

from .distill import BlockFit, ModelFit
from .engine import Engine, EngineOptions, GroupSolve, Sweeps
from .layers import LayerGroup
from .spec import CaptureSpec
from .stats import GroupStats
from .walk import DistilledSweep, GlobalSweep, MergedInputSweep, SequentialSweep, WholeModelFit

__all__ = ["BlockFit", "CaptureSpec", "DistilledSweep", "Engine", "EngineOptions", "GlobalSweep", "GroupSolve",
           "GroupStats", "LayerGroup", "MergedInputSweep", "ModelFit", "SequentialSweep",
           "Sweeps", "WholeModelFit"]
