"""Atomic writes: a folder or file is written beside its final path and renamed into place in one step, so a
crash or kill never leaves a half-written output that a later read (or a resume) would trust."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def rename_with_retry(src: Path, dst: Path, attempts: int = 10) -> None:
    """`os.replace(src, dst)`, retried on PermissionError: on Windows an antivirus or indexer can hold a fresh
    file open for a moment. Raises the last PermissionError after `attempts` tries."""
    for i in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if i == attempts - 1:
                raise
            time.sleep(0.2 * (i + 1))


class NotReplaceable(Exception):
    """A write's final path is a symlink or another kind of thing than the write makes (a device, a FIFO, a
    folder for a file): a rename would replace it, not write through it. The CLI reports it as a user error
    (exit 2)."""

    exit_code = 2


def _remove(path: Path) -> None:
    """Remove `path` if there: a folder with what it holds, a file or a symlink itself (never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


@contextlib.contextmanager
def staged(final: str | Path, folder: bool = True) -> Iterator[Path]:
    """Yield `<final>.partial` to write into: a fresh empty folder, or with `folder=False` a file path.

    When the block ends, the staged output replaces `final` in one rename. When it raises, `final` is left as
    it was and the `.partial` stays behind (the next write clears it; readers never look at it). Raises
    NotReplaceable, before writing, when `final` is a symlink or something else than the kind written (a device, a
    FIFO, a file where a folder goes): a rename would replace it, not write through it.
    """
    final = Path(final)
    if final.is_symlink() or (final.exists() and not (final.is_dir() if folder else final.is_file())):
        kind = "a symlink" if final.is_symlink() else "not a regular " + ("folder" if folder else "file")
        raise NotReplaceable(f"{final}: is {kind}; it is left as it is and nothing was written")
    staging = final.with_name(final.name + ".partial")
    _remove(staging)
    if folder:
        staging.mkdir(parents=True)
    else:
        staging.parent.mkdir(parents=True, exist_ok=True)
    yield staging
    if final.is_dir():  # a folder cannot be renamed onto a non-empty one
        shutil.rmtree(final)
    rename_with_retry(staging, final)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a staged file: readers see the old file or the new one."""
    with staged(path, folder=False) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)


def umask_mode(mode: int = 0o666) -> int:
    """`mode` with the process umask applied: what a plain `open()` would create."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def respect_umask(root: Path) -> None:
    """Give the files under `root` that safetensors created mode 0600 the mode the umask asks for, so another
    user (a serving account) can read the model; files a user restricted on purpose keep their mode."""
    mode = umask_mode()
    if mode == 0o600:
        return
    for p in root.rglob("*.safetensors"):
        with contextlib.suppress(OSError):
            if p.is_file() and p.stat().st_mode & 0o777 == 0o600:  # another user's file: chmod fails
                p.chmod(mode)


def write_jsonl_atomic(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write JSON Lines to a temporary file beside `path`, then rename it: no half-written output."""
    path = Path(path)
    with staged(path, folder=False) as staging, staging.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return path
