"""The evaluation's PNG charts, drawn with matplotlib (Agg: no display needed), each written atomically
(creating missing parent folders) and returned as a Path: `reward_histograms` (chosen and rejected rewards on
shared bins), `reliability_curve` (the calibration curve from `lora_rm.evaluation.metrics.calibration`, with the
diagonal) and `training_curves` (loss, accuracy and learning rate from a run's `metrics.jsonl`, three panels
sharing the step axis).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_rm.evaluation.metrics import Values, as_array
from lora_rm.util.atomic import staged

BLUE = "#1f77b4"  # chosen, train
ORANGE = "#ff7f0e"  # rejected, eval
GREEN = "#2ca02c"  # learning rate
GRAY = "#808080"  # chance and perfect calibration
HIST_ALPHA = 0.45
DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write `fig` as PNG through `lora_rm.util.atomic.staged` (beside `path`, then renamed); close the figure."""
    try:
        with staged(path, folder=False) as staging:
            fig.savefig(staging, format="png", dpi=DPI)
    finally:
        _pyplot().close(fig)
    return Path(path)


def reward_histograms(r_chosen: Values, r_rejected: Values, path: str | Path, bins: int = 30) -> Path:
    """Overlaid histograms of chosen (blue) and rejected (orange) rewards on shared bins, 800 x 500 px.

    The bins span the smallest to the largest reward of either set; each histogram is a semi-transparent
    fill with a solid outline, so overlaps stay readable. ValueError when there are no rewards at all.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    chosen, rejected = as_array(r_chosen, "r_chosen"), as_array(r_rejected, "r_rejected")
    if chosen.size == 0 and rejected.size == 0:
        raise ValueError("no rewards to plot")
    both = np.concatenate([chosen, rejected])
    lo, hi = float(both.min()), float(both.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=DPI, layout="constrained")
    for values, color, label in ((chosen, BLUE, "chosen"), (rejected, ORANGE, "rejected")):
        if values.size:
            ax.hist(values, bins=edges, color=color, alpha=HIST_ALPHA, label=label)
            ax.hist(values, bins=edges, color=color, histtype="step", linewidth=1.5)
    if chosen.size and rejected.size:
        for values, color in ((chosen, BLUE), (rejected, ORANGE)):
            ax.axvline(float(values.mean()), color=color, linestyle="--", linewidth=1)
    ax.set(
        title=f"Rewards: {chosen.size} chosen, {rejected.size} rejected (dashed: means)",
        xlabel="reward",
        ylabel="pairs",
    )
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_curve(curve: Sequence[dict[str, Any]], ece: float, path: str | Path) -> Path:
    """Reliability diagram from `metrics.calibration(...)`: mean predicted probability against fraction
    correct per non-empty bin (line and markers), the dashed diagonal y = x of perfect calibration, axes
    0..1, ECE in the title; 640 x 560 px."""
    points = [
        (float(b["mean_pred"]), float(b["frac_pos"]))
        for b in curve
        if b.get("count") and b.get("mean_pred") is not None and b.get("frac_pos") is not None
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=DPI, layout="constrained")
    ax.plot([0, 1], [0, 1], color=GRAY, linestyle="--", label="perfectly calibrated")
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color=BLUE, marker="o", label="model")
    ax.set(
        title=f"Reliability (ECE = {ece:.4f})",
        xlabel="predicted probability",
        ylabel="fraction correct",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training records (step plus loss/accuracy/lr) and eval records (step plus eval_*), sorted by step."""
    train, evals = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        if any(k.startswith("eval_") for k in record):
            evals.append(record)
        elif any(k in record for k in ("loss", "accuracy", "lr")):
            train.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a finite number under `key`."""
    pts = [
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(metrics_jsonl_path: str | Path, path: str | Path) -> Path:
    """Loss, accuracy and learning rate against step from a run's `metrics.jsonl`, three stacked panels
    sharing the step axis in one 800 x 1000 px PNG.

    Training records (`step` with `loss`, `accuracy`, `lr`) are drawn as lines, eval records (`eval_loss`,
    `eval_accuracy`) as markers joined by a thin line; the loss and accuracy panels also show chance
    (ln 2 and 0.5) dashed. Missing or non-finite values are skipped, and a panel with nothing to draw says
    "no data". ValueError when the file has no training records or a line is not JSON.
    """
    src = Path(metrics_jsonl_path)
    train, evals = _read_metrics(src)
    if not train:
        raise ValueError(f"{src}: no training records (lines with 'step' and 'loss', 'accuracy' or 'lr')")
    specs = [  # (y label, [(label, key, records, color, eval style)], chance level and its name)
        (
            "loss",
            [("train", "loss", train, BLUE, False), ("eval", "eval_loss", evals, ORANGE, True)],
            (math.log(2.0), "ln 2"),
        ),
        (
            "accuracy",
            [("train", "accuracy", train, BLUE, False), ("eval", "eval_accuracy", evals, ORANGE, True)],
            (0.5, "0.5"),
        ),
        ("learning rate", [("lr", "lr", train, GREEN, False)], None),
    ]
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 10), dpi=DPI, sharex=True, layout="constrained")
    title = f"Training curves: {src.parent.name or src.name}"
    fig.suptitle(title if len(title) <= 80 else title[:77] + "...")
    for ax, (name, series, chance) in zip(axes, specs):
        drawn = False
        for label, key, records, color, eval_style in series:
            xs, ys = _series(records, key)
            if not xs:
                continue
            drawn = True
            if eval_style:
                ax.plot(xs, ys, color=color, marker="o", linewidth=1, label=label)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.5, label=label)
        if not drawn:
            ax.text(0.5, 0.5, "no data", color=GRAY, ha="center", va="center", transform=ax.transAxes)
        else:
            if chance is not None:
                ax.axhline(chance[0], color=GRAY, linestyle="--", linewidth=1, label=f"chance ({chance[1]})")
            ax.legend(loc="best")
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _save(fig, path)
