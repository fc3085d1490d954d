"""One registry for every merge method, one signature: ``fn(ctx) -> {layer name: delta}``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..adapters import LoraAdapter
from ..deltas import DenseDelta, LowRankDelta
from ..engine import Sweeps
from ..errors import IterisError
from ..schema import build

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
    engine: Sweeps | None = None  # data-aware methods sweep the model through it
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
    # report keys holding one entry per layer: with several processes, each rank's (for the layers it solved)
    # are joined into one
    per_layer_report: tuple[str, ...] = ()
    # a sentence for the merge's summary from what the method reported (None: nothing to add)
    describe_report: Callable[[dict], str | None] = lambda report: None

    def parse_params(self, values: dict | None) -> Any:
        """The method's parameters through the same typed path as the config (``schema.build``)."""
        try:
            params = build(self.params_cls, values if values is not None else {}, "parameters")
        except IterisError as exc:
            raise IterisError(f"method '{self.name}': {exc} (run `iteris methods`)") from None
        check = getattr(params, "validate", None)
        if check:
            check()
        return params

    def describe(self) -> list[tuple[str, str, str]]:
        return [(f.name, repr(f.default), f.metadata.get("help", "")) for f in dataclasses.fields(self.params_cls)]


REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, params: type, summary: str, needs_calibration: bool = False, aliases: tuple[str, ...] = (),
             per_layer_report: tuple[str, ...] = (), describe_report: Callable[[dict], str | None] | None = None):
    def wrap(fn):
        REGISTRY[name] = MethodSpec(name, summary, params, needs_calibration, fn, aliases, per_layer_report,
                                    describe_report or (lambda report: None))
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    key = _ALIASES.get(name, name)
    if key not in REGISTRY:
        raise IterisError(f"unknown method '{name}'; available: {', '.join(sorted(REGISTRY))} (run `iteris methods`)")
    return REGISTRY[key]
