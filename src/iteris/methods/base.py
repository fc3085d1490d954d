"""One registry for every merge method, one signature: ``fn(ctx) -> {layer name: delta}``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from ..adapters import LoraAdapter
from ..deltas import DenseDelta, LowRankDelta
from ..errors import IterisError

Deltas = dict[str, LowRankDelta | DenseDelta]


def param(default, help: str, **kwargs):
    """A method parameter: its default and the one line `iteris methods` prints for it."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class MergeContext:
    adapters: list[LoraAdapter]
    weights: list[float]  # the user's per-adapter weights (manual coefficients)
    targets: list[str]  # union of every adapter's target layers
    params: Any
    calibration: Any = None  # merge.Calibration for data-aware methods
    report: dict = field(default_factory=dict)  # methods add what they measured
    progress: bool = True
    device: str = "cpu"  # where element-wise methods may do their arithmetic

    def loras(self, name: str):
        """Each adapter's LoRA on a layer, None where it does not touch the layer."""
        return [a.modules.get(name) for a in self.adapters]


@dataclass
class MethodSpec:
    name: str
    summary: str
    params_cls: type
    needs_calibration: bool
    fn: Callable[[MergeContext], Deltas]
    aliases: tuple[str, ...] = ()

    def parse_params(self, values: dict | None) -> Any:
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(self.params_cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise IterisError(
                f"method '{self.name}' has no parameter(s) {unknown}; its parameters are {sorted(known)} "
                "(run `iteris methods`)"
            )
        hints = typing.get_type_hints(self.params_cls)
        coerced = {k: _coerce(self.name, k, v, hints[k]) for k, v in values.items()}
        params = self.params_cls(**coerced)
        check = getattr(params, "validate", None)
        if check:
            check()
        return params

    def describe(self) -> list[tuple[str, str, str]]:
        return [(f.name, repr(f.default), f.metadata.get("help", "")) for f in dataclasses.fields(self.params_cls)]


def _coerce(method: str, name: str, value, hint):
    """YAML gives '1e-7' as a string and ints for floats: accept what a person would write, refuse the rest."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        try:
            if option is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
                    return value.lower() in ("true", "yes", "on")
                if value in (0, 1):
                    return bool(value)
                continue
            if option is int and isinstance(value, (int, str)) and not isinstance(value, bool):
                return int(value)
            if option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                number = float(value)
                if math.isfinite(number):
                    return number
                continue
            if option is str and isinstance(value, str):
                return value
        except ValueError:
            continue
    raise IterisError(f"method '{method}': parameter '{name}' must be {hint}, got {value!r}")


REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, params: type, summary: str, needs_calibration: bool = False, aliases: tuple[str, ...] = ()):
    def wrap(fn):
        REGISTRY[name] = MethodSpec(name, summary, params, needs_calibration, fn, aliases)
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    key = _ALIASES.get(name, name)
    if key not in REGISTRY:
        raise IterisError(f"unknown method '{name}'; available: {', '.join(sorted(REGISTRY))} (run `iteris methods`)")
    return REGISTRY[key]
