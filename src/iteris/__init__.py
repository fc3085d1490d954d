"""Merge LoRA adapters into one with IterIS and the usual baselines."""

from .config import MergeConfig, load_config
from .errors import IterisError
from .merge import MergeResult, merge
from .methods import REGISTRY as METHODS

__all__ = ["merge", "MergeResult", "MergeConfig", "load_config", "IterisError", "METHODS"]
__version__ = "0.1.0"
