"""Turn checked rows into token ids under an explicit length policy.

Every sequence is the text as the rest of the ecosystem tokenizes it, so that the reward lora_rm trains,
evaluates and scores is the one `AutoModelForSequenceClassification`, `pipeline` and TRL read from the saved
model: `tokenizer(prompt + response)` for explicit prompts and ranked lists, `tokenizer(text)` for implicit
prompts, and the chat template rendered to text and tokenized without adding special tokens again (the
template has them) for conversations. Nothing is appended. Trailing pad-id tokens are dropped (when pad ==
EOS, a text ending in EOS): transformers pools the rightmost token that is not the pad id, so they never carry
the reward, and in a causal model dropping them changes nothing before them.

When a sequence is too long, its text loses tokens from the left (the tokenizer's own special tokens, e.g.
BOS or [CLS]/[SEP], are kept) so that the end of the response, where the reward is read, always survives.
Pairs whose two sides become identical are dropped. Every truncation and drop is counted. Ranked lists of K
responses become weighted pairs of one group (`encode_rankings`), and single sequences for scoring are built
by the same rules (`encode_sequences`, `encode_texts`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lora_rm.data import Row
from lora_rm.errors import UserError, problems_message

MAX_DEFAULT_LENGTH = 1024


@dataclass
class EncodedPair:
    """Token ids of one preference pair; the reward is read at the last id of each side."""

    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    weight: float = 1.0  # the pair's share of the loss: 1, or 1/(pairs of its ranked list)
    group: int | None = None  # the ranked list (row) the pair comes from; None for a plain pair


@dataclass
class LengthReport:
    """What the length policy did to a set of rows."""

    pairs_in: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_identical: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = self.pairs_in - len(self.dropped_identical)
        return (
            f"{kept}/{self.pairs_in} pairs kept; prompt truncated from the left in {self.prompt_truncated}, "
            f"response truncated (tail kept) in {self.response_truncated}, "
            f"dropped {len(self.dropped_identical)} that became identical after truncation"
        )


def default_max_length(model_config: Any, tokenizer: Any) -> int:
    """The model's position limit (and the tokenizer's, if set), capped at 1024."""
    limits = [MAX_DEFAULT_LENGTH]
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    return min(limits)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer itself puts before and after a text (BERT: [CLS] / [SEP]; Llama: <s> / -; GPT-2:
    - / -), found by tokenizing a probe with and without special tokens, which works for every fast tokenizer.
    """
    probe = "reward"
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core), 0)
    return list(full[:start]), list(full[start + len(core) :])


@dataclass
class _Text:
    """One tokenized text: the tokenizer's special ids around it, the text's own ids, and how many of those
    belong to the prompt (only used to report which part truncation cut)."""

    prefix: list[int]
    core: list[int]
    suffix: list[int]
    prompt_len: int = 0
    cut_chars: int = 0  # characters dropped from the left before tokenizing (a text far over max_length)


# A text longer than this many characters per token of max_length loses characters from its left before it is
# tokenized: its kept tail is the same (the cut lies thousands of tokens before it), and a 50 MB row no longer
# costs gigabytes of token objects. No tokenizer of note has tokens this long on average.
CHARS_PER_TOKEN_CAP = 128


def _char_cap(max_length: int | None) -> int | None:
    return None if max_length is None else max_length * CHARS_PER_TOKEN_CAP + 4096


def _tokenize_texts(
    tokenizer: Any, texts: list[str], chat: bool, max_length: int | None = None
) -> list[_Text]:
    """Tokenize full texts as callers of the saved model do: plain text with the tokenizer's special tokens,
    rendered chat text without (the template already holds them; adding them again doubles BOS). A text far
    over `max_length` tokens is cut from the left first (`CHARS_PER_TOKEN_CAP`)."""
    if not texts:
        return []
    cap = _char_cap(max_length)
    cuts = [max(0, len(t) - cap) if cap else 0 for t in texts]
    shown = [t[c:] for t, c in zip(texts, cuts)]
    out = []
    if chat:
        bos = getattr(tokenizer, "bos_token_id", None)
        for ids, text, cut in zip(tokenizer(shown, add_special_tokens=False)["input_ids"], texts, cuts):
            if cut and bos is not None:  # the template's BOS, where the cut text lost it
                ids = tokenizer(text[:64], add_special_tokens=False)["input_ids"][:1] + ids
            keep = 1 if bos is not None and ids[:1] == [bos] else 0  # the template's BOS survives truncation
            out.append(_Text(ids[:keep], ids[keep:], [], cut_chars=cut))
    else:
        prefix, suffix = special_tokens(tokenizer)
        for ids, cut in zip(tokenizer(shown, add_special_tokens=True)["input_ids"], cuts):
            head = prefix if ids[: len(prefix)] == prefix else []
            tail = (
                suffix
                if suffix and len(ids) > len(head) + len(suffix) and ids[-len(suffix) :] == suffix
                else []
            )
            out.append(_Text(head, ids[len(head) : len(ids) - len(tail)], tail, cut_chars=cut))
    if any(t.cut_chars and len(t.core) <= max_length for t in out):  # tokens over 128 characters: be exact
        return _tokenize_texts(tokenizer, texts, chat)
    return out


def _with_prompt_len(texts: list[_Text], prompts: list[list[int]]) -> list[_Text]:
    for t, p in zip(texts, prompts):
        t.prompt_len = common_prefix_len(p, t.core)
    return texts


def _prompt_ids(tokenizer: Any, prompts: list[str], sides: list[_Text]) -> list[list[int]]:
    """Token ids of each prompt, or of the part of it left in its side's text after a character cut."""
    return _ids(tokenizer, [p[t.cut_chars :] for p, t in zip(prompts, sides)])


def _fit(text: _Text, max_length: int, pad_token_id: int | None) -> tuple[list[int], str | None]:
    """The ids of `text` within `max_length` (the text loses tokens from its left, its special tokens stay),
    without trailing pad ids, and what was cut: None, "prompt" or "response"."""
    budget = max_length - len(text.prefix) - len(text.suffix)
    cut = None
    core = text.core
    if len(core) > budget:
        drop = len(core) - budget
        core, cut = core[drop:], ("prompt" if drop <= text.prompt_len else "response")
    ids = text.prefix + core + text.suffix
    while len(ids) > 1 and ids[-1] == pad_token_id:  # never read by transformers' pooling
        ids = ids[:-1]
    return ids, cut


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this tokenizer"
        raise UserError(
            f"{where}: chosen: a list of chat messages needs a tokenizer with a chat template to render "
            f"it, and {name} has none; use a chat model's tokenizer, or give prompt, chosen and rejected as text"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _refuse_too_long(too_long: list[str]) -> None:
    if too_long:
        header = f"{len(too_long)} sequence(s) over the length limit (--length-policy error):"
        raise UserError(problems_message(header, too_long))


def _check_budget(tokenizer: Any, max_length: int) -> None:
    prefix, suffix = special_tokens(tokenizer)
    if max_length - len(prefix) - len(suffix) < 2:
        raise UserError(f"max_length {max_length} leaves no room for text after the special tokens")


def _over(text: _Text, max_length: int) -> str:
    """How many tokens `text` has when it is longer than `max_length` ("" when it fits)."""
    n = len(text.prefix) + len(text.core) + len(text.suffix)
    if text.cut_chars:
        return f"more than {n} tokens"
    return f"{n} tokens" if n > max_length else ""


def _pair_texts(
    rows: list[Row], fmt: str, tokenizer: Any, max_length: int
) -> tuple[list[_Text], list[_Text]]:
    """The chosen and rejected texts of each row, tokenized whole, with the prompt's share of each."""
    chat = fmt == "conversational"
    if chat:
        texts_c, texts_r = [], []
        for r in rows:
            head = r.fields.get("prompt") or []
            texts_c.append(_render_chat(tokenizer, head + r.fields["chosen"], r.where))
            texts_r.append(_render_chat(tokenizer, head + r.fields["rejected"], r.where))
    elif fmt == "explicit":
        texts_c = [r.fields["prompt"] + r.fields["chosen"] for r in rows]
        texts_r = [r.fields["prompt"] + r.fields["rejected"] for r in rows]
    else:
        texts_c = [r.fields["chosen"] for r in rows]
        texts_r = [r.fields["rejected"] for r in rows]
    side_c = _tokenize_texts(tokenizer, texts_c, chat, max_length)
    side_r = _tokenize_texts(tokenizer, texts_r, chat, max_length)
    if fmt == "explicit":
        prompts = [r.fields["prompt"] for r in rows]
        if not any(t.cut_chars for t in side_c + side_r):  # the common case: one tokenization of the prompts
            ids = _ids(tokenizer, prompts)
            return _with_prompt_len(side_c, ids), _with_prompt_len(side_r, ids)
        return (
            _with_prompt_len(side_c, _prompt_ids(tokenizer, prompts, side_c)),
            _with_prompt_len(side_r, _prompt_ids(tokenizer, prompts, side_r)),
        )
    # the prompt is the longest common token prefix of the two texts
    shared = [c.core[: common_prefix_len(c.core, r.core)] for c, r in zip(side_c, side_r)]
    return _with_prompt_len(side_c, shared), _with_prompt_len(side_r, shared)


def encode_pairs(
    rows: list[Row], fmt: str, tokenizer: Any, max_length: int, policy: str = "truncate"
) -> tuple[list[EncodedPair], LengthReport]:
    """Tokenize checked rows of one format into pairs that fit `max_length` tokens, with a report.

    policy "truncate" cuts as the module docstring says; "error" raises UserError listing every row
    with a side over `max_length` tokens.
    """
    _check_budget(tokenizer, max_length)
    side_c, side_r = _pair_texts(rows, fmt, tokenizer, max_length)
    if policy == "error":
        too_long = [
            f"{row.where}: {side}: {n} > max_length {max_length}"
            for row, tc, tr in zip(rows, side_c, side_r)
            for side, n in (("chosen", _over(tc, max_length)), ("rejected", _over(tr, max_length)))
            if n
        ]
        _refuse_too_long(too_long)
    report, pairs = LengthReport(pairs_in=len(rows)), []
    pad = tokenizer.pad_token_id
    for row, text_c, text_r in zip(rows, side_c, side_r):
        chosen, cut_c = _fit(text_c, max_length, pad)
        rejected, cut_r = _fit(text_r, max_length, pad)
        cuts = {cut_c, cut_r}
        report.response_truncated += "response" in cuts
        report.prompt_truncated += "prompt" in cuts and "response" not in cuts
        if chosen == rejected:
            report.dropped_identical.append(row.where)
            continue
        pairs.append(EncodedPair(chosen, rejected, float(row.fields.get("margin") or 0.0)))
    return pairs, report


def encode_rankings(
    rows: list[Row], tokenizer: Any, max_length: int, policy: str = "truncate", loss: str = "all_pairs"
) -> tuple[list[EncodedPair], LengthReport]:
    """Expand ranked lists (`prompt`, `responses` best first) into pairs of one `group` per row; each
    response is tokenized and cut as an explicit-prompt side is (`tokenizer(prompt + response)`).

    loss "plackett_luce": the chain of adjacent pairs (1, 2), (2, 3), ... that `loss.chain_losses` reads
    back, each of weight 1/(pairs kept). Otherwise all K-choose-2 pairs (i, j), i < j, in order, each of
    weight 1/(pairs kept) ("all_pairs": every list counts once) or 1 ("pairwise": every pair counts once).
    Pairs whose sides become identical are dropped and counted as in `encode_pairs`.
    """
    _check_budget(tokenizer, max_length)
    report, pairs, too_long = LengthReport(), [], []
    for group, row in enumerate(rows):
        texts = [row.fields["prompt"] + r for r in row.fields["responses"]]
        sides = _tokenize_texts(tokenizer, texts, False, max_length)
        sides = _with_prompt_len(sides, _prompt_ids(tokenizer, [row.fields["prompt"]] * len(texts), sides))
        too_long += [
            f"{row.where}: responses[{k}]: {n} > max_length {max_length}"
            for k, t in enumerate(sides)
            if (n := _over(t, max_length))
        ]
        fitted = [_fit(t, max_length, tokenizer.pad_token_id) for t in sides]
        if loss == "plackett_luce":
            links = [(i, i + 1) for i in range(len(fitted) - 1)]
        else:
            links = list(itertools.combinations(range(len(fitted)), 2))
        kept = []
        for i, j in links:
            cuts = {fitted[i][1], fitted[j][1]}
            report.pairs_in += 1
            report.response_truncated += "response" in cuts
            report.prompt_truncated += "prompt" in cuts and "response" not in cuts
            if fitted[i][0] == fitted[j][0]:
                report.dropped_identical.append(f"{row.where} (responses {i} and {j})")
            else:
                kept.append((i, j))
        weight = 1.0 if loss == "pairwise" else 1.0 / max(len(kept), 1)
        pairs += [EncodedPair(fitted[i][0], fitted[j][0], 0.0, weight, group) for i, j in kept]
    if policy == "error":
        _refuse_too_long(too_long)
    return pairs, report


def encode_rows(
    rows: list[Row], fmt: str, tokenizer: Any, max_length: int, policy: str = "truncate", loss: str = "auto"
) -> tuple[list[EncodedPair], LengthReport]:
    """`encode_rankings` for ranked lists (loss "auto" meaning all_pairs), else `encode_pairs`."""
    if fmt == "ranking":
        return encode_rankings(rows, tokenizer, max_length, policy, "all_pairs" if loss == "auto" else loss)
    return encode_pairs(rows, fmt, tokenizer, max_length, policy)


def encode_texts(
    texts: Sequence[str], tokenizer: Any, max_length: int, chat: bool = False
) -> list[list[int]]:
    """Token ids of full texts, each built as one side of a training pair: `tokenizer(text)` (chat: a rendered
    chat template, tokenized without adding special tokens again), cut to `max_length` from the left."""
    _check_budget(tokenizer, max_length)
    pad = tokenizer.pad_token_id
    return [_fit(t, max_length, pad)[0] for t in _tokenize_texts(tokenizer, list(texts), chat, max_length)]


def chat_text(tokenizer: Any, prompt: list[dict[str, str]], response: Any, where: str = "sequence") -> str:
    """A chat prompt (messages) and the assistant's reply (text or messages) rendered with the chat template."""
    reply = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    return _render_chat(tokenizer, list(prompt) + list(reply), where)


def encode_sequences(
    prompts: Sequence[Any], responses: Sequence[Any], tokenizer: Any, max_length: int
) -> list[list[int]]:
    """Token ids of single (prompt, response) sequences, each built exactly as one side of a training pair:
    text prompts give `tokenizer(prompt + response)`; a prompt that is a list of chat messages (with the
    assistant's reply as text or messages) is rendered with the chat template. Same length policy.
    Raises UserError when text and chat prompts are mixed.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    chat = [isinstance(p, list) for p in prompts]
    if any(chat) and not all(chat):
        raise UserError("prompts mix text and chat messages: give all as text or all as message lists")
    if any(chat):
        texts = [
            chat_text(tokenizer, p, r, f"sequence {n + 1}")
            for n, (p, r) in enumerate(zip(prompts, responses))
        ]
        return encode_texts(texts, tokenizer, max_length, chat=True)
    return encode_texts([p + r for p, r in zip(prompts, responses)], tokenizer, max_length)
