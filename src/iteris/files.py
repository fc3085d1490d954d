"""Reading what users hand in, defensively: text that must be UTF-8, YAML without traps, JSON without NaN,
pickles that must hold nothing but tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .errors import IterisError

_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def read_text(path: str | Path, what: str) -> str:
    """A text file's contents, which must be UTF-8 (a leading byte-order mark is dropped)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise IterisError(f"cannot read {what} '{p}': {exc.strerror or exc}") from None
    return decode(raw, f"{what} '{p}'")


def decode(raw: bytes, where: str) -> str:
    for bom, name in _BOMS.items():
        if raw.startswith(bom):
            raise IterisError(f"{where} is {name} text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise IterisError(
            f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); save it as UTF-8"
        ) from None


# YAML nodes a config may expand to, aliases counted each time they are used: far above any real config,
# far below what an alias bomb (a few lines that expand to billions of nodes) would build
MAX_YAML_NODES = 100_000

# Scalars as YAML 1.2 reads them: YAML 1.1 (PyYAML's default) reads 1e-7 (no dot) as a string, on/off/yes/no
# as booleans (so `overlap: on` would not be the word on), 012 as octal and 1:30 as 90
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds what aliases expand to."""

    def construct_document(self, node):
        _check_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}  # (keys written out; those a merge key '<<' brings in may be overridden, as YAML says)
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise IterisError(f"line {key_node.start_mark.line + 1}: a mapping key must be plain text") from None
                if key in seen:
                    raise IterisError(
                        f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping "
                        f"(first at line {seen[key]}); keep one"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))


def _check_size(root) -> None:
    """Count the nodes the document expands to (each node's size computed once, so a bomb costs no time)."""
    sizes: dict[int, int] = {}

    def size(node, depth=0) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > 100:
            raise IterisError("the YAML nests deeper than 100 levels")
        sizes[key] = 1  # (a node that contains itself counts once)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        else:
            total = 1
        if total > MAX_YAML_NODES:
            raise IterisError(
                f"the YAML expands to more than {MAX_YAML_NODES} values (aliases repeat what they point to); "
                "write the config out without nested aliases"
            )
        sizes[key] = total
        return total

    size(root)


def load_yaml(path: str | Path, what: str = "config file"):
    text = read_text(path, what)
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader)
    except IterisError as exc:
        raise IterisError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise IterisError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise IterisError(f"{path}: the YAML nests too deeply") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def loads_json(text: str, where: str, constants: bool = False):
    """JSON as the standard defines it: NaN and Infinity are refused, not read as numbers (``constants``: read,
    for a caller that checks the numbers it uses and names the key)."""
    try:
        return json.loads(text, parse_constant=float if constants else _no_constant)
    except ValueError as exc:  # (JSONDecodeError is a ValueError)
        raise IterisError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise IterisError(f"{where}: the JSON nests too deeply") from None


def load_json(path: str | Path, what: str, constants: bool = False):
    return loads_json(read_text(path, what), f"{what} '{path}'", constants)


def check_pickle(path: str | Path, what: str) -> None:
    """Refuse a pickled checkpoint (``.bin``) that would need anything but tensors to load, without running it."""
    import zipfile

    import torch

    p = Path(path)
    if not zipfile.is_zipfile(p):
        return  # the legacy format: torch.load(weights_only=True) refuses anything but tensors when it reads it
    try:
        with p.open("rb") as fh:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(fh)
    except Exception as exc:  # noqa: BLE001  (any failure to read it is the same answer)
        raise IterisError(f"{what} '{p}' is not a readable PyTorch checkpoint ({type(exc).__name__}: {short_exc(exc)}); "
                          "use a .safetensors file") from None
    if unsafe:
        raise IterisError(
            f"{what} '{p}' is a pickle that asks to run code ({', '.join(sorted(unsafe)[:3])}); it is not loaded. "
            "Use a .safetensors file, or re-save the weights as plain tensors"
        )


def load_pickle_tensors(path: str | Path, what: str) -> dict:
    """A ``.bin`` state dict, tensors only (``weights_only``), after ``check_pickle``."""
    import torch

    check_pickle(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise IterisError(f"{what} '{path}' could not be read as tensors ({type(exc).__name__}: {short_exc(exc)})") from None


def short_exc(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
