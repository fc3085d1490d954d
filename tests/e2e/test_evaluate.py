"""`iteris eval`: metrics by hand, and every model-based score against a one-example-at-a-time computation."""

import json

import pytest
import torch
from peft import PeftModel

import iteris
from iteris.families.loading import load_tokenizer
from iteris.cli import main
from iteris.evaluate import evaluate, score
from iteris.metrics import exact_match, normalize_answer, rouge_l
from tests.helpers import fixtures as fx
from tests.helpers.merging import float64_config as _config


def test_text_metrics_by_hand():
    assert normalize_answer("  The Answer!! ") == "the answer"
    assert exact_match("The answer.", "the  answer") == 1.0
    assert exact_match("an answer", "the answer") == 0.0
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 words: P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = 2 ("a c"): P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c", "a x c y") == pytest.approx(4 / 7)
    assert rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0


@pytest.fixture
def llama(load_tiny):
    model, tok = load_tiny("llama")
    return model, tok


def _logp(model, tok, prompt, choice):
    ctx = tok(prompt)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(float(logits[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


def test_multiple_choice_accuracy(llama):
    model, tok = llama
    sentences = fx.sample_sentences(8, seed=3)
    records = []
    for i in range(6):
        prompt, choices = sentences[i], [sentences[(i + 1) % 8], sentences[(i + 2) % 8], "a"]
        best = max(range(3), key=lambda k: _logp(model, tok, prompt, choices[k]))
        answer = best if i % 2 == 0 else (best + 1) % 3  # half right by construction
        records.append({"prompt": prompt, "choices": choices, "answer": answer})
    assert score(model, tok, records, "mc_accuracy", 8, batch_size=4, device="cpu") == pytest.approx(0.5)


def test_perplexity(llama):
    model, tok = llama
    texts = fx.sample_sentences(5, seed=4)
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        nll -= sum(float(logits[k - 1, ids[k]]) for k in range(1, len(ids)))
        count += len(ids) - 1
    expected = float(torch.exp(torch.tensor(nll / count)))
    got = score(model, tok, [{"text": t} for t in texts], "perplexity", 8, batch_size=3, device="cpu")
    assert got == pytest.approx(expected, rel=1e-5)


def test_exact_match_of_greedy_generations(llama):
    model, tok = llama
    prompts = fx.sample_sentences(4, seed=5)
    records = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        records.append({"prompt": prompt, "answer": text if i % 2 == 0 else text + " extra"})
    assert score(model, tok, records, "exact_match", 4, batch_size=4, device="cpu") == pytest.approx(0.5)


def test_classifier_accuracy(load_tiny):
    model, tok = load_tiny("bert")
    texts = fx.sample_sentences(6, seed=6)
    records = []
    for i, text in enumerate(texts):
        with torch.no_grad():
            pred = int(model(**tok(text, return_tensors="pt")).logits.argmax(-1))
        records.append({"text": text, "label": pred if i < 4 else (pred + 1) % 3})
    assert score(model, tok, records, "accuracy", 8, batch_size=4, device="cpu") == pytest.approx(4 / 6)


def test_evaluate_base_individual_and_merged_rows(tiny_family_dir, adapters_for, calibration_file, tmp_path):
    base = tiny_family_dir("llama")
    adapters = adapters_for("llama", 2)
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    iteris.merge(_config(base, adapters, data, parameters={"iterations": 1}, dtype="float32"), out=tmp_path / "merged")
    tasks = []
    for i, adapter in enumerate(adapters):
        path = tmp_path / f"task{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in fx.sample_sentences(4, seed=10 + i)))
        tasks.append({"name": f"t{i}", "data": str(path), "adapter": str(adapter)})
    cfg = {"base_model": str(base), "tasks": tasks, "models": [{"name": "iteris", "path": str(tmp_path / "merged")}],
           "device": "cpu", "dtype": "float32", "progress": False}
    results = evaluate(cfg)
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["base", "individual", "iteris"]
    assert results["metrics"] == {"t0": "perplexity", "t1": "perplexity"}
    assert rows["individual"]["normalized_mean"] == pytest.approx(1.0)

    # the individual row is each task's own adapter, as PEFT computes it on its own
    own = PeftModel.from_pretrained(fx.load_base(base, "llama")[0], str(adapters[1])).eval()
    tok = load_tokenizer(str(base))
    records = [json.loads(line) for line in open(tasks[1]["data"])]
    assert rows["individual"]["scores"]["t1"] == pytest.approx(score(own, tok, records, "perplexity", 8, 4, "cpu"), rel=1e-6)
    base_model = fx.load_base(base, "llama")[0]
    assert rows["base"]["scores"]["t1"] == pytest.approx(score(base_model, tok, records, "perplexity", 8, 4, "cpu"), rel=1e-6)

    out = tmp_path / "eval"
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    assert main(["eval", str(tmp_path / "eval.yaml"), "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in written["rows"]] == ["base", "individual", "iteris"]
    assert "| iteris |" in (out / "results.md").read_text()


def test_tasks_with_heads_of_different_sizes(tiny_family_dir, adapters_for, calibration_file, tmp_path):
    """A 3-label and a 2-label classifier on one encoder: merged with per-adapter heads, scored each
    through its own head (one base model per head size)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tiny_family_dir("bert")
    three = adapters_for("bert", 1)[0]
    torch.manual_seed(0)
    two_model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, ignore_mismatched_sizes=True),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    )
    with torch.no_grad():
        for name, p in two_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    two_model.save_pretrained(tmp_path / "two")
    two = tmp_path / "two"
    data = [calibration_file("jsonl", 6, s) for s in (0, 1)]
    cfg = _config(base, [three, two], data, parameters={"iterations": 1}, dtype="float32",
                  modules_to_save="per_adapter")
    iteris.merge(cfg, out=tmp_path / "merged")
    tasks = []
    for name, adapter, labels in (("t0", three, 3), ("t1", two, 2)):
        path = tmp_path / f"{name}.jsonl"
        texts = fx.sample_sentences(6, seed=labels)
        path.write_text("".join(json.dumps({"text": t, "label": i % labels}) + "\n" for i, t in enumerate(texts)))
        tasks.append({"name": name, "data": str(path), "adapter": str(adapter)})
    results = evaluate({"base_model": str(base), "tasks": tasks, "device": "cpu", "dtype": "float32", "progress": False,
                        "models": [{"name": "iteris", "path": str(tmp_path / "merged")}]})
    rows = {r["method"]: r for r in results["rows"]}
    tok = load_tokenizer(str(base))
    own = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, ignore_mismatched_sizes=True), str(two)
    ).eval()
    records = [json.loads(line) for line in open(tasks[1]["data"])]
    assert rows["individual"]["scores"]["t1"] == pytest.approx(score(own, tok, records, "accuracy", 8, 4, "cpu"))
    assert set(rows["iteris"]["scores"]) == {"t0", "t1"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_context_logprobs_match_one_pair_at_a_time(load_tiny, family):
    """Options scored from one cached prompt pass equal each (prompt + option) run alone, unpadded."""
    from iteris.scoring import shared_context_logprobs

    model, tok = load_tiny(family)
    model.double()
    sentences = fx.sample_sentences(12, seed=7)
    pairs = []
    for i in range(5):  # contexts of different lengths, 1 to 4 options of 1 to several tokens
        context = tok(sentences[i])["input_ids"]
        for k in range(1 + i % 4):
            option = tok(" ".join(sentences[5 + (i + k) % 7].split()[: 1 + k]), add_special_tokens=False)["input_ids"]
            pairs.append((context, option))
    expected = []
    with torch.no_grad():
        for context, option in pairs:
            logits = model(input_ids=torch.tensor([context + option])).logits[0].log_softmax(-1)
            expected.append(sum(float(logits[len(context) - 1 + j, t]) for j, t in enumerate(option)))
        got = shared_context_logprobs(model, pairs, tok.pad_token_id, batch_size=2, device="cpu")
    assert any(len(o) > 1 for _, o in pairs) and any(len(o) == 1 for _, o in pairs)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_per_item_scores_are_each_records_own(tiny_family_dir, adapters_for, tmp_path):
    """per_item: each record's score, in record order, whose mean is the task's score; each item is what
    scoring that record alone gives (so two rows can be compared record by record)."""
    base = tiny_family_dir("llama")
    adapter = adapters_for("llama", 1)[0]
    sentences = fx.sample_sentences(10, seed=5)
    mc = [{"prompt": sentences[i], "choices": [sentences[i + 1], sentences[i + 2], "a"], "answer": i % 3}
          for i in range(6)]
    own = PeftModel.from_pretrained(fx.load_base(base, "llama")[0], str(adapter)).eval()
    tok = load_tokenizer(str(base))

    def greedy(prompt):  # the adapter's own continuation: a ROUGE-L of 1 where it is the answer
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = own.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    gen = [{"prompt": sentences[i], "answer": greedy(sentences[i]) if i % 2 else sentences[i + 1]} for i in range(5)]
    tasks = []
    for name, records, metric in (("mc", mc, "mc_accuracy"), ("gen", gen, "rouge_l")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        tasks.append({"name": name, "data": str(path), "adapter": str(adapter), "metric": metric, "max_new_tokens": 6})
    cfg = {"base_model": str(base), "tasks": tasks, "device": "cpu", "dtype": "float32", "progress": False,
           "batch_size": 4, "per_item": True}
    rows = {r["method"]: r for r in evaluate(cfg)["rows"]}
    for name, records, metric in (("mc", mc, "mc_accuracy"), ("gen", gen, "rouge_l")):
        items = rows["individual"]["items"][name]
        assert len(items) == len(records)
        assert sum(items) / len(items) == pytest.approx(rows["individual"]["scores"][name])
        alone = [score(own, tok, [r], metric, 6, 1, "cpu") for r in records]
        assert items == pytest.approx(alone, abs=1e-9) and 0 < sum(items) < len(items)
    assert "items" not in evaluate({**cfg, "per_item": False})["rows"][0]
