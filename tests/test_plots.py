"""lora_rm.plots: real PNG files that decode back, with the expected sizes and colours."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_rm import plots
from lora_rm.metrics import calibration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: Path) -> np.ndarray:
    """A minimal PNG reader for what `write_png` promises: 8-bit RGB, no interlace, filter 0 on every row.

    Checks the signature, every chunk's CRC, IHDR, and that the IDAT data inflates to height * (1 + 3 * width)
    bytes; returns the (H, W, 3) uint8 pixels.
    """
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all(), "every row uses filter 0"
    return rows[:, 1:].reshape(height, width, 3)


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


def test_write_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    out = plots.write_png(tmp_path / "sub" / "x.png", image)
    assert out == tmp_path / "sub" / "x.png"
    np.testing.assert_array_equal(read_png(out), image)


def test_reward_histograms(tmp_path):
    g = torch.Generator().manual_seed(0)
    out = plots.reward_histograms(
        torch.randn(300, generator=g) + 1, torch.randn(300, generator=g) - 1, tmp_path / "h.png"
    )
    assert isinstance(out, Path) and out.read_bytes()[:8] == PNG_SIGNATURE
    image = read_png(out)
    assert image.shape == (500, 800, 3)
    assert n_colours(image) >= 6
    for colour in (plots.BLUE, plots.ORANGE, blended(plots.BLUE), blended(plots.ORANGE), plots.TEXT):
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
    assert spacing >= max(plots.text_width(label) for label in scale.labels) + 16
    assert scale.hi >= 123457 and len(scale.ticks) >= 4


def test_long_title_is_cut_to_the_canvas(tmp_path):
    run = tmp_path / ("a-very-long-run-directory-name-" * 4)
    run.mkdir()
    write_metrics(run / "metrics.jsonl", with_eval=False)
    image = read_png(plots.training_curves(run / "metrics.jsonl", tmp_path / "t.png"))
    assert (image[:, :4] == 255).all() and (image[:, -4:] == 255).all()  # nothing runs off the sides


def test_font_covers_the_promised_characters():
    promised = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz .,-+:%()/_=<"
    assert set(promised) <= set(plots.FONT)
    assert plots.text_mask("ab", scale=1).shape == (9, 11)
    assert plots.text_mask("ab", scale=2).shape == (18, 22)
    np.testing.assert_array_equal(plots.text_mask("~", 1), plots.text_mask("?", 1))  # unknown -> "?"
