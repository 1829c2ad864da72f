"""Turn checked rows into preference pairs of token ids under an explicit length policy.

Each side of a pair is built by `lora_rm.data.sequences` as every caller of the saved model builds it:
`tokenizer(prompt + response)` for explicit prompts and ranked lists, `tokenizer(text)` for implicit prompts,
the chat template rendered to text for conversations, cut from the left to `max_length`. Pairs whose two sides
become identical are dropped. Every truncation and drop is counted. Ranked lists of K responses become weighted
pairs of one group (`encode_rankings`). `prepare_pairs` is the data step of a run: read, check, split and
tokenize the training and eval data of a config.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from lora_rm.config import TrainConfig
from lora_rm.data.checks import check_rows, detect_format
from lora_rm.data.read import Row, load_rows, split_rows
from lora_rm.data.sequences import (
    TokenizedText,
    common_prefix_len,
    fit_text,
    over_limit,
    render_chat,
    set_prompt_lens,
    tokenize_texts,
)
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


def _refuse_too_long(too_long: list[str]) -> None:
    if too_long:
        header = f"{len(too_long)} sequence(s) over the length limit (--length-policy error):"
        raise UserError(problems_message(header, too_long))


def _pair_texts(
    rows: list[Row], fmt: str, tokenizer: Any, max_length: int
) -> tuple[list[TokenizedText], list[TokenizedText]]:
    """The chosen and rejected texts of each row, tokenized whole, with the prompt's share of each."""
    chat = fmt == "conversational"
    if chat:
        texts_c, texts_r = [], []
        for r in rows:
            head = r.fields.get("prompt") or []
            texts_c.append(render_chat(tokenizer, head + r.fields["chosen"], r.where))
            texts_r.append(render_chat(tokenizer, head + r.fields["rejected"], r.where))
    elif fmt == "explicit":
        texts_c = [r.fields["prompt"] + r.fields["chosen"] for r in rows]
        texts_r = [r.fields["prompt"] + r.fields["rejected"] for r in rows]
    else:
        texts_c = [r.fields["chosen"] for r in rows]
        texts_r = [r.fields["rejected"] for r in rows]
    side_c = tokenize_texts(tokenizer, texts_c, chat, max_length)
    side_r = tokenize_texts(tokenizer, texts_r, chat, max_length)
    if fmt == "explicit":
        set_prompt_lens(tokenizer, side_c + side_r, [r.fields["prompt"] for r in rows] * 2)
    else:  # the prompt is the longest common token prefix of the two texts
        for c, r in zip(side_c, side_r):
            c.prompt_len = r.prompt_len = common_prefix_len(c.core, r.core)
    return side_c, side_r


def encode_pairs(
    rows: list[Row], fmt: str, tokenizer: Any, max_length: int, policy: str = "truncate"
) -> tuple[list[EncodedPair], LengthReport]:
    """Tokenize checked rows of one format into pairs that fit `max_length` tokens, with a report.

    policy "truncate" cuts as the module docstring says; "error" raises UserError listing every row
    with a side over `max_length` tokens.
    """
    side_c, side_r = _pair_texts(rows, fmt, tokenizer, max_length)
    if policy == "error":
        too_long = [
            f"{row.where}: {side}: {n} > max_length {max_length}"
            for row, tc, tr in zip(rows, side_c, side_r)
            for side, n in (("chosen", over_limit(tc, max_length)), ("rejected", over_limit(tr, max_length)))
            if n
        ]
        _refuse_too_long(too_long)
    report, pairs = LengthReport(pairs_in=len(rows)), []
    pad = tokenizer.pad_token_id
    for row, text_c, text_r in zip(rows, side_c, side_r):
        chosen, cut_c = fit_text(text_c, max_length, pad)
        rejected, cut_r = fit_text(text_r, max_length, pad)
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
    report, pairs, too_long = LengthReport(), [], []
    prompts = [r.fields["prompt"] for r in rows for _ in r.fields["responses"]]
    texts = [r.fields["prompt"] + response for r in rows for response in r.fields["responses"]]
    every_side = set_prompt_lens(tokenizer, tokenize_texts(tokenizer, texts, False, max_length), prompts)
    start = 0
    for group, row in enumerate(rows):
        sides = every_side[start : start + len(row.fields["responses"])]
        start += len(sides)
        too_long += [
            f"{row.where}: responses[{k}]: {n} > max_length {max_length}"
            for k, t in enumerate(sides)
            if (n := over_limit(t, max_length))
        ]
        fitted = [fit_text(t, max_length, tokenizer.pad_token_id) for t in sides]
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


def prepare_pairs(
    cfg: TrainConfig, tokenizer: Any, max_length: int, log: Any = print
) -> tuple[list[EncodedPair], list[EncodedPair], dict]:
    """Read, check, split and tokenize the training and eval data of `cfg`.

    Raises UserError (every bad row listed) before anything is written; with `cfg.skip_invalid`, bad
    rows are skipped and counted instead.
    """
    train_rows, own_eval_rows = load_rows(cfg.dataset, cfg.split, eval_split=cfg.eval_split)
    fmt = detect_format(train_rows, cfg.dataset)
    train_rows = check_rows(train_rows, fmt, cfg.dataset, cfg.skip_invalid, log)
    if cfg.eval_dataset or own_eval_rows:
        eval_source = cfg.eval_dataset or f"{cfg.dataset} (its own eval split)"
        eval_rows = load_rows(cfg.eval_dataset)[0] if cfg.eval_dataset else own_eval_rows
        eval_fmt = detect_format(eval_rows, eval_source)
        if eval_fmt != fmt:
            raise UserError(f"{eval_source}: eval data is {eval_fmt} but training data is {fmt}")
        eval_rows = check_rows(eval_rows, fmt, eval_source, cfg.skip_invalid, log)
    else:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, cfg.seed)
        eval_source = f"{cfg.dataset} ({cfg.eval_fraction:.0%} held out)"
    train_pairs, train_report = encode_rows(
        train_rows, fmt, tokenizer, max_length, cfg.length_policy, cfg.loss
    )
    # eval always sees every pair of a ranked list, whatever the training objective
    eval_pairs, eval_report = encode_rows(
        eval_rows, fmt, tokenizer, max_length, cfg.length_policy, "all_pairs"
    )
    if not train_pairs:
        raise UserError(
            f"{cfg.dataset}: no training pairs left after the length policy ({train_report.summary()})"
        )
    log(f"data: {fmt} format; train: {train_report.summary()}")
    if eval_rows:
        log(f"data: eval from {eval_source}: {eval_report.summary()}")
    return train_pairs, eval_pairs, {"format": fmt, "train": train_report, "eval": eval_report}
