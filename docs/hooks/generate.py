"""Pages written from the code at every build, so that the reference cannot drift from it: the
configuration keys (from the config classes and their comments), every method's parameters (from the
registry) and the architecture (ARCHITECTURE.md)."""

from __future__ import annotations

import dataclasses
import html
import inspect
import io
import tokenize
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]


def on_files(files, config):
    for name, text in (("configuration.md", configuration()), ("reference/methods.md", methods()),
                       ("architecture.md", architecture())):
        files.append(File.generated(config, name, content=text))
    return files


def _comments(cls) -> dict[str, str]:
    """Each field's trailing comment (and the comment lines just above it) in the class's source."""
    source = inspect.getsource(cls)
    found, pending, current = {}, [], None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
            current = tok.string
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if current is not None and tok.start[1] > 4:
                found[current] = " ".join(filter(None, [" ".join(pending), text]))
                pending, current = [], None
            elif tok.start[1] == 4:
                pending.append(text)
        elif tok.type == tokenize.NEWLINE:
            if current is not None and current not in found and pending:
                found[current] = " ".join(pending)
            if current is not None:
                pending = []
            current = None
    return found


def _fields_table(cls) -> str:
    comments = _comments(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            default = "(its own defaults)" if dataclasses.is_dataclass(value) else f"`{value!r}`"
        else:
            default = "required"
        kind = str(f.type).replace("|", "\\|")
        meaning = html.escape(comments.get(f.name, "")).replace("|", "/")
        rows.append(f"| `{f.name}` | `{kind}` | {default} | {meaning} |")
    return "\n".join(rows)


def configuration() -> str:
    from iteris.config import AdapterSpec, CalibrationConfig, MergeConfig
    from iteris.evaluate import EvalConfig, EvalModel, EvalTask

    parts = ["# Configuration reference", "",
             "Written from the config classes at every docs build. Every key is read strictly: an unknown key, a "
             "wrong type or a value out of range is an error naming the key, before any work starts. The merge "
             "config's `parameters:` belong to the method: see [Methods: parameters](reference/methods.md).", ""]
    for title, cls in (("Merge config (`iteris merge`)", MergeConfig), ("`adapters:` entries", AdapterSpec),
                       ("`calibration:`", CalibrationConfig), ("Eval config (`iteris eval`)", EvalConfig),
                       ("`tasks:` entries", EvalTask), ("`models:` entries", EvalModel)):
        parts += [f"## {title}", "", _fields_table(cls), ""]
    return "\n".join(parts)


def methods() -> str:
    from iteris.methods import REGISTRY

    parts = ["# Methods: parameters", "",
             "Written from the registry at every docs build (`iteris methods` prints the same). Papers and what "
             "each method computes: [Methods](../methods.md).", ""]
    for name, spec in sorted(REGISTRY.items()):
        data = "needs calibration data" if spec.needs_calibration else "data-free"
        parts += [f"## `{name}`", "", f"{spec.summary} ({data}).", ""]
        described = spec.describe()
        if described:
            parts += ["| parameter | default | meaning |", "|---|---|---|"]
            parts += [f"| `{p}` | `{d}` | {html.escape(h).replace('|', '/')} |" for p, d, h in described]
        else:
            parts.append("No parameters.")
        parts.append("")
    return "\n".join(parts)


def architecture() -> str:
    return (ROOT / "ARCHITECTURE.md").read_text()
