"""Tiny local models and data: the tests never touch a model hub or data outside the repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lora_rm.data.checks import check_rows, detect_format
from lora_rm.data.read import Row, load_rows
from lora_rm.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Scoring in fp32, so a test means the same on CPUs with and without bf16 (auto picks bf16 on AMX CPUs); the
# tests of the dtype choice pass dtype= or --dtype themselves.
os.environ.setdefault("LORA_RM_SCORE_DTYPE", "fp32")


def integration(fixture_function):
    """Put every test that uses this fixture in the integration lane (`pytest -m integration`): the fixture
    trains a model, starts a process or a server. Apply it under `@pytest.fixture(...)`."""
    fixture_function.integration = True
    return fixture_function


def pytest_collection_modifyitems(config, items):
    """The two lanes: a test is in the integration lane when it carries the marker or uses an `integration`
    fixture (at any depth); `pytest` alone runs the unit lane (pyproject's addopts: -m "not integration")."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info else ()
        if any(getattr(d[-1].func, "integration", False) for d in defs):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process, fixed by the first `Accelerator(...)`: a test that
    builds one (or calls train()) must not decide the precision of the next. Reset after every test."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


WORDS = (
    "question answer how do i make a cake cook rice fix bike learn python sure first you should then "
    "mix heat stir check the it is easy good great help whatever no idea figure out yourself go away "
    "bad boring ask someone else thanks for asking here are steps"
).split()


def _word_tokenizer(kind: str):
    """A word-level tokenizer built with `tokenizers`: GPT-2 style (EOS only) or BERT style ([CLS] x [SEP])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] if kind == "gpt2" else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)) + ["?", ":", ".", ","])}
    unk = "<|endoftext|>" if kind == "gpt2" else "[UNK]"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = (
        pre_tokenizers.WhitespaceSplit() if kind == "gpt2" else pre_tokenizers.BertPreTokenizer()
    )
    if kind == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=unk, eos_token=unk, unk_token=unk, model_max_length=64
        )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def _save_tiny_model(tmp_path_factory, kind: str, model_class, config_class, **config) -> Path:
    """A new folder `tiny-<kind>`: a `model_class` initialised from seed 0 and `_word_tokenizer(kind)`."""
    path = tmp_path_factory.mktemp(f"tiny-{kind}")
    tokenizer = _word_tokenizer(kind)
    torch.manual_seed(0)
    model_class(config_class(vocab_size=len(tokenizer), **config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A folder like the hub's `gpt2`: a causal-LM checkpoint (no score head) and a tokenizer without pad."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save_tiny_model(
        tmp_path_factory,
        "gpt2",
        GPT2LMHeadModel,
        GPT2Config,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A folder like all-MiniLM: a BertModel checkpoint (no classifier) and a WordPiece-style tokenizer."""
    from transformers import BertConfig, BertModel

    return _save_tiny_model(
        tmp_path_factory,
        "bert",
        BertModel,
        BertConfig,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )


GOOD = [
    "sure first you should mix then heat",
    "here are steps first check the it is easy",
    "great question you should stir then check",
]
BAD = ["whatever", "no idea figure it out yourself", "go away ask someone else it is boring"]
PROMPTS = [
    "question : how do i make a cake ? answer :",
    "question : how do i cook rice ? answer :",
    "question : how do i fix bike ? answer :",
    "question : how do i learn python ? answer :",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# reading and checking a data file the way training does (test_data.py, test_checks.py)
ROW = {"prompt": "question : how do i cook rice ?", "chosen": " sure first", "rejected": " whatever"}


def load_checked(path: Path) -> tuple[list[Row], str]:
    """What training does with a local file: read, detect the format, check every row."""
    rows, held_out = load_rows(str(path))
    assert held_out == []
    fmt = detect_format(rows, str(path))
    check_rows(rows, fmt, str(path))
    return rows, fmt


def user_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_checked(path)
    return str(e.value)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl_with(tmp_path: Path, *rows: dict, name: str = "data.jsonl") -> Path:
    return write_jsonl(tmp_path / name, [*rows])


def preference_rows(n: int) -> list[dict]:
    """Explicit-prompt rows whose chosen answer is always one of GOOD and rejected one of BAD."""
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "chosen": " " + GOOD[i % len(GOOD)],
            "rejected": " " + BAD[(i // 3) % len(BAD)],
        }
        for i in range(n)
    ]


@pytest.fixture
def prefs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(48))


def tiny_run_config(base: Path, data: Path, output_dir: Path, **overrides):
    """A TrainConfig for a seconds-long CPU run on a tiny model: no quantization, fp32 forced (so a test means
    the same on CPUs with and without bf16), 4 x 2 pairs a step, a high learning rate, 25% held out, no LoRA
    dropout, seed 0; `overrides` win."""
    from lora_rm.config import TrainConfig

    options = dict(
        quant="none", precision="fp32", batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3,
        eval_fraction=0.25, lora_dropout=0.0, seed=0,
    )  # fmt: skip
    return TrainConfig(
        base=str(base), dataset=str(data), output_dir=str(output_dir), **{**options, **overrides}
    )


@pytest.fixture(scope="session")
@integration
def trained_run(tmp_path_factory, tiny_gpt2):
    """The one trained model the suite shares (test_train, test_score, test_evaluate, test_export, test_hub, ...):
    a short run on the tiny GPT-2 with a merged model, eval outputs and reward statistics (~3 s idle)."""
    from lora_rm.training.loop import train

    tmp = tmp_path_factory.mktemp("trained-run")
    data = write_jsonl(tmp / "prefs.jsonl", preference_rows(48))
    cfg = tiny_run_config(
        tiny_gpt2, data, tmp / "run", epochs=8, eval_steps=1000, logging_steps=2, merge=True
    )  # eval once, at the end
    return train(cfg, log=lambda *_: None)


CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"


def caller_tokenizer(kind: str):
    """A word-level tokenizer of one of five kinds: GPT-2's (pad == EOS, nothing added), Llama's (adds BOS),
    one with a distinct pad token, a chat-template model's (pad == EOS == `<|im_end|>`, `<unk>` at id 0), and
    a Llama-3-style chat model's whose tokenizer adds BOS and whose template writes it too (`chat_bos`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {
        "gpt2": ["<|endoftext|>"],
        "llama_bos": ["<unk>", "<s>", "</s>"],
        "distinct_pad": ["<|endoftext|>", "<pad>"],
        "chat": ["<unk>", "<|im_start|>", "<|im_end|>"],
        "chat_bos": ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"],
    }[kind]
    words = sorted(set(WORDS) | {"user", "assistant"})
    vocab = {t: i for i, t in enumerate(specials + words + ["?", ":", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {
        "gpt2": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        "llama_bos": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "distinct_pad": {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "<|endoftext|>"},
        "chat": {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<unk>"},
        "chat_bos": {
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<unk>",
        },
    }[kind]
    if kind in ("llama_bos", "chat_bos"):  # adds BOS to every text, as Llama's tokenizer does
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **names)
    if kind == "chat":
        out.chat_template = CHAT_TEMPLATE
    if kind == "chat_bos":  # its template writes BOS too: the rendered text tokenized with specials has two
        out.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    return out


def caller_base(folder: Path, kind: str) -> Path:
    """A tiny causal-LM checkpoint with the tokenizer of `kind` (as a hub base model is: no score head)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = caller_tokenizer(kind)
    torch.manual_seed(0)
    if kind in ("gpt2", "distinct_pad"):
        config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
