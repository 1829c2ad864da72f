"""Pixel-level drawing for the plots: an embedded 5x7 bitmap font (with descenders; characters outside it
draw as `?`) and the text masks built from it, `Canvas`, a white numpy RGB image with filled rectangles,
lines 2 px wide without anti-aliasing, markers and text drawn at twice the font's size, and `write_png`,
an 8-bit RGB PNG writer on zlib alone, so the project needs no plotting or imaging library.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
TEXT: Color = (34, 34, 34)
TEXT_SCALE = 2

# 5x7 glyphs, rows top to bottom; g j p q y , have two more rows below the baseline.
_FONT_ROWS: dict[str, str] = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# #...# ##### #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .#### #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... ..... .##.. .##.. ..#.. .#...",
    "-": "..... ..... ..... .###. ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
}
GLYPH_W, GLYPH_H, CAP_H = 5, 9, 7  # cell is 5 x 9 px: 7 rows above the baseline, 2 below


def _glyph(rows: str) -> np.ndarray:
    grid = np.array([[ch == "#" for ch in row] for row in rows.split()], dtype=bool)
    return np.vstack([grid, np.zeros((GLYPH_H - grid.shape[0], GLYPH_W), dtype=bool)])


FONT: dict[str, np.ndarray] = {ch: _glyph(rows) for ch, rows in _FONT_ROWS.items()}


def text_mask(text: str, scale: int = TEXT_SCALE) -> np.ndarray:
    """Boolean pixel mask of `text`, shape (9 * scale, (6 * len - 1) * scale); unknown characters as `?`."""
    if not text:
        return np.zeros((GLYPH_H * scale, 0), dtype=bool)
    cells = []
    for i, ch in enumerate(text):
        cells.append(FONT.get(ch, FONT["?"]))
        if i < len(text) - 1:
            cells.append(np.zeros((GLYPH_H, 1), dtype=bool))
    return np.kron(np.hstack(cells), np.ones((scale, scale), dtype=bool)).astype(bool)


def text_width(text: str, scale: int = TEXT_SCALE) -> int:
    return max(0, (6 * len(text) - 1) * scale)


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG (filter 0, no interlace); returns the Path."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got shape {image.shape}")
    height, width = image.shape[:2]
    raw = np.hstack([np.zeros((height, 1), dtype=np.uint8), image.reshape(height, width * 3)]).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


class Canvas:
    """A white RGB image with the few drawing operations the plots need; coordinates are (x, y) pixels."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def fill_rect(self, x0: float, y0: float, x1: float, y1: float, color: Color, alpha: float = 1.0) -> None:
        """Fill the pixels [x0, x1) x [y0, y1) (rounded, clipped), blending `color` over what is there."""
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        xa, xb, ya, yb = max(xa, 0), min(xb, self.width), max(ya, 0), min(yb, self.height)
        if xa >= xb or ya >= yb:
            return
        region = self.pixels[ya:yb, xa:xb]
        if alpha >= 1.0:
            region[:] = color
        else:
            region[:] = np.round(region * (1.0 - alpha) + np.array(color) * alpha).astype(np.uint8)

    def line(
        self,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        color: Color,
        width: int = 2,
        dash: tuple[float, float] | None = None,
        clip: tuple[int, int, int, int] | None = None,
    ) -> None:
        """A `width`-px line; `dash` = (on, off) lengths in px; `clip` = (left, top, right, bottom)."""
        length = math.hypot(x1 - x0, y1 - y0)
        t = np.linspace(0.0, 1.0, max(2, int(math.ceil(length * 2)) + 1))
        if dash is not None:
            t = t[(t * length) % (dash[0] + dash[1]) < dash[0]]
        xs = np.floor(x0 + (x1 - x0) * t - (width - 1) / 2 + 0.5).astype(np.int64)
        ys = np.floor(y0 + (y1 - y0) * t - (width - 1) / 2 + 0.5).astype(np.int64)
        left, top, right, bottom = clip if clip is not None else (0, 0, self.width, self.height)
        for dx in range(width):
            for dy in range(width):
                px, py = xs + dx, ys + dy
                keep = (px >= max(left, 0)) & (px < min(right, self.width))
                keep &= (py >= max(top, 0)) & (py < min(bottom, self.height))
                self.pixels[py[keep], px[keep]] = color

    def marker(self, x: float, y: float, color: Color, radius: int = 4) -> None:
        """A filled disc with a 1-px white rim, so overlapping markers stay distinct."""
        cx, cy = int(round(x)), int(round(y))
        for r, c in ((radius + 1, WHITE), (radius, color)):
            yy, xx = np.mgrid[cy - r : cy + r + 1, cx - r : cx + r + 1]
            inside = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r + r) & (xx >= 0) & (yy >= 0)
            inside &= (xx < self.width) & (yy < self.height)
            self.pixels[yy[inside], xx[inside]] = c

    def text(
        self,
        x: float,
        y: float,
        text: str,
        color: Color = TEXT,
        scale: int = TEXT_SCALE,
        align: str = "left",
        valign: str = "top",
        vertical: bool = False,
        bold: bool = False,
    ) -> None:
        """Draw `text` anchored at (x, y): align left/center/right, valign top/middle (of capitals)/bottom.

        `vertical` turns it a quarter turn anticlockwise (reading upwards); the anchor then refers to the
        rotated box, align along x and valign along y. `bold` doubles each stroke one pixel to the right.
        """
        mask = text_mask(text, scale)
        if bold:
            mask = np.hstack([mask, np.zeros((mask.shape[0], 1), dtype=bool)])
            mask[:, 1:] |= mask[:, :-1].copy()
        mid = CAP_H * scale / 2  # capitals' middle, measured from the top of the cell
        if vertical:
            mask = np.rot90(mask)
            h, w = mask.shape
            ox = {"left": 0, "center": -w / 2, "right": -w}[align]
            oy = {"top": 0, "middle": -h / 2, "bottom": -h}[valign]
        else:
            h, w = mask.shape
            ox = {"left": 0, "center": -w / 2, "right": -w}[align]
            oy = {"top": 0, "middle": -mid, "bottom": -CAP_H * scale}[valign]
        ys, xs = np.nonzero(mask)
        xs, ys = xs + int(round(x + ox)), ys + int(round(y + oy))
        keep = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
        self.pixels[ys[keep], xs[keep]] = color

    def save(self, path: str | Path) -> Path:
        return write_png(path, self.pixels)
