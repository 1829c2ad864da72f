"""Diagnostic plots as PNG files: tick scales (`nice_scale`, `fit_scale`, `format_ticks`), `Axes` that map
data to pixels and draw frames, lines, markers and legends on a `lora_rm.raster.Canvas`, and the three public
plots, each writing one 8-bit RGB PNG (creating missing parent folders) and returning its Path:
`reward_histograms` (chosen and rejected rewards on shared bins), `reliability_curve` (the calibration curve
from `lora_rm.metrics.calibration`, with the diagonal) and `training_curves` (loss, accuracy and learning
rate from a run's `metrics.jsonl`, three stacked panels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_rm.metrics import Values, as_array
from lora_rm.raster import CAP_H, GLYPH_H, TEXT_SCALE, WHITE, Canvas, Color, text_width

BLACK: Color = (0, 0, 0)
GRID: Color = (232, 232, 232)
GRAY: Color = (128, 128, 128)
BLUE: Color = (31, 119, 180)  # chosen, train
ORANGE: Color = (255, 127, 14)  # rejected, eval
GREEN: Color = (44, 160, 44)  # learning rate
HIST_ALPHA = 0.45


@dataclass
class Scale:
    """A data range [lo, hi] and its ticks with their labels."""

    lo: float
    hi: float
    ticks: list[float]
    labels: list[str]


def _nice_step(span: float, target: int, integer: bool) -> float:
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * (1 - 1e-9))
    return max(step, 1.0) if integer else step


def format_ticks(ticks: Sequence[float]) -> list[str]:
    """Labels with as few decimals as the ticks need, all alike (0, 0.5, 1.0 -> "0.0", "0.5", "1.0");
    scientific ("2e-4", "1.5e-4") for ticks that are tiny or huge."""
    nonzero = [abs(t) for t in ticks if t != 0]
    if nonzero and (max(nonzero) < 1e-2 or max(nonzero) >= 1e6):
        out = []
        for t in ticks:
            if t == 0:
                out.append("0")
                continue
            mantissa, exponent = f"{t:.3e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            out.append(f"{mantissa}e{int(exponent)}")
        return out
    for decimals in range(0, 10):
        if all(abs(round(t, decimals) - t) < 1e-9 * max(1.0, abs(t)) for t in ticks):
            return [f"{t:.{decimals}f}" for t in ticks]
    return [f"{t:.3g}" for t in ticks]


def nice_scale(lo: float, hi: float, target: int = 5, extend: bool = True, integer: bool = False) -> Scale:
    """Ticks at round steps (1, 2, 2.5 or 5 times a power of ten) inside [lo, hi].

    `extend` widens [lo, hi] out to whole steps; `integer` keeps steps at 1 or more. A zero-width range is
    opened around its value.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"scale range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = 0.5 if integer or lo == 0 else abs(lo) * 0.1
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target, integer)
    if extend:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    ticks = [float(f"{k * step:.12g}") for k in range(first, last + 1)]
    ticks = [0.0 if t == 0 else t for t in ticks]  # no "-0"
    return Scale(lo, hi, ticks, format_ticks(ticks))


def fit_scale(
    lo: float, hi: float, pixels: float, target: int = 8, extend: bool = True, integer: bool = False
) -> Scale:
    """`nice_scale` with the most ticks, up to `target`, whose labels fit side by side along `pixels` px."""
    for t in range(target, 1, -1):
        scale = nice_scale(lo, hi, t, extend=extend, integer=integer)
        if len(scale.ticks) < 2:
            return scale
        spacing = (scale.ticks[1] - scale.ticks[0]) / (scale.hi - scale.lo) * pixels
        if spacing >= max(text_width(label) for label in scale.labels) + 16:
            return scale
    return scale


@dataclass
class Axes:
    """A plotting rectangle (left, top, right, bottom in pixels) on a canvas, with its x and y scales."""

    canvas: Canvas
    left: int
    top: int
    right: int
    bottom: int
    x: Scale
    y: Scale

    @property
    def clip(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.right + 1, self.bottom + 1)

    def px(self, value: float) -> float:
        return self.left + (value - self.x.lo) / (self.x.hi - self.x.lo) * (self.right - self.left)

    def py(self, value: float) -> float:
        return self.bottom - (value - self.y.lo) / (self.y.hi - self.y.lo) * (self.bottom - self.top)

    def draw_frame(self, xlabel: str | None, ylabel: str | None, ylabel_x: int) -> None:
        """Grid, box, outward ticks with labels, and axis labels (y label centred at column `ylabel_x`)."""
        c = self.canvas
        for t in self.x.ticks:
            c.line(self.px(t), self.top, self.px(t), self.bottom, GRID, width=1)
        for t in self.y.ticks:
            c.line(self.left, self.py(t), self.right, self.py(t), GRID, width=1)
        for t, label in zip(self.x.ticks, self.x.labels):
            c.line(self.px(t), self.bottom, self.px(t), self.bottom + 6, BLACK, width=1)
            c.text(self.px(t), self.bottom + 10, label, align="center")
        for t, label in zip(self.y.ticks, self.y.labels):
            c.line(self.left - 6, self.py(t), self.left, self.py(t), BLACK, width=1)
            c.text(self.left - 10, self.py(t), label, align="right", valign="middle")
        for x0, y0, x1, y1 in (
            (self.left, self.top, self.right, self.top),
            (self.left, self.bottom, self.right, self.bottom),
            (self.left, self.top, self.left, self.bottom),
            (self.right, self.top, self.right, self.bottom),
        ):
            c.line(x0, y0, x1, y1, BLACK, width=1)
        if xlabel:
            c.text(
                (self.left + self.right) / 2,
                self.bottom + 10 + GLYPH_H * TEXT_SCALE + 6,
                xlabel,
                align="center",
            )
        if ylabel:
            c.text(
                ylabel_x, (self.top + self.bottom) / 2, ylabel, align="center", valign="middle", vertical=True
            )

    def polyline(
        self, xs: Sequence[float], ys: Sequence[float], color: Color, dash: tuple[float, float] | None = None
    ) -> None:
        pts = [(self.px(x), self.py(y)) for x, y in zip(xs, ys)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            self.canvas.line(x0, y0, x1, y1, color, dash=dash, clip=self.clip)
        if len(pts) == 1:
            self.canvas.marker(*pts[0], color, radius=3)

    def markers(self, xs: Sequence[float], ys: Sequence[float], color: Color, radius: int = 4) -> None:
        for x, y in zip(xs, ys):
            self.canvas.marker(self.px(x), self.py(y), color, radius)

    def legend(self, entries: Sequence[tuple[str, str, Color]], loc: str = "best") -> None:
        """A boxed legend of (label, kind, color) entries, kind being "patch", "line", "dashed", "marker"
        or "line+marker".

        `loc` is a corner ("upper right", "upper left", "lower right", "lower left") or "best": the corner
        whose box would cover the fewest already-drawn data pixels (grey reference lines do not count; on
        a tie, the first corner in that order).
        """
        c, s = self.canvas, TEXT_SCALE
        row_h, swatch, pad = GLYPH_H * s + 6, 28, 10
        box_w = pad + swatch + 8 + max(text_width(label) for label, _, _ in entries) + pad
        box_h = pad + row_h * len(entries) - 6 + pad
        inset = 10
        corners = {
            "upper right": (self.right - inset - box_w, self.top + inset),
            "upper left": (self.left + inset, self.top + inset),
            "lower right": (self.right - inset - box_w, self.bottom - inset - box_h),
            "lower left": (self.left + inset, self.bottom - inset - box_h),
        }
        if loc == "best":
            background = np.array([WHITE, GRID, GRAY])  # covering a reference line is fine

            def covered(corner: tuple[int, int]) -> int:
                x0, y0 = corner
                region = c.pixels[y0 : y0 + box_h, x0 : x0 + box_w].reshape(-1, 1, 3)
                return int((~(region == background).all(axis=2).any(axis=1)).sum())

            loc = min(corners, key=lambda k: covered(corners[k]))
        x0, y0 = (int(v) for v in corners[loc])
        c.fill_rect(x0, y0, x0 + box_w, y0 + box_h, WHITE)
        for ax, ay, bx, by in ((x0, y0, x0 + box_w, y0), (x0, y0 + box_h, x0 + box_w, y0 + box_h)):
            c.line(ax, ay, bx, by, GRAY, width=1)
        for ax, ay, bx, by in ((x0, y0, x0, y0 + box_h), (x0 + box_w, y0, x0 + box_w, y0 + box_h)):
            c.line(ax, ay, bx, by, GRAY, width=1)
        for i, (label, kind, color) in enumerate(entries):
            mid = y0 + pad + i * row_h + CAP_H * s / 2
            sx = x0 + pad
            if kind == "patch":
                c.fill_rect(sx, mid - 7, sx + swatch, mid + 7, color, alpha=HIST_ALPHA)
                c.line(sx, mid - 7, sx + swatch, mid - 7, color)
            elif kind == "marker":
                c.marker(sx + swatch / 2, mid, color)
            else:
                c.line(sx, mid, sx + swatch, mid, color, dash=(6, 4) if kind == "dashed" else None)
                if kind == "line+marker":
                    c.marker(sx + swatch / 2, mid, color)
            c.text(sx + swatch + 8, mid, label, valign="middle")


def _figure(
    width: int,
    height: int,
    title: str,
    panels: Sequence[tuple[Scale, Scale, str | None, str | None]],
    gap: int = 24,
) -> tuple[Canvas, list[Axes]]:
    """A canvas with a centred title (cut short with "..." if too wide) and `panels` stacked vertically,
    each (x scale, y scale, x label, y label); the left margin fits the widest y tick label so all panels
    share their left edge."""
    s = TEXT_SCALE
    canvas = Canvas(width, height)
    max_chars = (width - 24) // (6 * s)
    if len(title) > max_chars:
        title = title[: max_chars - 3] + "..."
    canvas.text(width / 2, 14, title, align="center", bold=True)
    tick_w = max(text_width(label) for _, y, _, _ in panels for label in y.labels)
    ylabel_x = 14 + GLYPH_H * s // 2
    left = 14 + GLYPH_H * s + 12 + tick_w + 10
    right = width - max(32, max(text_width(x.labels[-1]) // 2 + 8 for x, _, _, _ in panels))
    top = 14 + GLYPH_H * s + 16
    xticks_h = 10 + GLYPH_H * s  # tick labels below a panel
    xlabel_h = 6 + GLYPH_H * s
    fixed = sum(xticks_h + (xlabel_h if xl else 0) for _, _, xl, _ in panels) + gap * (len(panels) - 1) + 12
    panel_h = (height - top - fixed) // len(panels)
    axes = []
    for x, y, xlabel, ylabel in panels:
        ax = Axes(canvas, left, top, right, top + panel_h, x, y)
        ax.draw_frame(xlabel, ylabel, ylabel_x)
        axes.append(ax)
        top += panel_h + xticks_h + (xlabel_h if xlabel else 0) + gap
    return canvas, axes


def reward_histograms(r_chosen: Values, r_rejected: Values, path: str | Path, bins: int = 30) -> Path:
    """Overlaid histograms of chosen (blue) and rejected (orange) rewards on shared bins, 800 x 500 px.

    The bins span the smallest to the largest reward of either set; each histogram is a semi-transparent
    fill with a solid outline, so overlaps stay readable. Returns the Path written.
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
    counts = [np.histogram(values, bins=edges)[0] for values in (chosen, rejected)]
    pad = 0.03 * (hi - lo)
    xs = fit_scale(lo - pad, hi + pad, pixels=800 - 170, extend=False)
    top = max(1, int(max(c.max(initial=0) for c in counts)))
    ys = nice_scale(0, top * 1.2, target=5, integer=True)  # headroom for the legend
    title = f"Rewards: {chosen.size} chosen, {rejected.size} rejected"
    canvas, (ax,) = _figure(800, 500, title, [(xs, ys, "reward", "pairs")])
    for count, color in zip(counts, (BLUE, ORANGE)):
        for a, b, n in zip(edges[:-1], edges[1:], count):
            if n:
                canvas.fill_rect(ax.px(a), ax.py(n), ax.px(b), ax.bottom, color, alpha=HIST_ALPHA)
    for count, color in zip(counts, (BLUE, ORANGE)):  # outlines on top of both fills
        step_x = np.repeat(edges, 2)[1:-1]
        step_y = np.repeat(count, 2)
        ax.polyline([edges[0], *step_x, edges[-1]], [0, *step_y, 0], color)
    ax.legend([("chosen", "patch", BLUE), ("rejected", "patch", ORANGE)])
    return canvas.save(path)


def reliability_curve(curve: Sequence[dict[str, Any]], ece: float, path: str | Path) -> Path:
    """Reliability diagram from `metrics.calibration(...)`: mean predicted probability against fraction
    correct per non-empty bin (line and markers), the dashed diagonal y = x of perfect calibration, axes
    0..1, ECE in the title; 640 x 560 px. Returns the Path written."""
    points = [
        (float(b["mean_pred"]), float(b["frac_pos"]))
        for b in curve
        if b.get("count") and b.get("mean_pred") is not None and b.get("frac_pos") is not None
    ]
    unit = nice_scale(0.0, 1.0, target=5)
    canvas, (ax,) = _figure(
        640,
        560,
        f"Reliability (ECE = {ece:.4f})",
        [(unit, unit, "predicted probability", "fraction correct")],
    )
    ax.polyline([0, 1], [0, 1], GRAY, dash=(8, 6))
    if points:
        xs, ys = zip(*points)
        ax.polyline(xs, ys, BLUE)
        ax.markers(xs, ys, BLUE)
    ax.legend([("model", "line+marker", BLUE), ("perfectly calibrated", "dashed", GRAY)])
    return canvas.save(path)


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
    in one 800 x 1000 px PNG; returns the Path written.

    Training records (`step` with `loss`, `accuracy`, `lr`) are drawn as lines, eval records (`eval_loss`,
    `eval_accuracy`) as markers joined by a thin line; the loss and accuracy panels also show chance
    (ln 2 and 0.5) dashed. Missing or non-finite values are skipped, and a panel with nothing to draw says
    "no data". ValueError when the file has no training records or a line is not JSON.
    """
    src = Path(metrics_jsonl_path)
    train, evals = _read_metrics(src)
    if not train:
        raise ValueError(f"{src}: no training records (lines with 'step' and 'loss', 'accuracy' or 'lr')")
    ln2 = math.log(2.0)
    specs = [  # (y label, [(label, steps, values, color, style)], chance level)
        (
            "loss",
            [
                ("train", *_series(train, "loss"), BLUE, "line"),
                ("eval", *_series(evals, "eval_loss"), ORANGE, "eval"),
            ],
            ln2,
        ),
        (
            "accuracy",
            [
                ("train", *_series(train, "accuracy"), BLUE, "line"),
                ("eval", *_series(evals, "eval_accuracy"), ORANGE, "eval"),
            ],
            0.5,
        ),
        ("learning rate", [("lr", *_series(train, "lr"), GREEN, "line")], None),
    ]
    steps = [s for _, series, _ in specs for _, xs, _, _, _ in series for s in xs] or [
        float(r["step"]) for r in train
    ]
    xscale = fit_scale(min(0.0, min(steps)), max(steps), pixels=800 - 170, integer=True)
    panels = []
    for name, series, chance in specs:
        values = [v for _, _, vs, _, _ in series for v in vs]
        if not values:
            lo, hi = 0.0, 1.0
        elif name == "accuracy":
            lo, hi = min([0.45, *values]), max([1.0, *values])  # keeps the 0.5 chance line off the frame
        else:
            lo, hi = min([0.0, *values]), max([*values, *([chance] if chance is not None else [])])
        panels.append(
            (xscale, nice_scale(lo, hi, target=5), "step" if name == "learning rate" else None, name)
        )
    canvas, axes = _figure(800, 1000, f"Training curves: {src.parent.name or src.name}", panels)
    for ax, (name, series, chance) in zip(axes, specs):
        entries: list[tuple[str, str, Color]] = []
        if chance is not None and any(xs for _, xs, _, _, _ in series):
            ax.polyline([ax.x.lo, ax.x.hi], [chance, chance], GRAY, dash=(8, 6))
        for label, xs, ys, color, style in series:
            if not xs:
                continue
            if style == "eval":
                for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
                    ax.canvas.line(ax.px(x0), ax.py(y0), ax.px(x1), ax.py(y1), color, width=1, clip=ax.clip)
                ax.markers(xs, ys, color)
                entries.append((label, "line+marker", color))
            else:
                ax.polyline(xs, ys, color)
                entries.append((label, "line", color))
        if not entries:
            ax.canvas.text(
                (ax.left + ax.right) / 2,
                (ax.top + ax.bottom) / 2,
                "no data",
                GRAY,
                align="center",
                valign="middle",
            )
            continue
        if chance is not None:
            entries.append((f"chance ({'ln 2' if name == 'loss' else '0.5'})", "dashed", GRAY))
        ax.legend(entries)
    return canvas.save(path)
