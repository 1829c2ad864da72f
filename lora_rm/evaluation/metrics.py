"""Evaluation metrics on per-pair rewards: summary, calibration, rank correlation, length bias, top-1.

Every function is pure and takes 1-D torch tensors (any dtype or device) or plain sequences of numbers,
computes in float64 on the CPU, and returns Python floats, ints, None or lists of them, so the results go
straight into JSON. Inputs must be finite: a NaN or inf reward raises ValueError rather than quietly
poisoning every number. The chance-level loss check lives in `lora_rm.loss.loss_near_chance`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)

Values = torch.Tensor | np.ndarray | Sequence[float]


def as_array(values: Values, name: str = "values") -> np.ndarray:
    """`values` as a 1-D float64 numpy array; ValueError if it is not 1-D or holds NaN/inf."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: {int((~np.isfinite(array)).sum())} non-finite value(s) (NaN or inf)")
    return array


def _pair(r_c: Values, r_r: Values) -> tuple[np.ndarray, np.ndarray]:
    """Both reward arrays, checked to be non-empty and of the same length."""
    c, r = as_array(r_c, "r_chosen"), as_array(r_r, "r_rejected")
    if c.shape != r.shape:
        raise ValueError(f"r_chosen has {c.size} rewards but r_rejected has {r.size}")
    if c.size == 0:
        raise ValueError("no pairs: r_chosen and r_rejected are empty")
    return c, r


def _accuracy(diff: np.ndarray) -> float:
    """Fraction of pairs with diff > 0, a tie (diff == 0) counting half, as in `PairStats`."""
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def pairwise_summary(r_c: Values, r_r: Values) -> dict[str, float | int]:
    """Summary of N pairs with rewards r_c (chosen) and r_r (rejected); margin = r_c - r_r.

    Returns `n_pairs`; `accuracy` (margin > 0, a tie counting 0.5); `ties` (margin exactly 0); `loss`, the
    mean of -logsigmoid(margin) computed stably in float64 (it matches `pairwise_loss` without a margin
    column); `margin_mean`, `margin_std` (population std, ddof 0, so one pair gives 0); and margin quantiles
    `margin_p05`, `margin_p25`, `margin_p50`, `margin_p75`, `margin_p95` (linear interpolation, numpy's
    default). ValueError on empty or mismatched inputs.
    """
    c, r = _pair(r_c, r_r)
    diff = c - r
    summary: dict[str, float | int] = {
        "n_pairs": int(diff.size),
        "accuracy": _accuracy(diff),
        "ties": int((diff == 0).sum()),
        "loss": float(np.logaddexp(0.0, -diff).mean()),  # -logsigmoid(x) = log(1 + exp(-x))
        "margin_mean": float(diff.mean()),
        "margin_std": float(diff.std()),
    }
    for q, value in zip(QUANTILES, np.quantile(diff, QUANTILES)):
        summary[f"margin_p{round(q * 100):02d}"] = float(value)
    return summary


def calibration(r_c: Values, r_r: Values, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and reliability curve of p = sigmoid(r_c - r_r).

    p is the model's probability that the chosen response wins. Since every pair was chosen, scoring p
    alone would make every label 1; instead the symmetric formulation is used: each pair contributes two
    predictions, (p, label 1) for "chosen preferred" and (1 - p, label 0) for "rejected preferred", so the
    2N predictions span [0, 1] and the curve is point-symmetric about (0.5, 0.5). Predictions go into
    `bins` equal-width bins [k/bins, (k+1)/bins), the last one also holding 1.0 (a prediction less than
    1e-9 below an edge counts as on it, so float rounding does not split equal predictions). With n_b
    predictions in bin b, their mean m_b and the fraction f_b of them labelled 1,

        ece = sum_b (n_b / 2N) * |m_b - f_b|

    Returns {"ece": float, "n_pairs": N, "curve": [...]}, the curve holding one entry per bin, empty bins
    included: {"bin_lo", "bin_hi", "count", "mean_pred", "frac_pos"}, with mean_pred and frac_pos None
    when count is 0. A model that always says p = 0.5 is perfectly calibrated (ece 0) but useless; read
    ece together with accuracy and loss.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    c, r = _pair(r_c, r_r)
    p = 0.5 * (1.0 + np.tanh(0.5 * (c - r)))  # sigmoid without overflow for large |margin|
    preds = np.concatenate([p, 1.0 - p])
    labels = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    index = np.clip(np.floor(preds * bins + 1e-9).astype(np.int64), 0, bins - 1)
    total = preds.size
    ece = 0.0
    curve: list[dict[str, float | int | None]] = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        mean_pred = frac_pos = None
        if count:
            mean_pred, frac_pos = float(preds[mask].mean()), float(labels[mask].mean())
            ece += count / total * abs(mean_pred - frac_pos)
        curve.append(
            {
                "bin_lo": b / bins,
                "bin_hi": (b + 1) / bins,
                "count": count,
                "mean_pred": mean_pred,
                "frac_pos": frac_pos,
            }
        )
    return {"ece": float(ece), "n_pairs": int(c.size), "curve": curve}


def average_ranks(values: Values) -> np.ndarray:
    """1-based ranks of `values`, ties sharing the mean of their ranks: [1, 2, 2] -> [1, 2.5, 2.5]."""
    a = as_array(values)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    group = np.cumsum(starts) - 1  # group id of each sorted position
    bounds = np.concatenate(
        [np.flatnonzero(starts), [a.size]]
    )  # group g spans sorted positions [bounds[g], bounds[g+1])
    mean_rank = (bounds[:-1] + 1 + bounds[1:]) / 2.0  # mean of the 1-based ranks bounds[g]+1 .. bounds[g+1]
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: Values, y: Values) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks of x and y (ties averaged).

    Agrees with scipy.stats.spearmanr. NaN when x or y is constant (the correlation is undefined);
    ValueError for fewer than two points or different lengths.
    """
    rx, ry = average_ranks(as_array(x, "x")), average_ranks(as_array(y, "y"))
    if rx.size != ry.size:
        raise ValueError(f"x has {rx.size} values but y has {ry.size}")
    if rx.size < 2:
        raise ValueError("spearman needs at least two points")
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0.0:
        return float("nan")
    return float((dx * dy).sum() / denom)


def length_bias(r_c: Values, r_r: Values, len_c: Values, len_r: Values) -> dict[str, float | int | None]:
    """How much the rewards follow response length rather than quality.

    `reward_length_spearman`: Spearman correlation of all 2N rewards (chosen and rejected pooled) with
    their responses' lengths (NaN if all lengths or all rewards are equal). `accuracy_chosen_longer` over
    the `n_chosen_longer` pairs where the chosen response is strictly longer, `accuracy_chosen_shorter`
    over the `n_chosen_shorter` pairs where it is strictly shorter (ties in reward count 0.5; an accuracy
    is None when its group is empty); pairs of equal length, `n_same_length`, are in neither group. A
    model that leans on length scores well on the first group and badly on the second.
    """
    c, r = _pair(r_c, r_r)
    lc, lr = as_array(len_c, "len_chosen"), as_array(len_r, "len_rejected")
    if lc.shape != c.shape or lr.shape != c.shape:
        raise ValueError(f"{c.size} pairs but {lc.size} chosen and {lr.size} rejected lengths")
    diff = c - r
    longer, shorter = lc > lr, lc < lr
    return {
        "reward_length_spearman": spearman(np.concatenate([c, r]), np.concatenate([lc, lr])),
        "accuracy_chosen_longer": _accuracy(diff[longer]) if longer.any() else None,
        "n_chosen_longer": int(longer.sum()),
        "accuracy_chosen_shorter": _accuracy(diff[shorter]) if shorter.any() else None,
        "n_chosen_shorter": int(shorter.sum()),
        "n_same_length": int((lc == lr).sum()),
    }


def top1_accuracy(rewards_per_prompt: Sequence[Values]) -> float:
    """Fraction of ranked lists (best response first) whose highest reward is at index 0.

    Ties count fractionally: when index 0 is among k responses sharing the maximum reward the list scores
    1/k (the chance that a uniform tie-break picks it). A one-element list always scores 1. ValueError on
    no lists or an empty list.
    """
    if len(rewards_per_prompt) == 0:
        raise ValueError("no lists of rewards")
    score = 0.0
    for i, rewards in enumerate(rewards_per_prompt):
        a = as_array(rewards, f"rewards_per_prompt[{i}]")
        if a.size == 0:
            raise ValueError(f"rewards_per_prompt[{i}] is empty")
        best = a.max()
        if a[0] == best:
            score += 1.0 / int((a == best).sum())
    return score / len(rewards_per_prompt)
