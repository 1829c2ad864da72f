"""lora_rm.raster: the PNG writer, checked by a minimal decoder that `test_plots.py` shares; the font."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from lora_rm import raster

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


def test_write_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    out = raster.write_png(tmp_path / "sub" / "x.png", image)
    assert out == tmp_path / "sub" / "x.png"
    np.testing.assert_array_equal(read_png(out), image)


def test_font_covers_the_promised_characters():
    promised = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz .,-+:%()/_=<"
    assert set(promised) <= set(raster.FONT)
    assert raster.text_mask("ab", scale=1).shape == (9, 11)
    assert raster.text_mask("ab", scale=2).shape == (18, 22)
    np.testing.assert_array_equal(raster.text_mask("~", 1), raster.text_mask("?", 1))  # unknown -> "?"


def test_canvas_fill_rect_blends_and_clips():
    canvas = raster.Canvas(4, 3)
    canvas.fill_rect(-2, 1, 2, 9, (0, 100, 255), alpha=0.5)  # clipped to x 0..1, y 1..2
    # 255 * 0.5 + c * 0.5, rounded: 127.5 -> 128, 177.5 -> 178, 255
    np.testing.assert_array_equal(canvas.pixels[1:, :2], np.full((2, 2, 3), (128, 178, 255)))
    assert (canvas.pixels[0] == 255).all() and (canvas.pixels[:, 2:] == 255).all()
    assert raster.text_width("ab") == raster.text_mask("ab").shape[1] == 22
