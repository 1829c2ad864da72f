"""lora_rm.plots: real PNG files that decode back, with the expected sizes and colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_raster import PNG_SIGNATURE, read_png

from lora_rm import plots, raster
from lora_rm.metrics import calibration


def has_colour(image: np.ndarray, colour) -> bool:
    return bool((image == np.array(colour, dtype=np.uint8)).all(axis=2).any())


def n_colours(image: np.ndarray) -> int:
    return len(np.unique(image.reshape(-1, 3), axis=0))


def blended(colour, alpha=plots.HIST_ALPHA):
    """`colour` at `alpha` over white, rounded as `Canvas.fill_rect` does."""
    return tuple(int(round(255 * (1 - alpha) + c * alpha)) for c in colour)


def write_metrics(path: Path, with_eval: bool) -> Path:
    lines = []
    for step in range(10, 110, 10):
        lines.append(
            {
                "step": step,
                "epoch": 0,
                "loss": 0.7 - step / 250,
                "accuracy": 0.5 + step / 250,
                "lr": 1e-4 * (1 - step / 120),
            }
        )
        if with_eval and step % 50 == 0:
            lines.append(
                {
                    "step": step,
                    "eval_loss": 0.5 - step / 500,
                    "eval_accuracy": 0.7,
                    "eval_ties": 0,
                    "eval_n_pairs": 20,
                }
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_reward_histograms(tmp_path):
    g = torch.Generator().manual_seed(0)
    out = plots.reward_histograms(
        torch.randn(300, generator=g) + 1, torch.randn(300, generator=g) - 1, tmp_path / "h.png"
    )
    assert isinstance(out, Path) and out.read_bytes()[:8] == PNG_SIGNATURE
    image = read_png(out)
    assert image.shape == (500, 800, 3)
    assert n_colours(image) >= 6
    for colour in (plots.BLUE, plots.ORANGE, blended(plots.BLUE), blended(plots.ORANGE), raster.TEXT):
        assert has_colour(image, colour), colour
    assert (image == 255).all(axis=2).mean() > 0.3  # mostly white canvas, not a filled block


def test_reward_histograms_degenerate_inputs(tmp_path):
    image = read_png(plots.reward_histograms([0.5, 0.5, 0.5], [0.5], tmp_path / "same.png", bins=5))
    assert has_colour(image, plots.BLUE) and has_colour(image, plots.ORANGE)
    read_png(plots.reward_histograms([1.0, 2.0], [], tmp_path / "one_side.png"))
    with pytest.raises(ValueError, match="no rewards"):
        plots.reward_histograms([], [], tmp_path / "none.png")


def test_reliability_curve(tmp_path):
    result = calibration([2.0, 1.0, -0.5, 3.0, 0.2, 0.0], [0.0, 0.5, 0.0, 1.0, 0.4, 0.0])
    assert any(b["count"] == 0 for b in result["curve"])  # empty bins are skipped, not drawn at None
    out = plots.reliability_curve(result["curve"], result["ece"], tmp_path / "r.png")
    image = read_png(out)
    assert image.shape[2] == 3 and 500 <= image.shape[1] <= 900
    assert has_colour(image, plots.BLUE) and has_colour(image, plots.GRAY)
    assert n_colours(image) >= 4
    read_png(plots.reliability_curve([], 0.0, tmp_path / "empty.png"))


@pytest.mark.parametrize("with_eval", [True, False])
def test_training_curves(tmp_path, with_eval):
    metrics = write_metrics(tmp_path / "metrics.jsonl", with_eval)
    image = read_png(plots.training_curves(metrics, tmp_path / "t.png"))
    assert image.shape == (1000, 800, 3)
    assert has_colour(image, plots.BLUE) and has_colour(image, plots.GREEN)
    assert has_colour(image, plots.ORANGE) == with_eval  # eval points only when there are eval lines


def test_training_curves_skips_missing_series(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.69}\n\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": 0.5}\n')
    image = read_png(plots.training_curves(metrics, tmp_path / "t.png"))
    assert has_colour(image, plots.BLUE) and not has_colour(image, plots.GREEN)


def test_training_curves_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no training records"):
        plots.training_curves(empty, tmp_path / "t.png")
    eval_only = tmp_path / "eval_only.jsonl"
    eval_only.write_text('{"step": 5, "eval_loss": 0.4}\n')
    with pytest.raises(ValueError, match="no training records"):
        plots.training_curves(eval_only, tmp_path / "t.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 0.6}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        plots.training_curves(broken, tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_nice_scale_ticks_and_labels():
    unit = plots.nice_scale(0.0, 1.0)
    assert unit.labels == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert (unit.lo, unit.hi) == (0.0, 1.0)
    assert plots.nice_scale(-4.2, 5.3, target=8, extend=False).ticks == [-4, -2, 0, 2, 4]
    counts = plots.nice_scale(0, 3.15, integer=True)
    assert counts.labels == ["0", "1", "2", "3", "4"]
    assert plots.nice_scale(0, 1e-3).labels == ["0", "2e-4", "4e-4", "6e-4", "8e-4", "1e-3"]
    assert plots.nice_scale(0.0, 0.75, target=3).labels == ["0.00", "0.25", "0.50", "0.75"]
    flat = plots.nice_scale(2.0, 2.0)
    assert flat.lo < 2.0 < flat.hi


def test_fit_scale_keeps_labels_apart():
    scale = plots.fit_scale(0, 123457, pixels=630, integer=True)
    spacing = (scale.ticks[1] - scale.ticks[0]) / (scale.hi - scale.lo) * 630
    assert spacing >= max(raster.text_width(label) for label in scale.labels) + 16
    assert scale.hi >= 123457 and len(scale.ticks) >= 4


def test_long_title_is_cut_to_the_canvas(tmp_path):
    run = tmp_path / ("a-very-long-run-directory-name-" * 4)
    run.mkdir()
    write_metrics(run / "metrics.jsonl", with_eval=False)
    image = read_png(plots.training_curves(run / "metrics.jsonl", tmp_path / "t.png"))
    assert (image[:, :4] == 255).all() and (image[:, -4:] == 255).all()  # nothing runs off the sides
