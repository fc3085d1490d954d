"""Architecture figures for the ``iteris`` package (or any package directory): its import graph, loops,
floors, layering, module and function sizes, and public bool-flag parameters.

Module names are dotted and relative to the package root (``merge``, ``engine.stats``); a package's
``__init__.py`` is the package's name (``engine``), the root's own ``__init__.py`` is ``__init__``.
An edge ``a -> b`` is any import of ``b`` anywhere in ``a``, function bodies included (lazy imports);
``from .pkg import name`` imports ``pkg.name`` when that is a module, else ``pkg`` itself. Imports under
``if TYPE_CHECKING:`` are not runtime edges: ``typing_graph`` reports them apart. Only the imported
module counts, not the packages above it that Python also initialises.

    python tests/helpers/architecture.py [ROOT]          # summary of ROOT (default: the iteris package)
    python tests/helpers/architecture.py --git c3793a1   # summary of src/iteris as of that commit
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

PACKAGE = "iteris"
REPO = Path(__file__).resolve().parents[2]


def default_root() -> Path:
    try:
        import iteris

        return Path(iteris.__file__).parent
    except ImportError:  # not installed: the checkout's own source
        return REPO / "src" / PACKAGE


def _name(parts: tuple[str, ...]) -> str:
    return ".".join(parts) or "__init__"


def _modules(root: Path) -> dict[tuple[str, ...], Path]:
    """Module parts (``("engine", "stats")``; a package's ``__init__`` is the package's parts) -> file."""
    out = {}
    for path in sorted(Path(root).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[parts[:-1] if parts[-1] == "__init__" else parts] = path
    return out


def _targets(node, parts, path, mods, package) -> set[tuple[str, ...]]:
    """The package modules one ``import`` / ``from ... import`` statement of module ``parts`` imports."""
    if isinstance(node, ast.Import):  # import iteris.a.b
        dotted = [a.name.split(".") for a in node.names]
        return {tuple(d[1:]) for d in dotted if d[0] == package and tuple(d[1:]) in mods}
    if node.level == 0:
        dotted = (node.module or "").split(".")
        if dotted[0] != package:
            return set()
        base = tuple(dotted[1:])
    else:
        pkg = parts if path.name == "__init__.py" else parts[:-1]
        if node.level - 1 > len(pkg):
            return set()  # above the package root
        base = pkg[: len(pkg) - (node.level - 1)] + (tuple(node.module.split(".")) if node.module else ())
    found = {base + (a.name,) if base + (a.name,) in mods else base for a in node.names}
    return found & mods.keys()


def _graphs(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(runtime graph, typing-only graph) over every module of ``root`` (absolute imports: ``root``'s name)."""
    root = Path(root)
    mods, package = _modules(root), root.resolve().name
    runtime = {_name(p): set() for p in mods}
    typed = {_name(p): set() for p in mods}

    for parts, path in mods.items():

        def visit(node, typing_only):
            test = getattr(node, "test", None)  # if TYPE_CHECKING: / if typing.TYPE_CHECKING:
            if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
                for child in node.body:
                    visit(child, True)
                for child in node.orelse:
                    visit(child, typing_only)
                return
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, parts, path, mods, package):
                    (typed if typing_only else runtime)[_name(parts)].add(_name(target))
            for child in ast.iter_child_nodes(node):
                visit(child, typing_only)

        visit(ast.parse(path.read_text(), str(path)), False)
    for name, deps in typed.items():
        deps -= runtime[name]  # imported at runtime elsewhere in the module too: a runtime edge
    return runtime, typed


def import_graph(root: Path | None = None) -> dict[str, set[str]]:
    return _graphs(root or default_root())[0]


def typing_graph(root: Path | None = None) -> dict[str, set[str]]:
    """Edges found only under ``if TYPE_CHECKING:`` (not runtime imports)."""
    return _graphs(root or default_root())[1]


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, every one (singletons too), dependencies first."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import loops: strongly connected components of more than one module, and self-imports."""
    return [c for c in _sccs(graph) if len(c) > 1 or c[0] in graph.get(c[0], ())]


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Module -> its floor: the longest import path below it once each loop is one node (0: imports nothing)."""
    floor = {}
    for comp in _sccs(graph):  # Tarjan gives each component after every one it imports
        below = {w for v in comp for w in graph.get(v, ())} - set(comp)
        level = 1 + max((floor[w] for w in below), default=-1)
        floor.update(dict.fromkeys(comp, level))
    return floor


class Violation(NamedTuple):
    module: str
    layer: str  # "unassigned" when the module matches no layer
    imports: str | None = None
    imports_layer: str | None = None


def layer_of(module: str, layers) -> int | None:
    return next((i for i, (_, pats) in enumerate(layers) if any(fnmatch.fnmatchcase(module, p) for p in pats)), None)


def layer_violations(graph: dict[str, set[str]], layers: list[tuple[str, list[str]]]) -> list[Violation]:
    """Imports of a higher layer than the importer's (``layers`` lowest first), and modules in no layer."""
    where = {m: layer_of(m, layers) for m in set(graph) | {w for ds in graph.values() for w in ds}}
    out = [Violation(m, "unassigned") for m in sorted(where) if where[m] is None]
    for m in sorted(graph):
        for w in sorted(graph[m]):
            if where[m] is not None and where[w] is not None and where[w] > where[m]:
                out.append(Violation(m, layers[where[m]][0], w, layers[where[w]][0]))
    return out


def module_lines(root: Path | None = None) -> dict[str, int]:
    """Module -> physical lines, as ``wc -l`` counts them."""
    return {_name(p): path.read_bytes().count(b"\n") for p, path in _modules(root or default_root()).items()}


def _under(name: str, prefix: str | None) -> bool:
    return prefix is None or name == prefix.rstrip(".") or name.startswith(prefix)


def _defs(body, qual=""):
    """(qualified name, node) for every function below ``body``: methods and nested functions too."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{qual}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _defs(node.body, name + ".")


def function_lengths(root: Path | None = None, prefix: str | None = None) -> list[tuple[str, str, int]]:
    """(module, qualified function name, lines from ``def`` to its last line) for every function, longest first."""
    out = []
    for parts, path in _modules(root or default_root()).items():
        if _under(_name(parts), prefix):
            tree = ast.parse(path.read_text(), str(path))
            out += [(_name(parts), q, n.end_lineno - n.lineno + 1) for q, n in _defs(tree.body)]
    return sorted(out, key=lambda r: (-r[2], r[0], r[1]))


def _public_defs(body, qual=""):
    """Module-level functions and methods of classes, all of public names (nested functions excluded)."""
    for node in body:
        if getattr(node, "name", "_").startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            yield from _public_defs(node.body, f"{qual}{node.name}.")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{qual}{node.name}", node


_BOOL = {"bool", "bool | None", "None | bool", "Optional[bool]", "typing.Optional[bool]"}


def bool_flag_params(root: Path | None = None, module_prefix: str | None = None) -> list[tuple[str, str, str]]:
    """(module, function, parameter) for public parameters annotated ``bool`` or defaulting to True/False."""
    out = []
    for parts, path in _modules(root or default_root()).items():
        if not _under(_name(parts), module_prefix):
            continue
        for qual, fn in _public_defs(ast.parse(path.read_text(), str(path)).body):
            a = fn.args
            positional = a.posonlyargs + a.args
            defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
            for arg, default in [*zip(positional, defaults), *zip(a.kwonlyargs, a.kw_defaults)]:
                ann = ast.unparse(arg.annotation).strip("'\"") if arg.annotation else ""
                flag = isinstance(default, ast.Constant) and isinstance(default.value, bool)
                if ann in _BOOL or flag:
                    out.append((_name(parts), qual, arg.arg))
    return out


def summary(root: Path | None = None) -> dict:
    root = Path(root or default_root())
    graph, typed = _graphs(root)
    loops, lines, fns = cycles(graph), module_lines(root), function_lengths(root)
    return {
        "modules": len(graph),
        "floors": 1 + max(floors(graph).values(), default=-1),
        "imports": sum(map(len, graph.values())),
        "typing-only imports": sum(map(len, typed.values())),
        "loops": len(loops),
        "loop list": loops,
        "largest module": max(lines.items(), key=lambda kv: kv[1]),
        "largest function": (f"{fns[0][0]}.{fns[0][1]}", fns[0][2]) if fns else None,
        "total lines": sum(lines.values()),
    }


def _table(s: dict) -> str:
    show = {tuple: lambda v: f"{v[0]} ({v[1]} lines)", list: lambda v: "; ".join(" <-> ".join(c) for c in v) or "-"}
    return "\n".join(f"{k:<20} {show.get(type(v), str)(v)}" for k, v in s.items())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", type=Path, help="package directory (default: the iteris package)")
    ap.add_argument("--git", metavar="REV", help=f"summarise src/{PACKAGE} as of commit REV")
    args = ap.parse_args(argv)
    if args.git:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.git, f"src/{PACKAGE}"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            print(f"{PACKAGE} at {args.git}\n" + _table(summary(Path(tmp) / "src" / PACKAGE)))
    else:
        print(f"{args.root or default_root()}\n" + _table(summary(args.root)))


if __name__ == "__main__":
    main(sys.argv[1:])
