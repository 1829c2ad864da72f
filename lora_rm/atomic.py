"""Atomic writes: a folder or file is written beside its final path and renamed into place in one step, so a
crash or kill never leaves a half-written output that a later read (or a resume) would trust."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def staged(final: str | Path, folder: bool = True) -> Iterator[Path]:
    """Yield `<final>.partial` to write into: a fresh empty folder, or with `folder=False` a file path.

    When the block ends, the staged output replaces `final` in one rename. When it raises, `final` is left as
    it was and the `.partial` stays behind (the next write clears it; readers never look at it).
    """
    final = Path(final)
    staging = final.with_name(final.name + ".partial")
    if staging.is_dir():
        shutil.rmtree(staging)
    if folder:
        staging.mkdir(parents=True)
    else:
        staging.parent.mkdir(parents=True, exist_ok=True)
    yield staging
    if final.is_dir():  # a folder cannot be renamed onto a non-empty one
        shutil.rmtree(final)
    rename_with_retry(staging, final)


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
