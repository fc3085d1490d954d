"""The package's architecture (``tests/helpers/architecture.py``): no import loops, the layering below, small modules
and functions, no public bool flags in the engine; and the checker's own tests on a small package."""

import textwrap

import pytest

from tests.helpers import architecture as arch

# Lowest first: a module may import its own layer or lower ones only (ARCHITECTURE.md draws the same house).
LAYERS = [
    ("ground", ["errors", "files", "precision", "deltas", "metrics", "schema", "finite", "solve", "placement"]),
    ("inputs", ["config", "adapters", "data"]),
    ("engine", ["engine", "engine.*"]),
    ("methods", ["methods", "methods.*"]),
    ("run", ["run"]),
    ("families", ["families", "families.*", "output", "card", "plots"]),
    ("scoring", ["scoring", "evaluate"]),
    ("orchestrator", ["merge", "live", "plan"]),
    ("face", ["cli", "__main__", "demo", "assets", "__init__"]),
]
MAX_MODULE_LINES = 500
MAX_ENGINE_FUNCTION_LINES = 60


@pytest.fixture(scope="module")
def graph():
    return arch.import_graph(arch.default_root())


# -- the package -------------------------------------------------------------------------------------------


def _none(found):
    assert not found, f"{len(found)} found:\n  " + "\n  ".join(map(str, found))


def test_no_import_loops(graph):
    _none([" <-> ".join(loop) for loop in arch.cycles(graph)])


def test_layering(graph):
    _none([f"{v.module} ({v.layer}) imports {v.imports} ({v.imports_layer})" if v.imports else f"{v.module}: no layer"
           for v in arch.layer_violations(graph, LAYERS)])


def test_modules_are_small():
    _none([f"{m}: {n} lines" for m, n in arch.module_lines(arch.default_root()).items() if n > MAX_MODULE_LINES])


def test_engine_functions_are_short():
    long = arch.function_lengths(arch.default_root(), prefix="engine.")
    _none([f"{m}.{q}: {n} lines" for m, q, n in long if n > MAX_ENGINE_FUNCTION_LINES])


def test_engine_has_no_public_bool_flags():
    _none([f"{m}.{q}({p})" for m, q, p in arch.bool_flag_params(arch.default_root(), "engine.")])


# -- the checker itself ------------------------------------------------------------------------------------


def _package(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def pkg(tmp_path):
    return _package(tmp_path / "pkg", {
        "__init__.py": "from .a import f\n",
        "a.py": """
            import os


            def f():
                from .sub import c  # lazy: closes the loop a -> sub.c -> a
                return c
        """,
        "sub/__init__.py": "HELPER = 1\n",
        "sub/c.py": """
            from .. import a
            from . import HELPER  # a name, not a module: the package sub
        """,
        "b.py": """
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from .d import Thing
            else:
                from . import errors
        """,
        "d.py": """
            import pkg.errors
            from pkg.sub.c import a
            from .sub import c, HELPER


            class Thing:
                def run(self, x, fast=False, *, strict: bool = True, n: int = 2):
                    return x

                def _hidden(self, flag=True):
                    return flag


            class _Private:
                def go(self, flag=True):
                    return flag


            def public(loud: bool, count=3):
                pass
        """,
        "errors.py": "",
    })


def test_graph_resolves_relative_absolute_and_lazy_imports(pkg):
    assert arch.import_graph(pkg) == {
        "__init__": {"a"},
        "a": {"sub.c"},
        "sub": set(),
        "sub.c": {"a", "sub"},
        "b": {"errors"},
        "d": {"errors", "sub.c", "sub"},
        "errors": set(),
    }


def test_type_checking_imports_are_not_edges(pkg):
    assert arch.typing_graph(pkg)["b"] == {"d"}
    assert "d" not in arch.import_graph(pkg)["b"]


def test_cycles_include_lazy_loops_and_self_loops(pkg):
    assert arch.cycles(arch.import_graph(pkg)) == [["a", "sub.c"]]
    assert arch.cycles({"x": {"x"}, "y": {"x"}}) == [["x"]]


def test_floors_contract_loops():
    graph = {"base": set(), "p": {"base", "q"}, "q": {"p"}, "top": {"q", "base"}, "lone": set()}
    assert arch.floors(graph) == {"base": 0, "lone": 0, "p": 1, "q": 1, "top": 2}


def test_layer_violations():
    layers = [("low", ["errors", "util.*"]), ("high", ["app", "app.*"])]
    graph = {"errors": {"app.main"}, "util.x": {"errors"}, "app": {"app.main", "util.x"}, "app.main": {"stray"},
             "stray": set()}
    assert arch.layer_violations(graph, layers) == [
        arch.Violation("stray", "unassigned"),
        arch.Violation("errors", "low", "app.main", "high"),
    ]


def test_sizes_and_bool_flags(pkg):
    assert arch.module_lines(pkg)["__init__"] == 1
    lengths = {(m, q): n for m, q, n in arch.function_lengths(pkg)}
    assert lengths[("a", "f")] == 3 and lengths[("d", "Thing.run")] == 2
    assert [q for m, q, n in arch.function_lengths(pkg, prefix="sub.")] == []
    assert arch.bool_flag_params(pkg, "d") == [("d", "Thing.run", "fast"), ("d", "Thing.run", "strict"),
                                               ("d", "public", "loud")]
    s = arch.summary(pkg)
    assert (s["modules"], s["floors"], s["imports"], s["loops"]) == (7, 3, 8, 1)
    assert s["largest function"] == ("a.f", 3)
