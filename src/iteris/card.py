"""The model card (README.md) written with every merge: Hub front matter, then what was merged, how, and what
it scored. A merged adapter that leaves the machine stays explainable, and the Hub shows the card."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

CARD = "README.md"
SCORES_START = "<!-- iteris:scores -->"  # ``iteris eval --update-cards`` rewrites what lies between these two
SCORES_END = "<!-- /iteris:scores -->"

PIPELINE_TAGS = {  # PEFT task type -> the Hub's pipeline tag
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}


def hub_id(config, adapter_configs: list[dict] = ()) -> str | None:
    """The base model as the Hub names it: the config's, where it is a Hub id rather than a local directory,
    else the one the adapters were trained from (their base_model_name_or_path), if they agree on one. The Hub
    refuses a card whose base_model is a local path."""
    import re

    named = {c.get("base_model_name_or_path") for c in adapter_configs}
    for candidate in [config.base_model, *(named if len(named) == 1 else ())]:
        if (isinstance(candidate, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", candidate)
                and not Path(candidate).exists()):
            return candidate
    return None


def merge_card(report: dict, config, *, library: str, task_type: str | None = None,
               pipeline_tag: str | None = None, files: list[str] = (), adapter_configs: list[dict] = ()) -> str:
    """The card's text. ``library``: peft (an adapter), transformers (a model folded whole) or diffusers (a
    pipeline's LoRA); ``files``: other files beside it worth a link (plots)."""
    from huggingface_hub import ModelCardData

    method = report.get("method", config.method)
    data = ModelCardData(
        base_model=hub_id(config, adapter_configs),  # (None: left out; the local path is in the body)
        library_name=library,
        tags=["merge", "lora", "iteris", method],
        pipeline_tag=pipeline_tag or PIPELINE_TAGS.get(task_type or ""),
    )
    names = [a.name for a in config.adapters]
    what = {"peft": "a LoRA adapter", "transformers": "a model with the merged LoRA folded in",
            "diffusers": "a diffusers LoRA"}[library]
    body = [
        f"# {' + '.join(names)}",
        "",
        f"{what[0].upper() + what[1:]} of `{config.base_model}`, merged by iteris with **{method}** from "
        f"{len(names)} LoRA adapters, with no training.",
        "",
        report.get("summary", ""),
        "",
        "## Adapters",
        "",
        _adapters_table(report, config),
        "",
        "## Method",
        "",
        f"`{method}` with these parameters:",
        "",
        "```yaml",
        yaml.safe_dump(report.get("parameters", {}), sort_keys=True).strip(),
        "```",
        "",
        "## Output",
        "",
        *_output_lines(report),
        "",
        "## Scores",
        "",
        SCORES_START,
        "Not scored yet: `iteris eval ... --update-cards` writes the scores here.",
        SCORES_END,
        "",
        "## Reproduce",
        "",
        "The merge configuration (the calibration files are named, their text is not copied here):",
        "",
        "```yaml",
        yaml.safe_dump(_as_written(config), sort_keys=False).strip(),
        "```",
        "",
        "```bash",
        "iteris merge merge.yaml --out merged/",
        "```",
    ]
    if files:
        body += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in files]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def _adapters_table(report: dict, config) -> str:
    entries = {e["name"]: e for e in report.get("adapters", [])}
    lines = ["| adapter | weight | path | calibration |", "|---|---:|---|---|"]
    for spec in config.adapters:
        entry = entries.get(spec.name, {})
        if "samples" in entry:
            calibration = f"`{spec.data}`: {entry['samples']} samples, {entry.get('tokens', '?')} tokens"
        else:
            calibration = f"`{spec.data}`" if spec.data else "none (data-free)"
        lines.append(f"| {spec.name} | {spec.weight:g} | `{spec.path}` | {calibration} |")
    return "\n".join(lines)


def _output_lines(report: dict) -> list[str]:
    output = report.get("output") or {}
    lines = []
    ranks = list((output.get("ranks") or {}).values())
    if ranks:
        span = f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)} to {max(ranks)}"
        lines.append(f"- Rank {span} on {len(ranks)} layers.")
    errors = list((output.get("relative_error") or {}).values())
    if output.get("exact"):
        lines.append("- Exact: the merged update is written as it was solved, with no compression.")
    elif errors:
        lines.append(f"- Compressed by SVD: relative error at most {max(errors):.3g} "
                     f"(mean {sum(errors) / len(errors):.3g}) over the layers.")
    timings = report.get("timings") or {}
    if timings:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in timings.items() if isinstance(v, (int, float)))
        lines.append(f"- Seconds: {shown}.")
    memory = report.get("peak_memory") or {}
    if memory:
        lines.append("- Peak memory: " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()) + ".")
    return lines or ["- (no output details in the report)"]


def _as_written(value):
    """A config as a user would write it: only what differs from the defaults."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and v == f.default_factory():
                continue
            out[f.name] = _as_written(v)
        return out
    if isinstance(value, list):
        return [_as_written(v) for v in value]
    return value


def write_card(directory: Path, text: str) -> None:
    (directory / CARD).write_text(text, encoding="utf-8")


def update_scores(card: Path, scores: str) -> bool:
    """Replace the scores section of a card iteris wrote (False, and nothing written, for any other README);
    written whole to a temporary beside it and moved over it, so a crash leaves the old card."""
    if not card.is_file():
        return False
    text = card.read_text(encoding="utf-8")
    start, end = text.find(SCORES_START), text.find(SCORES_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(SCORES_START)] + "\n" + scores.strip() + "\n" + text[end:]
    tmp = card.with_name(f".{card.name}.iteris-tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(card)
    return True
