"""Merge LoRA adapters into one with IterIS and the usual baselines.

Names are imported on first use, so that ``iteris.cli`` starts without loading torch: an interrupt while the
heavy libraries load is then answered like any other."""

import importlib
import sys
import types

from .errors import IterisError

__all__ = ["merge", "add_merged_adapter", "MergeResult", "MergeConfig", "load_config", "IterisError", "METHODS"]
__version__ = "0.1.0"

_LAZY = {
    "merge": ("merge", "merge"),
    "add_merged_adapter": ("live", "add_merged_adapter"),
    "MergeResult": ("merge", "MergeResult"),
    "MergeConfig": ("config", "MergeConfig"),
    "load_config": ("config", "load_config"),
    "METHODS": ("methods", "REGISTRY"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'iteris' has no attribute '{name}'")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


class _Package(types.ModuleType):
    """``iteris.merge`` stays the function when the submodule of that name is imported (it lives on in
    ``sys.modules``), as it was when the package imported everything at once."""

    def __setattr__(self, name, value):
        if name == "merge" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
