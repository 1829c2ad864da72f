"""The data step of a run: read, check, split and tokenize the training and eval data of a config."""

from __future__ import annotations

from typing import Any

from lora_rm.checks import check_rows, detect_format
from lora_rm.config import TrainConfig
from lora_rm.data import load_rows, split_rows
from lora_rm.encode import EncodedPair, encode_rows
from lora_rm.errors import UserError


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
