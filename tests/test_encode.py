"""Tokenization and the length policy, checked against literal token ids of the tiny word-level tokenizers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_rm.data.encode import (
    MAX_DEFAULT_LENGTH,
    EncodedPair,
    LengthReport,
    default_max_length,
    encode_pairs,
)
from lora_rm.data.read import Row
from lora_rm.data.sequences import encode_texts, special_tokens
from lora_rm.errors import UserError
from lora_rm.model.load import load_tokenizer

PROMPT = "question : how do i make a cake ? answer :"
PROMPT_TOKENS = ["question", ":", "how", "do", "i", "make", "a", "cake", "?", "answer", ":"]

# Renders each user turn as "question : ..." and each assistant turn as "answer : ...", words both tiny
# vocabularies know, after the BOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}question :{% else %}answer :{% endif %} {{ m['content'] }} "
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    return load_tokenizer(str(tiny_gpt2))


@pytest.fixture(scope="module")
def bert_tok(tiny_bert):
    return load_tokenizer(str(tiny_bert))


@pytest.fixture
def chat_tok(tiny_gpt2):
    """A fresh copy of the GPT-2 style tokenizer with a chat template (the module-scoped one stays without)."""
    tok = load_tokenizer(str(tiny_gpt2))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ids(tok, *tokens):
    out = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in out or tok.unk_token in tokens, f"a token of {tokens} is not in the vocab"
    return out


def explicit(prompt, chosen, rejected, where="data.jsonl:1", **extra):
    return Row(where, {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra})


def implicit(chosen, rejected, where="data.jsonl:1"):
    return Row(where, {"chosen": chosen, "rejected": rejected})


# ---------------------------------------------------------------- special tokens


def test_tiny_tokenizers_ids(gpt2_tok, bert_tok):
    # The fixture vocabularies, so that every literal below means what it says.
    assert gpt2_tok.eos_token_id == 0
    assert gpt2_tok.pad_token_id == 0  # load_tokenizer falls back to EOS for a tokenizer without pad
    assert gpt2_tok.padding_side == "right"
    assert (bert_tok.cls_token_id, bert_tok.sep_token_id, bert_tok.pad_token_id) == (2, 3, 0)


def test_special_tokens_decoder_has_none(gpt2_tok):
    # nothing is appended: the sequence is what tokenizer(text) gives, which for GPT-2 has no EOS
    assert special_tokens(gpt2_tok) == ([], [])


def test_special_tokens_bert_gets_cls_and_sep(bert_tok):
    assert special_tokens(bert_tok) == ([2], [3])


class FakeTokenizer:
    """Adds `before`/`after` around a text's ids when asked for special tokens."""

    def __init__(self, before, after, eos_token_id):
        self.before, self.after, self.eos_token_id = before, after, eos_token_id

    def __call__(self, text, add_special_tokens=True):
        core = [7, 8]
        return {"input_ids": self.before + core + self.after if add_special_tokens else core}


@pytest.mark.parametrize(
    ("before", "after", "eos", "expected"),
    [
        ([], [], None, ([], [])),
        ([], [], 5, ([], [])),  # a decoder: no EOS appended
        ([1], [], 5, ([1], [])),  # Llama: its BOS only
        ([1], [2], 5, ([1], [2])),  # an encoder's own suffix
        ([1, 4], [2, 3], None, ([1, 4], [2, 3])),
    ],
)
def test_special_tokens_found_by_probing(before, after, eos, expected):
    assert special_tokens(FakeTokenizer(before, after, eos)) == expected


# ---------------------------------------------------------------- explicit rows


def test_explicit_row_is_tokenizer_of_prompt_plus_response(gpt2_tok):
    pairs, report = encode_pairs(
        [explicit(PROMPT, " sure first", " whatever")], "explicit", gpt2_tok, max_length=64
    )
    prompt_ids = ids(gpt2_tok, *PROMPT_TOKENS)
    assert pairs == [
        EncodedPair(
            chosen=prompt_ids + ids(gpt2_tok, "sure", "first"),
            rejected=prompt_ids + ids(gpt2_tok, "whatever"),
            margin=0.0,
        )
    ]
    # and the literal numbers, in case convert_tokens_to_ids itself misbehaves
    assert pairs[0].chosen == [37, 51, 26, 13, 27, 32, 1, 10, 50, 2, 51, 43, 17]
    assert pairs[0].chosen == gpt2_tok(PROMPT + " sure first")["input_ids"]
    assert report == LengthReport(pairs_in=1)


def test_explicit_row_tokenizes_the_joined_text_across_the_seam(gpt2_tok):
    # "do" + "i" joined is the unknown word "doi": tokenized apart they would be two known words
    pairs, _ = encode_pairs([explicit("question : how do", "i make", " whatever")], "explicit", gpt2_tok, 64)
    assert pairs[0].chosen == gpt2_tok("question : how doi make")["input_ids"]
    assert pairs[0].chosen == [
        *ids(gpt2_tok, "question", ":", "how"),
        gpt2_tok.unk_token_id,
        *ids(gpt2_tok, "make"),
    ]
    apart = gpt2_tok("question : how do", add_special_tokens=False)["input_ids"] + ids(gpt2_tok, "i", "make")
    assert pairs[0].chosen != apart


def test_trailing_pad_ids_are_dropped(gpt2_tok):
    # pad == EOS here: transformers pools the last token that is not the pad id, so a text ending in EOS is read
    # before it, and the sequence ends there
    pairs, _ = encode_pairs(
        [explicit(PROMPT, " sure first <|endoftext|> <|endoftext|>", " whatever<|endoftext|>")],
        "explicit",
        gpt2_tok,
        64,
    )
    assert pairs[0].chosen == ids(gpt2_tok, *PROMPT_TOKENS, "sure", "first")
    assert pairs[0].rejected == ids(gpt2_tok, *PROMPT_TOKENS, "whatever")
    # a pad id inside the text stays
    pairs, _ = encode_pairs([explicit(PROMPT, " sure <|endoftext|> first", " no")], "explicit", gpt2_tok, 64)
    assert pairs[0].chosen == ids(gpt2_tok, *PROMPT_TOKENS, "sure") + [0] + ids(gpt2_tok, "first")


def test_text_of_pad_ids_only_keeps_one(gpt2_tok):
    # transformers reads such a row at position 0: so does lora_rm
    assert encode_texts(["<|endoftext|> <|endoftext|>"], gpt2_tok, 64) == [[0]]


def test_explicit_row_bert_is_cls_prompt_response_sep(bert_tok):
    pairs, _ = encode_pairs([explicit("how do i ?", "sure", "no idea")], "explicit", bert_tok, 64)
    assert pairs[0].chosen == [2, *ids(bert_tok, "how", "do", "i", "?", "sure"), 3]
    assert pairs[0].rejected == [2, *ids(bert_tok, "how", "do", "i", "?", "no", "idea"), 3]
    assert pairs[0].chosen.count(2) == 1 and pairs[0].chosen.count(3) == 1


def test_margin_is_carried_through(gpt2_tok):
    rows = [
        explicit(PROMPT, " sure", " whatever", margin=1.5),
        explicit(PROMPT, " sure", " no", margin=None, where="data.jsonl:2"),
        explicit(PROMPT, " good", " bad", where="data.jsonl:3"),
    ]
    pairs, _ = encode_pairs(rows, "explicit", gpt2_tok, 64)
    assert [p.margin for p in pairs] == [1.5, 0.0, 0.0]
    assert all(isinstance(p.margin, float) for p in pairs)


def test_no_explicit_rows_gives_no_pairs(gpt2_tok):
    pairs, report = encode_pairs([], "explicit", gpt2_tok, 64)
    assert pairs == []
    assert report.pairs_in == 0


@pytest.mark.parametrize("fmt", ["implicit", "conversational"])
def test_no_implicit_rows_gives_no_pairs(gpt2_tok, fmt):
    pairs, report = encode_pairs([], fmt, gpt2_tok, 64)
    assert pairs == []
    assert report == LengthReport(pairs_in=0)


# ---------------------------------------------------------------- implicit rows


def test_implicit_rows_split_at_common_token_prefix(gpt2_tok):
    row = implicit(PROMPT + " sure first you should mix", PROMPT + " whatever")
    pairs, report = encode_pairs([row], "implicit", gpt2_tok, 64)
    prompt_ids = ids(gpt2_tok, *PROMPT_TOKENS)
    assert pairs[0].chosen == prompt_ids + ids(gpt2_tok, "sure", "first", "you", "should", "mix")
    assert pairs[0].rejected == prompt_ids + ids(gpt2_tok, "whatever")
    assert report == LengthReport(pairs_in=1)


def test_implicit_equals_explicit_with_that_prompt(gpt2_tok, bert_tok):
    for tok in (gpt2_tok, bert_tok):
        imp, _ = encode_pairs(
            [implicit(PROMPT + " sure first", PROMPT + " go away")], "implicit", tok, max_length=64
        )
        exp, _ = encode_pairs([explicit(PROMPT, " sure first", " go away")], "explicit", tok, max_length=64)
        assert imp == exp


def test_implicit_truncation_same_as_explicit(gpt2_tok):
    # the common prefix is the prompt, so it is what loses tokens from the left
    imp, rep_i = encode_pairs(
        [implicit(PROMPT + " sure first", PROMPT + " go away")], "implicit", gpt2_tok, 5
    )
    exp, rep_e = encode_pairs([explicit(PROMPT, " sure first", " go away")], "explicit", gpt2_tok, 5)
    assert imp == exp
    assert imp[0].chosen == ids(gpt2_tok, "?", "answer", ":", "sure", "first")
    assert rep_i.prompt_truncated == rep_e.prompt_truncated == 1


def test_implicit_common_prefix_is_by_token_not_by_character(gpt2_tok):
    # "should" and "sure" share the characters "s", but no token: the split is after "answer :"
    row = implicit(PROMPT + " should", PROMPT + " sure")
    pairs, _ = encode_pairs([row], "implicit", gpt2_tok, 64)
    assert pairs[0].chosen[-1:] == ids(gpt2_tok, "should")
    assert pairs[0].rejected[-1:] == ids(gpt2_tok, "sure")
    assert pairs[0].chosen[:-1] == pairs[0].rejected[:-1] == ids(gpt2_tok, *PROMPT_TOKENS)


# ---------------------------------------------------------------- length policy


def test_long_prompt_is_cut_from_the_left(gpt2_tok):
    # 5 tokens: the response (3) and the last 2 prompt tokens
    pairs, report = encode_pairs(
        [explicit(PROMPT, " sure first you", " whatever")], "explicit", gpt2_tok, max_length=5
    )
    assert pairs[0].chosen == ids(gpt2_tok, "answer", ":", "sure", "first", "you")
    assert pairs[0].chosen == [2, 51, 43, 17, 48]
    # the shorter side keeps more of its prompt
    assert pairs[0].rejected == ids(gpt2_tok, "cake", "?", "answer", ":", "whatever")
    assert len(pairs[0].chosen) == 5
    assert report.prompt_truncated == 1
    assert report.response_truncated == 0
    assert report.dropped_identical == []


def test_long_prompt_bert_keeps_cls_and_sep(bert_tok):
    # budget = 5 - 2 ([CLS], [SEP]) = 3
    pairs, report = encode_pairs([explicit(PROMPT, "sure first", "whatever")], "explicit", bert_tok, 5)
    assert pairs[0].chosen == [2, *ids(bert_tok, ":", "sure", "first"), 3]
    assert pairs[0].rejected == [2, *ids(bert_tok, "answer", ":", "whatever"), 3]
    assert report.prompt_truncated == 1


def test_response_longer_than_budget_keeps_its_tail(gpt2_tok):
    response = " sure first you should mix then heat"  # 7 tokens, budget 5
    pairs, report = encode_pairs([explicit(PROMPT, response, " whatever")], "explicit", gpt2_tok, 5)
    assert pairs[0].chosen == ids(gpt2_tok, "you", "should", "mix", "then", "heat")
    assert pairs[0].rejected == ids(gpt2_tok, "cake", "?", "answer", ":", "whatever")
    # a pair with a cut response counts there only, not also as a cut prompt
    assert report.response_truncated == 1
    assert report.prompt_truncated == 0


def test_response_exactly_the_budget_drops_the_whole_prompt(gpt2_tok):
    pairs, report = encode_pairs(
        [explicit(PROMPT, " sure first you should mix", " whatever")], "explicit", gpt2_tok, 5
    )
    assert pairs[0].chosen == ids(gpt2_tok, "sure", "first", "you", "should", "mix")
    assert (report.prompt_truncated, report.response_truncated) == (1, 0)


def test_sequences_never_exceed_max_length(gpt2_tok, bert_tok):
    rows = [
        explicit(PROMPT, " sure first you should mix then heat " * 3, " whatever", where=f"d:{i}")
        for i in range(3)
    ]
    for tok in (gpt2_tok, bert_tok):
        for max_length in (4, 7, 12, 30):
            pairs, _ = encode_pairs(rows, "explicit", tok, max_length)
            assert all(len(p.chosen) <= max_length and len(p.rejected) <= max_length for p in pairs)


def test_fitting_pairs_are_not_counted(gpt2_tok):
    _, report = encode_pairs([explicit(PROMPT, " sure", " whatever")], "explicit", gpt2_tok, 12)
    assert report == LengthReport(pairs_in=1, prompt_truncated=0, response_truncated=0, dropped_identical=[])


def test_pairs_identical_after_truncation_are_dropped_and_located(gpt2_tok):
    rows = [
        explicit(PROMPT, " sure first you", " whatever", where="prefs.jsonl:1"),
        # responses differ only in their first word; a budget of 3 keeps "first you should" on both sides
        explicit(PROMPT, " sure first you should", " no first you should", where="prefs.jsonl:7"),
        explicit(PROMPT, " good", " bad", where="prefs.jsonl:9"),
    ]
    pairs, report = encode_pairs(rows, "explicit", gpt2_tok, max_length=3)
    assert report.dropped_identical == ["prefs.jsonl:7"]
    assert report.pairs_in == 3
    assert len(pairs) == 2
    assert pairs[0].chosen == ids(gpt2_tok, "sure", "first", "you")
    assert pairs[1].chosen == ids(gpt2_tok, "answer", ":", "good")
    assert report.response_truncated == 1  # the dropped pair
    assert report.prompt_truncated == 2
    assert report.summary() == (
        "2/3 pairs kept; prompt truncated from the left in 2, response truncated (tail kept) in 1, "
        "dropped 1 that became identical after truncation"
    )


def test_responses_identical_as_tokens_are_dropped(gpt2_tok):
    # different strings, same tokens: the whitespace pre-tokenizer ignores the extra spaces
    pairs, report = encode_pairs(
        [explicit(PROMPT, " sure  first", " sure first", where="x.csv:4")], "explicit", gpt2_tok, 64
    )
    assert pairs == []
    assert report.dropped_identical == ["x.csv:4"]


def test_length_policy_error_lists_every_long_side(gpt2_tok):
    rows = [
        explicit(PROMPT, " sure first you", " whatever", where="prefs.jsonl:1"),  # 14 and 12 tokens
        explicit("how ?", " sure", " no", where="prefs.jsonl:2"),  # 3 tokens each: fits
    ]
    with pytest.raises(UserError) as e:
        encode_pairs(rows, "explicit", gpt2_tok, max_length=13, policy="error")
    msg = str(e.value)
    assert msg.startswith("1 sequence(s) over the length limit")
    assert "prefs.jsonl:1: chosen: 14 tokens > max_length 13" in msg
    assert "rejected" not in msg
    assert "prefs.jsonl:2" not in msg
    with pytest.raises(UserError) as e:
        encode_pairs(rows, "explicit", gpt2_tok, max_length=12, policy="error")
    assert "prefs.jsonl:1: rejected: 12 tokens" not in str(e.value)
    with pytest.raises(UserError) as e:
        encode_pairs(rows, "explicit", gpt2_tok, max_length=11, policy="error")
    assert "2 sequence(s) over the length limit" in str(e.value)
    assert "prefs.jsonl:1: rejected: 12 tokens > max_length 11" in str(e.value)


def test_length_policy_error_passes_fitting_pairs_unchanged(gpt2_tok):
    row = explicit(PROMPT, " sure first you", " whatever")
    assert encode_pairs([row], "explicit", gpt2_tok, 14, policy="error") == encode_pairs(
        [row], "explicit", gpt2_tok, 14
    )


def test_max_length_with_no_room_for_text(bert_tok):
    with pytest.raises(UserError, match="max_length 3"):
        encode_pairs([explicit(PROMPT, "sure", "no")], "explicit", bert_tok, 3)


# ---------------------------------------------------------------- conversational rows


def conv_row(where="chat.jsonl:1", with_prompt=True):
    user = {"role": "user", "content": "how do i cook rice ?"}
    good = {"role": "assistant", "content": "sure first"}
    bad = {"role": "assistant", "content": "whatever"}
    if with_prompt:
        return Row(where, {"prompt": [user], "chosen": [good], "rejected": [bad]})
    return Row(where, {"chosen": [user, good], "rejected": [user, bad]})


COOK_RICE = ["question", ":", "how", "do", "i", "cook", "rice", "?"]


def test_conversational_without_chat_template_is_a_user_error(gpt2_tok, bert_tok):
    for tok in (gpt2_tok, bert_tok):
        with pytest.raises(UserError, match="chat template") as e:
            encode_pairs([conv_row("chat.jsonl:3")], "conversational", tok, 64)
        assert "chat.jsonl:3" in str(e.value)


@pytest.mark.parametrize("with_prompt", [True, False])
def test_conversational_encodes_rendered_text_once(chat_tok, with_prompt):
    pairs, report = encode_pairs([conv_row(with_prompt=with_prompt)], "conversational", chat_tok, 64)
    bos = chat_tok.bos_token_id
    assert bos == 0
    assert pairs[0].chosen == [bos, *ids(chat_tok, *COOK_RICE, "answer", ":", "sure", "first")]
    assert pairs[0].rejected == [bos, *ids(chat_tok, *COOK_RICE, "answer", ":", "whatever")]
    # exactly one BOS (from the template), no tokenizer specials or EOS added on top
    assert pairs[0].chosen.count(bos) == 1 and pairs[0].rejected.count(bos) == 1
    assert report == LengthReport(pairs_in=1)


def test_conversational_matches_tokenized_rendering(chat_tok):
    row = conv_row(with_prompt=False)
    text = chat_tok.apply_chat_template(row.fields["chosen"], tokenize=False)
    assert text == "<|endoftext|>question : how do i cook rice ? answer : sure first "
    pairs, _ = encode_pairs([row], "conversational", chat_tok, 64)
    assert pairs[0].chosen == chat_tok(text, add_special_tokens=False)["input_ids"]


def test_conversational_with_bert_style_template_has_single_cls_sep(tiny_bert):
    tok = load_tokenizer(str(tiny_bert))
    tok.chat_template = "[CLS] {% for m in messages %}{{ m['content'] }} {% endfor %}[SEP]"
    pairs, _ = encode_pairs([conv_row()], "conversational", tok, 64)
    assert pairs[0].chosen == [2, *ids(tok, "how", "do", "i", "cook", "rice", "?", "sure", "first"), 3]


def test_conversational_truncation_keeps_the_answer(chat_tok):
    pairs, report = encode_pairs([conv_row()], "conversational", chat_tok, max_length=5)
    assert pairs[0].chosen[-2:] == ids(chat_tok, "sure", "first")
    assert all(len(p.chosen) <= 5 and len(p.rejected) <= 5 for p in pairs)
    assert report.prompt_truncated == 1


def test_conversational_truncation_keeps_bos(chat_tok):
    pairs, _ = encode_pairs([conv_row()], "conversational", chat_tok, max_length=5)
    assert pairs[0].chosen[0] == chat_tok.bos_token_id
    assert pairs[0].chosen[-2:] == ids(chat_tok, "sure", "first")
    assert len(pairs[0].chosen) <= 5


# ---------------------------------------------------------------- default_max_length


def tok_with(limit):
    return SimpleNamespace(model_max_length=limit)


@pytest.mark.parametrize(
    ("config", "tok_limit", "expected"),
    [
        (SimpleNamespace(n_positions=2048), 1_000_000_000_000_000_019_884_624_838_656, 1024),
        (SimpleNamespace(n_positions=512), 1_000_000_000_000_000_019_884_624_838_656, 512),
        (SimpleNamespace(max_position_embeddings=4096), 2048, 1024),
        (SimpleNamespace(max_position_embeddings=4096), 300, 300),
        (SimpleNamespace(n_positions=128), 300, 128),
        (SimpleNamespace(max_seq_len=200), None, 200),
        (SimpleNamespace(seq_length=100), None, 100),
        (SimpleNamespace(), None, 1024),
        (SimpleNamespace(n_positions=None), 700, 700),
        (SimpleNamespace(max_position_embeddings=0), 0, 1024),
    ],
)
def test_default_max_length(config, tok_limit, expected):
    assert default_max_length(config, tok_with(tok_limit)) == expected


def test_default_max_length_cap():
    assert MAX_DEFAULT_LENGTH == 1024


def test_default_max_length_of_tiny_models(tiny_gpt2, tiny_bert, gpt2_tok, bert_tok):
    from transformers import AutoConfig

    assert default_max_length(AutoConfig.from_pretrained(str(tiny_gpt2)), gpt2_tok) == 64
    assert default_max_length(AutoConfig.from_pretrained(str(tiny_bert)), bert_tok) == 64
    # the position limit alone, when the tokenizer has none (transformers' "very large" sentinel)
    assert default_max_length(AutoConfig.from_pretrained(str(tiny_gpt2)), tok_with(int(1e30))) == 64


# ---------------------------------------------------------------- texts far over the limit


def test_a_huge_text_is_cut_by_characters_first_and_keeps_the_exact_tail(gpt2_tok):
    # more than max_length * CHARS_PER_TOKEN_CAP characters: cut from the left before tokenizing (a 50 MB row
    # would otherwise cost gigabytes of token objects); the kept tokens are those of the whole text
    from lora_rm.data.sequences import CHARS_PER_TOKEN_CAP

    over = 8 * CHARS_PER_TOKEN_CAP + 4096  # characters a text of max_length 8 may have before it is cut
    long_answer = " sure first you should mix then heat" * (over // 20)  # 36 characters a repeat
    long_prompt = "question : how do i make a cake ? " * (over // 20) + "answer :"
    rows = [
        explicit(PROMPT, long_answer, " whatever", where="big.jsonl:1"),
        explicit(long_prompt, " sure first", " whatever", where="big.jsonl:2"),
    ]
    pairs, report = encode_pairs(rows, "explicit", gpt2_tok, max_length=8)
    assert pairs[0].chosen == gpt2_tok(PROMPT + long_answer)["input_ids"][-8:]
    assert pairs[1].chosen == gpt2_tok(long_prompt + " sure first")["input_ids"][-8:]
    assert pairs[1].rejected == gpt2_tok(long_prompt + " whatever")["input_ids"][-8:]
    assert (report.response_truncated, report.prompt_truncated) == (1, 1)
    with pytest.raises(UserError, match=r"big.jsonl:1: chosen: more than \d+ tokens > max_length 8"):
        encode_pairs(rows, "explicit", gpt2_tok, max_length=8, policy="error")
    assert encode_texts([PROMPT + long_answer], gpt2_tok, 8) == [pairs[0].chosen]
