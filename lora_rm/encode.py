"""Turn checked rows into token ids under an explicit length policy.

Every sequence is `special prefix + prompt + response + special suffix (+ EOS for decoders)`. When a
sequence is too long, the prompt loses tokens from its left so that the end of the response and the
EOS, where the reward is read, always survive; a response longer than the whole budget keeps its tail.
Pairs whose two sides become identical are dropped. Every truncation and drop is counted.
Ranked lists of K responses become weighted pairs of one group (`encode_rankings`), and single
sequences for scoring are built by the same rules (`encode_sequences`).
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
    """The ids a tokenizer puts before and after a single text (BERT: [CLS] / [SEP]; Llama: <s> / -).

    Found by tokenizing a probe with and without special tokens, which works for every fast tokenizer.
    A tokenizer that ends a text with nothing (GPT-2, Llama: decoders) gets an EOS appended: the reward
    is read at the last token, and there it has seen the whole answer and that the answer is over.
    """
    probe = "reward"
    core = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core), 0)
    prefix, suffix = list(full[:start]), list(full[start + len(core) :])
    eos = tokenizer.eos_token_id
    if not suffix and eos is not None:
        suffix.append(eos)
    return prefix, suffix


def _fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], str | None]:
    if len(prompt) + len(response) <= budget:
        return prompt + response, None
    if len(response) <= budget:
        return prompt[len(prompt) + len(response) - budget :] + response, "prompt"
    return response[len(response) - budget :], "response"


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


def _budget(max_length: int, prefix: list[int], suffix: list[int]) -> int:
    budget = max_length - len(prefix) - len(suffix)
    if budget < 2:
        raise UserError(f"max_length {max_length} leaves no room for text after the special tokens")
    return budget


def encode_pairs(
    rows: list[Row], fmt: str, tokenizer: Any, max_length: int, policy: str = "truncate"
) -> tuple[list[EncodedPair], LengthReport]:
    """Tokenize checked rows of one format into pairs that fit `max_length` tokens, with a report.

    policy "truncate" cuts as the module docstring says; "error" raises UserError listing every row
    with a side over `max_length` tokens.
    """
    prefix, suffix = special_tokens(tokenizer)
    if fmt == "conversational":
        # The chat template already renders BOS and end-of-turn tokens: tokenizing its text again with
        # special tokens would double them, so tokenize once without.
        prefix, suffix = [], []
        texts_c, texts_r = [], []
        for r in rows:
            head = r.fields.get("prompt") or []
            texts_c.append(_render_chat(tokenizer, head + r.fields["chosen"], r.where))
            texts_r.append(_render_chat(tokenizer, head + r.fields["rejected"], r.where))
    else:
        texts_c = [r.fields["chosen"] for r in rows]
        texts_r = [r.fields["rejected"] for r in rows]
    ids_c, ids_r = _ids(tokenizer, texts_c), _ids(tokenizer, texts_r)
    if fmt == "explicit":
        prompts = _ids(tokenizer, [r.fields["prompt"] for r in rows])
    else:  # the prompt is the longest common token prefix of the two full texts
        prompts = [c[: common_prefix_len(c, r)] for c, r in zip(ids_c, ids_r)]
        ids_c = [c[len(p) :] for c, p in zip(ids_c, prompts)]
        ids_r = [r[len(p) :] for r, p in zip(ids_r, prompts)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if fmt == "conversational" and bos is not None and prompts and all(p[:1] == [bos] for p in prompts):
        prefix, prompts = [bos], [p[1:] for p in prompts]  # the template's BOS must survive prompt truncation

    budget = _budget(max_length, prefix, suffix)
    report, pairs = LengthReport(pairs_in=len(rows)), []
    if policy == "error":
        too_long = [
            f"{row.where}: {side}: {len(p) + len(r) + len(prefix) + len(suffix)} tokens > max_length {max_length}"
            for row, p, rc, rr in zip(rows, prompts, ids_c, ids_r)
            for side, r in (("chosen", rc), ("rejected", rr))
            if len(p) + len(r) > budget
        ]
        _refuse_too_long(too_long)
    for row, prompt, resp_c, resp_r in zip(rows, prompts, ids_c, ids_r):
        chosen, cut_c = _fit(prompt, resp_c, budget)
        rejected, cut_r = _fit(prompt, resp_r, budget)
        cuts = {cut_c, cut_r}
        report.response_truncated += "response" in cuts
        report.prompt_truncated += "prompt" in cuts and "response" not in cuts
        if chosen == rejected:
            report.dropped_identical.append(row.where)
            continue
        margin = float(row.fields.get("margin") or 0.0)
        pairs.append(EncodedPair(prefix + chosen + suffix, prefix + rejected + suffix, margin))
    return pairs, report


def encode_rankings(
    rows: list[Row], tokenizer: Any, max_length: int, policy: str = "truncate", loss: str = "all_pairs"
) -> tuple[list[EncodedPair], LengthReport]:
    """Expand ranked lists (`prompt`, `responses` best first) into pairs of one `group` per row; each
    response is tokenized and cut as an explicit-prompt side is.

    loss "plackett_luce": the chain of adjacent pairs (1, 2), (2, 3), ... that `loss.chain_losses` reads
    back, each of weight 1/(pairs kept). Otherwise all K-choose-2 pairs (i, j), i < j, in order, each of
    weight 1/(pairs kept) ("all_pairs": every list counts once) or 1 ("pairwise": every pair counts once).
    Pairs whose sides become identical are dropped and counted as in `encode_pairs`.
    """
    prefix, suffix = special_tokens(tokenizer)
    budget = _budget(max_length, prefix, suffix)
    prompts = _ids(tokenizer, [r.fields["prompt"] for r in rows])
    report, pairs, too_long = LengthReport(), [], []
    for group, (row, prompt) in enumerate(zip(rows, prompts)):
        responses = _ids(tokenizer, row.fields["responses"])
        too_long += [
            f"{row.where}: responses[{k}]: {len(prompt) + len(r) + len(prefix) + len(suffix)} tokens > "
            f"max_length {max_length}"
            for k, r in enumerate(responses)
            if len(prompt) + len(r) > budget
        ]
        fitted = [_fit(prompt, r, budget) for r in responses]
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
        pairs += [
            EncodedPair(prefix + fitted[i][0] + suffix, prefix + fitted[j][0] + suffix, 0.0, weight, group)
            for i, j in kept
        ]
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


def encode_sequences(
    prompts: Sequence[Any], responses: Sequence[Any], tokenizer: Any, max_length: int, fmt: str = "explicit"
) -> list[list[int]]:
    """Token ids of single (prompt, response) sequences, each built exactly as one side of a training
    pair of format `fmt`: same special tokens and EOS, same length policy (the prompt loses tokens from
    the left; a response over the budget keeps its tail).

    explicit and ranking: prompt and response are tokenized apart and joined. implicit: prompt + response
    is tokenized as one text (training tokenizes the full text; where the prompt ends does not change
    what is kept). conversational: the prompt is a list of messages and the response the assistant's
    text (or a list of messages), rendered with the tokenizer's chat template.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prefix, suffix = special_tokens(tokenizer)
    if fmt == "conversational":
        prefix, suffix = [], []
        texts = [
            _render_chat(
                tokenizer,
                list(p) + (r if isinstance(r, list) else [{"role": "assistant", "content": r}]),
                f"sequence {n + 1}",
            )
            for n, (p, r) in enumerate(zip(prompts, responses))
        ]
        full = _ids(tokenizer, texts)
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and full and all(f[:1] == [bos] for f in full):
            prefix, full = [bos], [f[1:] for f in full]
        parts = [([], f) for f in full]
    elif fmt == "implicit":
        parts = [([], f) for f in _ids(tokenizer, [p + r for p, r in zip(prompts, responses)])]
    else:
        parts = list(zip(_ids(tokenizer, list(prompts)), _ids(tokenizer, list(responses))))
    budget = _budget(max_length, prefix, suffix)
    return [prefix + _fit(p, r, budget)[0] + suffix for p, r in parts]
