"""Limits on what lora_rm reads and is asked to do, so that a small input can neither exhaust memory nor hang:
the size of a data or config file (as stored and decompressed), a run's optimizer steps and epochs, and the
batch size callers of the library pass."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, BinaryIO

from lora_rm.config import MAX_STEPS
from lora_rm.errors import UserError

# A local data file is read whole into memory as text, then parsed into rows (several times its size again).
# Past 1 GiB use Parquet or a `save_to_disk` folder: `datasets` reads those memory-mapped.
MAX_TEXT_BYTES = 2**30
MAX_CONFIG_BYTES = 2**20  # a config file is a few dozen options: 1 MiB is a thousand times that
MAX_RATIO, RATIO_FLOOR = 100, 2**26  # see read_limited
_CHUNK = 2**20


def size_limit_message(path: Path | str, limit: int, what: str = "data file") -> str:
    hint = (
        "; convert it to Parquet or a save_to_disk folder (read memory-mapped)" if what == "data file" else ""
    )
    shown = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit} bytes"
    return f"{path}: {what} larger than {shown}, the most lora_rm reads into memory{hint}"


def check_file_size(path: Path, limit: int, what: str = "data file") -> None:
    """UserError when the file at `path` is larger than `limit` bytes: told from its size, nothing read."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if size > limit:
        raise UserError(size_limit_message(path, limit, what))


def read_limited(stream: BinaryIO, path: Path, limit: int) -> bytes:
    """All of `stream`, the decompressed bytes of the file at `path`, in chunks; UserError as soon as they pass
    `limit` bytes, or RATIO_FLOOR bytes at over MAX_RATIO times the file's size (a few MB that inflate to
    gigabytes stop after 64 MiB: data compresses ~3-20x, a compression bomb ~1000x)."""
    stored = path.stat().st_size
    out = bytearray()
    while chunk := stream.read(_CHUNK):
        out += chunk
        if len(out) > limit:
            raise UserError(f"{size_limit_message(path, limit)} (decompressed)")
        if len(out) > RATIO_FLOOR and len(out) > MAX_RATIO * stored:
            raise UserError(
                f"{path}: inflates to over {MAX_RATIO} times its {stored:,} bytes (stopped at {len(out):,}): a "
                "compression bomb; if it is real data, decompress it and pass the plain file"
            )
    return bytes(out)


def check_total_steps(total_steps: int, epochs: int) -> None:
    """UserError when `epochs` over the training data plan more than MAX_STEPS optimizer steps."""
    if total_steps > MAX_STEPS:
        raise UserError(
            f"epochs: {epochs} epochs are {total_steps:,} optimizer steps, more than the {MAX_STEPS:,} a run can "
            "finish; lower --epochs or give --max-steps"
        )


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """`batch_size` if it is a positive integer, else ValueError (a bool is not a size)."""
    try:
        size = operator.index(batch_size)  # int, numpy ints; not 2.0 or "4"
    except TypeError:
        size = 0
    if isinstance(batch_size, bool) or size <= 0:
        raise ValueError(f"{name} must be a positive integer, got {batch_size!r}")
    return size
