"""``iteris eval``: per-task scores of the base model, each task's own adapter, and merged adapters.

    base_model: path
    tasks:
      - {name: sentiment, data: sentiment.jsonl, adapter: adapters/sentiment}   # metric inferred
      - {name: headlines, data: headlines.jsonl, adapter: adapters/headlines, metric: rouge_l}
    models:                                     # rows evaluated on every task
      - {name: iteris, path: merged/iteris}     # a dir with one sub-dir per task is used per task

Task records decide the metric unless ``metric`` is given:
  {"prompt", "choices", "answer": index}  -> mc_accuracy (highest log-likelihood continuation)
  {"prompt", "answer": "text"}            -> exact_match (greedy generation; or rouge_l)
  {"text", "label": index}                -> accuracy (a classifier's head)
  {"text"}                                -> perplexity (lower is better)

The normalized score of a row on a task is its score divided by the task's own adapter's score
(the inverse ratio for perplexity), so 1.0 means "as good as the individual adapter".
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from . import scoring
from .adapters import load_adapter
from .engine.forward import TokenSample
from .families import loading, text
from .config import Dtype, check_device, hub_inputs, positive_int, resolve_path
from .data import load_records
from .errors import IterisError
from .files import load_json, load_yaml
from .finite import NonFiniteOutputs
from .schema import build, short
from .metrics import exact_match, rouge_l
from .placement import atomic_directory

Metric = Literal["mc_accuracy", "accuracy", "exact_match", "rouge_l", "perplexity"]
METRICS = typing.get_args(Metric)


@dataclass
class EvalTask:
    name: str
    data: str  # JSONL records: their keys decide the metric unless metric is set
    adapter: str | None = None  # the task's own adapter (the "individual" row)
    metric: Metric | None = None  # mc_accuracy, exact_match, rouge_l, perplexity or accuracy
    limit: int | None = None  # evaluate only the first N records
    max_new_tokens: int = 32  # generated tokens for exact_match and rouge_l


@dataclass
class EvalModel:
    name: str  # the row's name
    path: str  # a merged adapter or model directory (with one sub-directory per task: used per task)


@dataclass
class EvalConfig:
    base_model: str
    tasks: list[EvalTask]
    models: list[EvalModel] = field(default_factory=list)  # rows scored on every task
    tokenizer: str | None = None  # defaults to base_model
    task_type: str | None = None  # defaults to the adapters' own
    device: str = "auto"
    dtype: Dtype = "auto"
    batch_size: int = 8
    progress: bool = True  # progress bars
    include_base: bool = True  # the "base" row (the model without any adapter)
    trust_remote_code: bool = False  # run code shipped with the model (its config's auto_map)
    per_item: bool = False  # also keep each record's score (rows compared record by record: a paired noise)

    config_file = None  # the YAML it was read from (not a key of it): an input like the others

    def inputs(self) -> list[str]:
        paths = [self.base_model, self.tokenizer, self.config_file] + [p for t in self.tasks for p in (t.data, t.adapter)]
        return [p for p in paths + [m.path for m in self.models] if p] + hub_inputs(self.base_model, self.tokenizer)


def load_eval_config(source) -> EvalConfig:
    """Through the same typed path as the merge config; relative paths in a YAML are relative to it."""
    config_file = None
    if isinstance(source, EvalConfig):
        config_file = source.config_file
        source = asdict(source)
    root = None
    if not isinstance(source, dict):
        if not isinstance(source, (str, os.PathLike)) or not str(source):
            raise IterisError(f"an eval config is a path to a YAML file or a dict, got {short(source)}")
        path = Path(source)
        if not path.is_file():
            raise IterisError(f"eval config '{path}' not found")
        source = load_yaml(path, "eval config")
        root = path.resolve().parent
        config_file = str(path)
    if not isinstance(source, dict) or "base_model" not in source or "tasks" not in source:
        raise IterisError("an eval config needs base_model and tasks (see `iteris eval --help`)")
    if source.get("models") is None:
        source = {**source, "models": []}
    cfg = build(EvalConfig, source, "")
    if not cfg.tasks:
        raise IterisError("tasks is empty: list at least one {name, data} task")
    names = [t.name for t in cfg.tasks] + [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise IterisError(f"task and model names must be unique, got {short(names)}")
    positive_int("batch_size", cfg.batch_size)
    check_device(cfg.device)
    for i, t in enumerate(cfg.tasks):
        if t.limit is not None:
            positive_int(f"tasks[{i}].limit", t.limit)
        positive_int(f"tasks[{i}].max_new_tokens", t.max_new_tokens)
    if root is not None:
        cfg.base_model = resolve_path(cfg.base_model, root, "base_model", may_be_hub_id=True)
        cfg.tokenizer = resolve_path(cfg.tokenizer, root, "tokenizer", may_be_hub_id=True)
        for i, t in enumerate(cfg.tasks):
            t.data = resolve_path(t.data, root, f"tasks[{i}].data")
            t.adapter = resolve_path(t.adapter, root, f"tasks[{i}].adapter")
        for i, m in enumerate(cfg.models):
            m.path = resolve_path(m.path, root, f"models[{i}].path")
    cfg.config_file = config_file
    return cfg


def infer_metric(records: list[dict], task: str) -> str:
    first = records[0]
    if "choices" in first and "answer" in first:
        return "mc_accuracy"
    if "label" in first and "text" in first:
        return "accuracy"
    if "prompt" in first and "answer" in first:
        return "exact_match"
    if "text" in first:
        return "perplexity"
    raise IterisError(
        f"task '{task}': cannot tell the metric from the fields {sorted(first)}; use prompt+choices+answer, "
        "prompt+answer, text+label or text, or set `metric`"
    )


# the fields each metric reads, and what each must hold
_FIELDS = {
    "mc_accuracy": {"prompt": "text", "choices": "choices", "answer": "index"},
    "accuracy": {"text": "text", "label": "index"},
    "exact_match": {"prompt": "text", "answer": "scalar"},
    "rouge_l": {"prompt": "text", "answer": "scalar"},
    "perplexity": {"text": "text"},
}


def check_records(records: list[dict], metric: str, task: str) -> None:
    """Each record holds what its metric reads, of the right kind, so scoring cannot stop half-way."""
    for number, r in enumerate(records, start=1):
        for name, kind in _FIELDS[metric].items():
            value = r.get(name)
            ok = {
                "text": isinstance(value, str),
                "choices": isinstance(value, list) and value and all(isinstance(c, str) for c in value),
                "index": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                "scalar": isinstance(value, (str, int, float)) and not isinstance(value, bool),
            }[kind]
            if not ok:
                wanted = {"text": "text", "choices": "a non-empty list of texts", "index": "an index (integer >= 0)",
                          "scalar": "a text or number"}[kind]
                raise IterisError(f"task '{task}', record {number}: '{name}' must be {wanted} for {metric}, got "
                                  f"{short(value) if name in r else 'nothing'}")
        if metric == "mc_accuracy" and r["answer"] >= len(r["choices"]):
            raise IterisError(f"task '{task}', record {number}: answer {r['answer']} is not an index of its "
                              f"{len(r['choices'])} choices")


def score(model, tokenizer, records: list[dict], metric: str, max_new_tokens: int, batch_size: int, device: str) -> float:
    """One model's score on one task's records."""
    return scored_items(model, tokenizer, records, metric, max_new_tokens, batch_size, device)[0]


def scored_items(model, tokenizer, records: list[dict], metric: str, max_new_tokens: int, batch_size: int,
                 device: str) -> tuple[float, list[float] | None]:
    """The score and each record's own (None for perplexity, which is not a mean over records): two rows
    compared record by record have a much smaller noise than two independent scores."""
    if metric == "perplexity":
        return _perplexity(model, tokenizer, records, batch_size, device), None
    items = _item_scores(model, tokenizer, records, metric, max_new_tokens, batch_size, device)
    return sum(items) / len(items), items


def _item_scores(model, tokenizer, records: list[dict], metric: str, max_new_tokens: int, batch_size: int,
                 device: str) -> list[float]:
    pad = tokenizer.pad_token_id
    encode = lambda text, special=True: tokenizer(text, add_special_tokens=special)["input_ids"]
    if metric == "mc_accuracy":
        pairs, owners = [], []
        for index, r in enumerate(records):
            context = encode(r["prompt"])
            for choice in r["choices"]:
                pairs.append((context, encode(choice, special=False)))
                owners.append(index)
        logps = _finite(scoring.shared_context_logprobs(model, pairs, pad, batch_size, device))
        best: dict[int, tuple[float, int]] = {}
        counts: dict[int, int] = {}
        for owner, lp in zip(owners, logps):
            k = counts.get(owner, 0)
            counts[owner] = k + 1
            if owner not in best or lp > best[owner][0]:
                best[owner] = (lp, k)
        return [float(best[i][1] == int(r["answer"])) for i, r in enumerate(records)]
    if metric == "accuracy":
        predictions = scoring.class_predictions(model, [encode(r["text"]) for r in records], pad, batch_size, device)
        return [float(p == int(r["label"])) for p, r in zip(predictions, records)]
    if metric in ("exact_match", "rouge_l"):
        prompts = [TokenSample(input_ids=encode(r["prompt"])) for r in records]
        outputs = text.greedy_continuations(model, prompts, tokenizer, max_new_tokens, batch_size, device)
        fn = exact_match if metric == "exact_match" else rouge_l
        items = []
        for prompt, out, r in zip(prompts, outputs, records):
            new = out.input_ids[len(prompt.input_ids):] if out.decoder_ids is None else out.decoder_ids[1:]
            items.append(float(fn(tokenizer.decode(new, skip_special_tokens=True), str(r["answer"]))))
        return items
    raise IterisError(f"unknown metric '{metric}'")


def _perplexity(model, tokenizer, records: list[dict], batch_size: int, device: str) -> float:
    encode = lambda text: tokenizer(text)["input_ids"]
    pad = tokenizer.pad_token_id
    pairs = []
    for r in records:
        ids = encode(r["text"])
        if len(ids) > 1:
            pairs.append((ids[:1], ids[1:]))
    if not pairs:
        raise IterisError("perplexity needs texts of at least two tokens; every text here has fewer")
    logps = _finite(scoring.continuation_logprobs(model, pairs, pad, batch_size, device))
    tokens = sum(len(t) for _, t in pairs)
    mean = -sum(logps) / tokens
    if mean > 700:  # (exp overflows a float: the model assigns these texts no probability to speak of)
        raise NonFiniteOutputs
    return math.exp(mean)


def _finite(logps: list[float]) -> list[float]:
    if not all(math.isfinite(x) for x in logps):
        raise NonFiniteOutputs
    return logps


def normalized(value: float, reference: float, metric: str) -> float:
    if metric == "perplexity":
        return reference / value if value > 0 else 0.0
    return value / reference if reference > 0 else 0.0


def _adapter_for(path: str, task: str) -> str:
    per_task = Path(path) / task
    return str(per_task) if (per_task / "adapter_config.json").is_file() else path


def _heads(path: str) -> dict:
    """An adapter's trained modules_to_save tensors (classifier heads), which fix the head's size."""
    return load_adapter(str(path), path).extra_tensors


def _load(cfg: EvalConfig, task_type, paths: list[str], heads: dict[str, dict], device, dtype, tokenizer):
    """The base model with the given adapters loaded by PEFT, as PEFT adapter names a0, a1, ..."""
    from peft import PeftModel

    extras = {}
    for path in paths:
        extras.update(heads[path])
    base = loading.load_base_model(cfg.base_model, task_type, extras, dtype, device, tokenizer,
                                  trust_remote_code=cfg.trust_remote_code)
    if not paths:
        return base, {}
    names = {path: f"a{i}" for i, path in enumerate(paths)}
    model = PeftModel.from_pretrained(base, paths[0], adapter_name=names[paths[0]])
    for path in paths[1:]:
        model.load_adapter(path, adapter_name=names[path])
    return model.eval(), names


def evaluate(source) -> dict:
    """Scores of the rows base, individual, and every configured model on every task."""
    cfg = load_eval_config(source)
    records = {}
    metrics = {}
    for t in cfg.tasks:
        recs = load_records(t.data)
        if not recs:
            raise IterisError(f"task '{t.name}': '{t.data}' holds no records")
        records[t.name] = recs[: t.limit] if t.limit else recs
        metrics[t.name] = t.metric or infer_metric(records[t.name], t.name)
        check_records(records[t.name], metrics[t.name], t.name)  # every record, before any model loads
    plan: dict[str, dict[str, str | None]] = {"base": {t.name: None for t in cfg.tasks}} if cfg.include_base else {}
    if all(t.adapter for t in cfg.tasks):
        plan["individual"] = {t.name: t.adapter for t in cfg.tasks}
    for m in cfg.models:
        plan[m.name] = {t.name: _adapter_for(m.path, t.name) for t in cfg.tasks}
    paths_of: dict[str, list[str]] = {t.name: [] for t in cfg.tasks}  # adapters each task needs, in order
    for row in plan.values():
        for task, path in row.items():
            if path is not None and path not in paths_of[task]:
                if not (Path(path) / "adapter_config.json").is_file():
                    raise IterisError(f"'{path}' is not a PEFT adapter directory")
                paths_of[task].append(path)
    all_paths = [p for ps in paths_of.values() for p in ps]
    task_type = cfg.task_type
    if task_type is None and all_paths:
        found = load_json(Path(all_paths[0]) / "adapter_config.json", "adapter config", constants=True)
        task_type = found.get("task_type") if isinstance(found, dict) else None
    # Tasks whose heads differ in size (2 labels here, 5 there) each need a base model of their own.
    heads = {path: _heads(path) for path in dict.fromkeys(all_paths)}  # each adapter read once
    groups: dict[tuple, list[str]] = {}
    for t in cfg.tasks:
        own = heads[paths_of[t.name][0]] if paths_of[t.name] else {}
        groups.setdefault(tuple(sorted((k, tuple(v.shape)) for k, v in own.items())), []).append(t.name)

    device = loading.resolve_device(cfg.device)
    dtype = loading.resolve_dtype(cfg.dtype, device)
    tokenizer = loading.load_tokenizer(cfg.tokenizer or cfg.base_model, cfg.trust_remote_code)
    by_name = {t.name: t for t in cfg.tasks}
    scores: dict[str, dict[str, float]] = {row: {} for row in plan}
    items: dict[str, dict[str, list[float] | None]] = {row: {} for row in plan}
    with tqdm(total=len(plan) * len(cfg.tasks), desc="eval", disable=not cfg.progress, unit="task") as bar:
        for task_names in groups.values():
            paths = list(dict.fromkeys(p for name in task_names for p in paths_of[name]))
            model, names = _load(cfg, task_type, paths, heads, device, dtype, tokenizer)
            for row_name, assignment in plan.items():
                for name in task_names:
                    t, path = by_name[name], assignment[name]
                    run = lambda: _scored(row_name, name, lambda: scored_items(
                        model, tokenizer, records[name], metrics[name], t.max_new_tokens, cfg.batch_size, device))
                    if path is None and names:
                        with model.disable_adapter():
                            scores[row_name][name], items[row_name][name] = run()
                    else:
                        if path is not None:
                            model.set_adapter(names[path])
                        scores[row_name][name], items[row_name][name] = run()
                    bar.update(1)
            del model
    rows = [{"method": row, "scores": {t.name: scores[row][t.name] for t in cfg.tasks},
             **({"items": {t.name: items[row][t.name] for t in cfg.tasks}} if cfg.per_item else {})} for row in plan]
    individual = next((r for r in rows if r["method"] == "individual"), None)
    for row in rows:
        if individual is not None:
            ratios = [normalized(row["scores"][t], individual["scores"][t], metrics[t]) for t in row["scores"]]
            row["normalized_mean"] = sum(ratios) / len(ratios)
        else:
            row["normalized_mean"] = None
    return {"tasks": [t.name for t in cfg.tasks], "metrics": metrics, "rows": rows, "config": asdict(cfg)}


def format_table(results: dict, markdown: bool = False) -> str:
    tasks = results["tasks"]
    header = ["method"] + [f"{t} ({results['metrics'][t]})" for t in tasks] + ["normalized mean"]
    body = []
    for row in results["rows"]:
        nm = row.get("normalized_mean")
        body.append([row["method"]] + [f"{row['scores'][t]:.4g}" for t in tasks] + ["-" if nm is None else f"{nm:.3f}"])
    return text_table(header, body, markdown)


def text_table(header: list[str], body: list[list[str]], markdown: bool = False) -> str:
    """A table with the first column left-aligned and the rest right-aligned (plain text or markdown)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def _scored(row: str, task: str, run):
    try:
        return run()
    except NonFiniteOutputs as exc:
        raise IterisError(f"row '{row}', task '{task}': {exc}; its weights or its dtype (float16 overflow) are at "
                          "fault, so no score is reported") from None


def write_results(results: dict, out: str | Path, force: bool = False, inputs=(), plot: bool = False) -> None:
    """results.json and results.md (and with ``plot`` scores.png), written atomically; an existing non-empty
    ``out`` only with ``force``."""

    with atomic_directory(out, force, inputs) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str, allow_nan=False) + "\n")
        (tmp / "results.md").write_text(format_table(results, markdown=True) + "\n")
        if plot:
            from .plots import SCORES, score_figure

            score_figure(results, tmp / SCORES)


def update_cards(results: dict, cfg: EvalConfig) -> list[Path]:
    """Each scored model's row (beside the base and individual rows) written into the card iteris wrote in its
    directory; a README.md that iteris did not write is left as it is. The cards that changed."""
    from .card import CARD, update_scores

    tasks = [t.name for t in cfg.tasks]
    reference = [r for r in results["rows"] if r["method"] in ("base", "individual")]
    changed = []
    for model in cfg.models:
        mine = [r for r in results["rows"] if r["method"] == model.name]
        table = format_table({**results, "rows": reference + mine}, markdown=True)
        metrics = ", ".join(f"{t}: {results['metrics'][t]}" for t in tasks)
        note = (f"Scored by `iteris eval` ({metrics}); normalized mean: each score over the task's own "
                "adapter's, averaged over the tasks.")
        # the card beside the adapter, and those of per-adapter sub-directories (modules_to_save: per_adapter)
        for card in [Path(model.path) / CARD] + [Path(model.path) / t / CARD for t in tasks]:
            if update_scores(card, f"{note}\n\n{table}"):
                changed.append(card)
    return changed
