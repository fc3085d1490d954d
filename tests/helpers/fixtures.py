"""Tiny, offline, deterministic models, tokenizers, LoRA adapters and calibration files for the tests.

Everything is built in code (no hub access); building all four families plus a few adapters takes a
few seconds on CPU. The pytest wrappers live in ``tests/conftest.py``.

Families (``FAMILIES``): ``"llama"``, ``"gpt2"``, ``"t5"``, ``"bert"``.

API
---
``make_tokenizer(save_dir, kind) -> PreTrainedTokenizerFast``
    Word-level tokenizer over a fixed English vocabulary (``VOCAB``, < 512 tokens; lowercasing,
    whitespace/punctuation split). ``kind`` picks the special tokens:

    * ``"llama"`` / ``"gpt2"``: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3. llama prepends ``<s>``
      (like the real Llama tokenizer); gpt2 adds nothing.
    * ``"t5"``: ``<pad>``=0, ``</s>``=1, ``<unk>``=2; appends ``</s>``.
    * ``"bert"``: ``[PAD]``=0, ``[UNK]``=1, ``[CLS]``=2, ``[SEP]``=3, ``[MASK]``=4; ``[CLS] $A [SEP]``
      (pairs: ``[CLS] $A [SEP] $B [SEP]``).

    padding_side="right". Saved with ``save_pretrained(save_dir)``; ``AutoTokenizer.from_pretrained``
    reloads it offline.

``make_base_model(save_dir, family, seed=0) -> (model, tokenizer)``
    Random tiny model (hidden 32, 2 layers, 4 heads, vocab 512, float32, dropout 0, ``eval()``):
    LlamaForCausalLM / GPT2LMHeadModel / T5ForConditionalGeneration / BertForSequenceClassification
    (num_labels 3). Model (safetensors) and tokenizer are saved together in ``save_dir``.

``load_base(base_dir, family) -> (model, tokenizer)``
    Reload a base written by ``make_base_model`` with the matching ``AutoModelFor...`` class
    (``AUTO_CLASSES[family]``) and ``AutoTokenizer``; model in ``eval()``.

``make_lora_adapter(base_dir, save_dir, family, seed, r=4, lora_alpha=8, target_modules=None, **lora_kwargs) -> save_dir``
    PEFT LoRA on the base in ``base_dir``; task type from ``TASK_TYPES``, default targets from
    ``DEFAULT_TARGETS`` (gpt2 also gets ``fan_in_fan_out=True``). Every ``lora_A`` / ``lora_B``
    (and ``lora_embedding_A/B``) weight is overwritten with N(0, 0.3^2) draws from
    ``torch.Generator().manual_seed(seed)``, so B is *not* zero and each adapter has a clearly
    nonzero, seed-specific delta. Trainable ``modules_to_save`` copies (bert's ``classifier``, or
    whatever is passed in ``modules_to_save``) are randomised from the same generator. Extra
    kwargs (``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``use_dora``, ``modules_to_save``,
    ``lora_dropout``, ...) go to ``LoraConfig``. Saved with ``save_pretrained`` (safetensors).

``write_calibration(path, kind, n, seed) -> path``
    ``n`` samples drawn from ``SENTENCES`` (40 sentences of 3-15 words, all in the vocabulary):
    ``"jsonl"`` -> ``{"text"}``; ``"jsonl_pr"`` -> ``{"prompt", "response"}``; ``"txt"`` -> one sample
    a line; ``"csv"`` -> header ``text,label`` (label in 0..2); ``"jsonl_t5"`` -> ``{"text", "target"}``.
    The first ``min(n, 40)`` samples use distinct sentences (seeded shuffle, then cycling).

``sample_sentences(n, seed=0) -> list[str]``
    The same deterministic sentence draw, in memory.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

FAMILIES = ("llama", "gpt2", "t5", "bert")
VOCAB_SIZE = 512
CALIBRATION_KINDS = ("jsonl", "jsonl_pr", "txt", "csv", "jsonl_t5")

TASK_TYPES = {
    "llama": "CAUSAL_LM",
    "gpt2": "CAUSAL_LM",
    "t5": "SEQ_2_SEQ_LM",
    "bert": "SEQ_CLS",
}

DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "bert": ["query", "key", "value", "dense"],
}

LORA_INIT_STD = 0.3

# --------------------------------------------------------------------------------------------
# Text

SENTENCES = [
    "the cat sat on the mat.",
    "a small dog runs in the park every morning.",
    "she reads a good book.",
    "we will go to the market tomorrow and buy fresh bread.",
    "the sun is warm today.",
    "my brother plays music with his friends after school.",
    "how old is your house?",
    "the river flows quietly through the green valley near our town.",
    "birds sing in the tall trees.",
    "he made a cup of hot tea for his mother.",
    "open the door please.",
    "the children learned to count from one to ten in class.",
    "it is raining again.",
    "our teacher told us a long story about a brave king and his horse.",
    "where did you put the red box?",
    "the old man walks slowly down the road.",
    "they eat dinner at seven.",
    "this computer can solve hard problems very fast.",
    "i like cold water.",
    "the train leaves the station at noon and arrives before night.",
    "please write your name on the paper.",
    "a happy girl found a blue stone by the sea.",
    "the moon is bright.",
    "farmers grow rice and corn in the fields during the summer.",
    "can you help me carry these heavy bags?",
    "the small bird flew over the high wall.",
    "he never forgets to call his sister on sunday.",
    "the food was good.",
    "we watched the stars from the hill until the sky turned dark.",
    "a new student joined our class this week.",
    "the baby is sleeping now.",
    "my father drives a black car to work every day.",
    "do you know the answer?",
    "the wind was cold and the snow fell all night long.",
    "she painted a picture of the mountain.",
    "good models learn from many examples.",
    "the shop opens early.",
    "they built a strong bridge across the wide river last year.",
    "why is the sky blue?",
    "the doctor said that she should rest for three days at home.",
]

_EXTRA_WORDS = """
about above after again against all also always am an and animal any apple are arm around as ask
at away back bad bag ball bank be bed been before begin being below best better between big bird
black blue boat body book both box boy bread bring brother brown but by call came can car cat
chair change child city clean close cloud come cook could country cup cut day did different do
does dog door down draw drink drive dry each ear early earth eat egg end enough even evening ever
every eye face fall family far farm fast father feel few field find fire first fish five floor
flower fly food foot for forest four friend from front full game garden gave get girl give glass
go gold good green grow had hair hand happy hard has have he head hear help her here high hill
him his hold home horse hot hour house how i ice if in into is it just keep kind king know lake
land large last late laugh learn left leg let letter life light like line listen little live
long look love low make man many map may me meet milk mind money more morning most mother move
much music must my name near need never new next nice night no north not now number of off often
old on once one only open or other our out over page paper park part people place plant play
please point poor put question quick rain read real red right river road rock room run sad said
same say school sea see she ship short should show side sing sister sit six sky sleep slow small
snow so some song soon south speak stand star start stay still stone stop story street strong
such summer sun sure table take talk tall teacher tell ten than thank that the their them then
there these they thing think this those three through time to today together too tree true try
turn two under until up us use very wait walk wall want warm was watch water way we week well
went were west what when where which white who why will window winter with woman word work world
would write year yellow yes you young your
"""

_PUNCT = [".", ",", "?", "!", "'", "-", ":", ";", '"']


def _build_words() -> list[str]:
    import re

    words = set(_EXTRA_WORDS.split())
    for s in SENTENCES:
        words.update(re.findall(r"\w+", s.lower()))
    return sorted(words)


WORDS = _build_words()

SPECIALS = {
    "llama": ["<unk>", "<s>", "</s>", "<pad>"],
    "gpt2": ["<unk>", "<s>", "</s>", "<pad>"],
    "t5": ["<pad>", "</s>", "<unk>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}


def vocab_for(kind: str) -> dict[str, int]:
    toks = list(SPECIALS[kind]) + _PUNCT + WORDS
    assert len(toks) == len(set(toks)) and len(toks) <= VOCAB_SIZE, len(toks)
    return {t: i for i, t in enumerate(toks)}


def make_tokenizer(save_dir: Path, kind: str):
    """Build, save (to ``save_dir``) and return a word-level ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind not in SPECIALS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(SPECIALS)}")
    vocab = vocab_for(kind)
    if kind == "bert":
        unk, pad = "[UNK]", "[PAD]"
    else:
        unk, pad = "<unk>", "<pad>"

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces

    special_kwargs: dict[str, str] = {"unk_token": unk, "pad_token": pad}
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        special_kwargs.update(bos_token="<s>", eos_token="</s>")
    elif kind == "gpt2":
        special_kwargs.update(bos_token="<s>", eos_token="</s>")
    elif kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
        special_kwargs.update(eos_token="</s>")
    elif kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        special_kwargs.update(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="right",
        model_max_length=128,
        **special_kwargs,
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(save_dir))
    return hf


# --------------------------------------------------------------------------------------------
# Models


def _config(family: str, tok):
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    if family == "t5":
        return T5Config(
            vocab_size=VOCAB_SIZE,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
            pad_token_id=tok.pad_token_id,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _model_class(family: str):
    import transformers

    return getattr(
        transformers,
        {
            "llama": "LlamaForCausalLM",
            "gpt2": "GPT2LMHeadModel",
            "t5": "T5ForConditionalGeneration",
            "bert": "BertForSequenceClassification",
        }[family],
    )


AUTO_CLASSES = {
    "llama": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "t5": "AutoModelForSeq2SeqLM",
    "bert": "AutoModelForSequenceClassification",
}


def auto_class(family: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[family])


def make_base_model(save_dir: Path, family: str, seed: int = 0):
    """Build a tiny random ``family`` model, save it plus its tokenizer to ``save_dir``; return both."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    save_dir = Path(save_dir)
    tok = make_tokenizer(save_dir, family)
    config = _config(family, tok)
    torch.manual_seed(seed)
    model = _model_class(family)(config).to(torch.float32)
    model.eval()
    model.save_pretrained(str(save_dir), safe_serialization=True)
    return model, tok


def load_base(base_dir: Path, family: str):
    """Reload a base written by ``make_base_model`` (offline); returns (model in eval(), tokenizer)."""
    from transformers import AutoTokenizer

    model = auto_class(family).from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    return model, tok


# --------------------------------------------------------------------------------------------
# Adapters


def make_lora_adapter(
    base_dir: Path,
    save_dir: Path,
    family: str,
    seed: int,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules=None,
    **lora_kwargs,
) -> Path:
    """Create a PEFT LoRA adapter with seeded random (nonzero) A and B; save it to ``save_dir``."""
    from peft import LoraConfig, get_peft_model

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if target_modules is None:
        target_modules = list(DEFAULT_TARGETS[family])
    if family == "gpt2":
        lora_kwargs.setdefault("fan_in_fan_out", True)
    lora_kwargs.setdefault("lora_dropout", 0.0)

    base = auto_class(family).from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        task_type=TASK_TYPES[family],
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        **lora_kwargs,
    )
    torch.manual_seed(seed)  # PEFT's own init (e.g. DoRA magnitude is derived, A is kaiming)
    model = get_peft_model(base, config)

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n_lora = 0
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * LORA_INIT_STD)
                n_lora += 1
        if n_lora == 0:
            raise RuntimeError(f"no LoRA parameters were created for targets {target_modules}")
        # modules_to_save copies (bert's classifier head, plus any user-requested ones)
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * LORA_INIT_STD)

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(save_dir), safe_serialization=True)
    return save_dir


# --------------------------------------------------------------------------------------------
# Calibration data


def _sentence_stream(n: int, seed: int, offset: int = 0) -> list[str]:
    rng = random.Random(seed)
    order = list(range(len(SENTENCES)))
    rng.shuffle(order)
    return [SENTENCES[order[(i + offset) % len(order)]] for i in range(n)]


def sample_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences (distinct for n <= 40)."""
    return _sentence_stream(n, seed)


def write_calibration(path: Path, kind: str, n: int, seed: int) -> Path:
    """Write ``n`` calibration samples of format ``kind`` (see module docstring) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = _sentence_stream(n, seed)
    # second stream for prompt/response and text/target pairs; offset keeps the pair's halves different
    others = _sentence_stream(n, seed, offset=len(SENTENCES) // 2 + 1)
    labels = [random.Random(seed * 1000 + i).randrange(3) for i in range(n)]

    if kind == "jsonl":
        lines = [json.dumps({"text": t}) for t in texts]
    elif kind == "jsonl_pr":
        lines = [json.dumps({"prompt": t, "response": o}) for t, o in zip(texts, others)]
    elif kind == "jsonl_t5":
        lines = [json.dumps({"text": t, "target": o}) for t, o in zip(texts, others)]
    elif kind == "txt":
        lines = list(texts)
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["text", "label"])
            for t, lab in zip(texts, labels):
                w.writerow([t, lab])
        return path
    else:
        raise ValueError(f"unknown calibration kind {kind!r}; expected one of {CALIBRATION_KINDS}")
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# The command line


def run_cli(argv, cwd) -> tuple[int, str, str]:
    """``iteris`` with ``argv`` from the working directory ``cwd``, in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    import pytest

    from iteris.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()
