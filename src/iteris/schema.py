"""One typed path from loose values (YAML, dicts, keyword overrides) to the config and parameter dataclasses.

The dataclasses keep plain annotations (``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, unions,
lists); pydantic checks values against a strict reading of them: a boolean is ``true`` or ``false`` (never
the string ``'false'``, which would read as true), an integer is an integer, a number is finite (a string
such as ``'1e-7'`` is read as the number it spells, since YAML 1.1 leaves exponents without a dot as
strings), text is a string, unknown keys are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import reprlib
import types
import typing
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BeforeValidator, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError

from .errors import IterisError

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxdict = _short.maxtuple = _short.maxset = 4
_short.maxlevel = 2


def short(value) -> str:
    """A value as an error message may quote it: bounded, whatever the user's input holds."""
    return _short.repr(value)


def _number_from_text(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, Strict(), BeforeValidator(_number_from_text)]


def _strict(hint):
    """The strict pydantic type for a plain annotation."""
    if hint is bool:
        return StrictBool
    if hint is int:
        return StrictInt
    if hint is float:
        return Number
    if hint is str:
        return StrictStr
    if dataclasses.is_dataclass(hint):
        return _model(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return Union[tuple(_strict(a) for a in args)]
    if origin is list:
        return list[_strict(args[0])] if args else list
    if hint is type(None) or origin is Literal or hint is Any or origin is dict or hint is dict:
        return hint
    raise TypeError(f"no strict reading of {hint!r}")  # a new annotation: teach _strict about it


@functools.cache
def _model(cls) -> type[pydantic.BaseModel]:
    hints = typing.get_type_hints(cls, include_extras=False)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = pydantic.Field(default_factory=f.default_factory)
        else:
            default = ...
        fields[f.name] = (_strict(hints[f.name]), default)
    config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)
    return pydantic.create_model(f"{cls.__name__}Schema", __config__=config, **fields)


def _instance(cls, validated: pydantic.BaseModel):
    hints = typing.get_type_hints(cls)
    values = {f.name: _plain(hints[f.name], getattr(validated, f.name)) for f in dataclasses.fields(cls) if f.init}
    return cls(**values)


def _plain(hint, value):
    """Validated models back into the dataclasses they stand for."""
    if isinstance(value, pydantic.BaseModel):
        for option in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(option) and isinstance(value, _model(option)):
                return _instance(option, value)
    if isinstance(value, list):
        inner = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is list]
        item = typing.get_args(inner[0])[0] if inner and typing.get_args(inner[0]) else Any
        return [_plain(item, v) for v in value]
    return value


def build(cls, values, where: str):
    """``cls(**values)`` after every value has been checked against the field's annotation; one line of error."""
    if not isinstance(values, dict):
        raise IterisError(f"{where} must be a mapping of keys to values, got {type(values).__name__} {short(values)}")
    try:
        validated = _model(cls).model_validate(values)
    except ValidationError as exc:
        raise IterisError(_explain(exc, cls, where)) from None
    return _instance(cls, validated)


def _location(where: str, loc: tuple) -> str:
    text = where
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "lax-", "json-")) and part not in _TYPE_TAGS:
            text += f".{part}" if text else part
    return text


# pydantic names the branch of a union it tried in the location; those names say nothing to a user
_TYPE_TAGS = {"int", "float", "str", "bool", "list[int]", "list[str]", "list[float]", "constrained-float"}


def _explain(exc: ValidationError, cls, where: str) -> str:
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        first = unknown[0]
        owner = _owner(cls, first["loc"][:-1])
        keys = sorted(f.name for f in dataclasses.fields(owner)) if owner else []
        names = [str(e["loc"][-1]) for e in unknown]
        return f"{_location(where, first['loc'][:-1]) or 'the config'}: unknown key(s) {names}; valid keys are {keys}"
    first = errors[0]
    place = _location(where, first["loc"])
    if first["type"] == "missing":
        return f"{place}: missing; it is required"
    wanted = _wanted(first)
    got = first.get("input")
    kind = "a string " if isinstance(got, str) else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{place} must be {wanted}, got {kind}{short(got)}{more}"


def _wanted(error: dict) -> str:
    kind = error["type"]
    if kind.startswith("bool"):
        return "true or false (unquoted)"
    if kind.startswith("int"):
        return "an integer"
    if kind.startswith("float") or kind == "finite_number":
        return "a finite number"
    if kind.startswith("string"):
        return "a string"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"one of {expected}"
    if kind.startswith("list"):
        return "a list"
    if kind.startswith("dict") or kind.startswith("model"):
        return "a mapping"
    return error["msg"].removeprefix("Input should be ").lower()


def _owner(cls, loc: tuple):
    """The dataclass a location inside ``cls`` points into (for the list of its valid keys)."""
    current = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not dataclasses.is_dataclass(current):
            return None
        hint = typing.get_type_hints(current).get(part)
        current = _dataclass_in(hint)
    return current if dataclasses.is_dataclass(current) else None


def _dataclass_in(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None
