"""lora_rm.evaluation.plots: real PNG files that matplotlib reads back, with the expected sizes and colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from lora_rm.evaluation import plots
from lora_rm.evaluation.metrics import calibration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> np.ndarray:
    """The image as uint8 RGB [height, width, 3]; fails unless it is a PNG."""
    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    return np.round(image[..., :3] * 255).astype(np.uint8)


def has_colour(image: np.ndarray, colour: str, tol: int = 6) -> bool:
    target = np.array([round(c * 255) for c in to_rgb(colour)])
    return bool((np.abs(image.astype(int) - target) <= tol).all(axis=2).any())


def blended(colour: str, alpha: float = plots.HIST_ALPHA) -> str:
    """`colour` at `alpha` over white."""
    r, g, b = (1 - alpha + c * alpha for c in to_rgb(colour))
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def not_blank(image: np.ndarray) -> None:
    white = (image >= 250).all(axis=2).mean()
    assert 0.3 < white < 0.99, f"{white:.2%} white"  # a chart on a white page, not empty, not a filled block
    assert len(np.unique(image.reshape(-1, 3), axis=0)) >= 6


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
                {"step": step, "eval_loss": 0.5 - step / 500, "eval_accuracy": 0.7, "eval_n_pairs": 20}
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_reward_histograms(tmp_path):
    g = torch.Generator().manual_seed(0)
    out = plots.reward_histograms(
        torch.randn(300, generator=g) + 1, torch.randn(300, generator=g) - 1, tmp_path / "sub" / "h.png"
    )
    assert isinstance(out, Path) and out.parent.name == "sub"
    image = read_png(out)
    assert image.shape == (500, 800, 3)
    not_blank(image)
    for colour in (plots.BLUE, plots.ORANGE, blended(plots.BLUE), blended(plots.ORANGE)):
        assert has_colour(image, colour), colour
    assert not list(tmp_path.glob("sub/*.partial"))


def test_reward_histograms_degenerate_inputs(tmp_path):
    image = read_png(plots.reward_histograms([0.5, 0.5, 0.5], [0.5], tmp_path / "same.png", bins=5))
    assert has_colour(image, plots.BLUE) and has_colour(image, plots.ORANGE)
    image = read_png(plots.reward_histograms([1.0, 2.0], [], tmp_path / "one_side.png"))
    assert has_colour(image, plots.BLUE) and not has_colour(image, blended(plots.ORANGE))
    with pytest.raises(ValueError, match="no rewards"):
        plots.reward_histograms([], [], tmp_path / "none.png")


def test_reliability_curve(tmp_path):
    result = calibration([2.0, 1.0, -0.5, 3.0, 0.2, 0.0], [0.0, 0.5, 0.0, 1.0, 0.4, 0.0])
    assert any(b["count"] == 0 for b in result["curve"])  # empty bins are skipped, not drawn at None
    image = read_png(plots.reliability_curve(result["curve"], result["ece"], tmp_path / "r.png"))
    assert image.shape == (560, 640, 3)
    not_blank(image)
    assert has_colour(image, plots.BLUE) and has_colour(image, plots.GRAY)
    empty = read_png(plots.reliability_curve([], 0.0, tmp_path / "empty.png"))
    assert has_colour(empty, plots.GRAY) and not has_colour(empty, plots.BLUE)


@pytest.mark.parametrize("with_eval", [True, False])
@pytest.mark.integration
def test_training_curves(tmp_path, with_eval):
    metrics = write_metrics(tmp_path / "metrics.jsonl", with_eval)
    image = read_png(plots.training_curves(metrics, tmp_path / "t.png"))
    assert image.shape == (1000, 800, 3)
    not_blank(image)
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


def test_long_title_stays_on_the_page(tmp_path):
    run = tmp_path / ("a-very-long-run-directory-name-" * 4)
    run.mkdir()
    write_metrics(run / "metrics.jsonl", with_eval=False)
    image = read_png(plots.training_curves(run / "metrics.jsonl", tmp_path / "t.png"))
    assert (image[:, :2] >= 250).all() and (image[:, -2:] >= 250).all()  # nothing runs off the sides
