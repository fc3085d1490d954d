"""Merge methods, all behind one registry (``REGISTRY``) and one signature."""

from . import adamerging, arithmetic, iteris, knots, prodistill, regmean, sparse, subspace, wudi  # noqa: F401  (registration)
from .base import REGISTRY, MergeContext, MethodSpec, get_method

__all__ = ["REGISTRY", "MergeContext", "MethodSpec", "get_method"]
