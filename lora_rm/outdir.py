"""One run per output folder: an exclusive lock, no fresh run over another run's outputs, output paths checked
up front, and write errors (disk full, permission, read-only) turned into one clear message."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_rm.atomic import respect_umask
from lora_rm.errors import UserError

LOCK = ".lora_rm.lock"
# What a run writes into its --output-dir (step-* checkpoints besides): a folder holding any of them holds a run
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "adapter", "merged", "eval", "runs", "lora_rm")
WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def check_output_folder(path: str | Path, option: str) -> None:
    """Raise a UserError unless `path` is, or can be made, a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {existing} is not writable")


def check_output_file(path: str | Path, option: str) -> None:
    """Raise a UserError unless `path` names a file that can be written (not a folder, in a writable one)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: is not writable")
    check_output_folder(path.parent, option)


def run_outputs(out: Path) -> list[Path]:
    """The outputs of a run found in `out`: its config, metrics, models and checkpoints."""
    if not out.is_dir():
        return []
    found = [out / n for n in RUN_OUTPUTS if (out / n).exists()]
    return found + sorted(p for p in out.glob("step-*") if p.is_dir())


def resume_command() -> str:
    """The command line of this process with --resume added: what to type to continue the run."""
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite-output-dir")]
    script = sys.argv[0] if sys.argv and sys.argv[0] else "lora-rm"
    if Path(script).name in ("__main__.py", "cli.py", "-c"):
        prog = ["lora-rm", "train"]
    else:
        prog = ["python", script] if script.endswith(".py") else [script]
    return shlex.join([*prog, *argv, "--resume"])


def clear_previous_run(out: Path, cfg: Any, log: Any = print) -> None:
    """With --overwrite-output-dir on a fresh run, delete the outputs of the run that was in `out` (called once
    every input has been checked, just before the new run writes)."""
    if cfg.resume or not cfg.overwrite_output_dir:
        return
    old = run_outputs(out)
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if old:
        log(f"--overwrite-output-dir: deleted the previous run's {', '.join(p.name for p in old)} in {out}")


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """The pid and host in `lock`, or None when the lock is stale (its process is gone) or was left torn."""
    try:
        text = lock.read_text(encoding="utf-8")
        holder = json.loads(text)
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # killed between creating and filling it
        return None if time.time() - lock.stat().st_mtime > 10 else {"pid": "?", "host": "?"}
    if host != socket.gethostname():
        return holder  # another machine's process: cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return holder


def acquire_lock(out: Path) -> Path:
    """Create `out/.lora_rm.lock` holding this pid and host, or raise a UserError naming the run that holds it.
    A lock whose process is gone (killed, crashed) is taken over."""
    lock = out / LOCK
    for _ in range(3):
        try:
            f = lock.open("x", encoding="utf-8")  # exclusive: fails when the file exists
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise UserError(
                    f"{out}: another run is using this folder (pid {holder['pid']} on {holder['host']}, "
                    f"lock file {lock}); wait for it, or use another --output-dir. If no run is using it, "
                    "delete the lock file"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
        return lock
    raise UserError(f"{out}: could not take the lock file {lock}; another run keeps replacing it")


def write_error_message(e: BaseException, fallback: Path) -> str | None:
    """One line for a failed write (disk full, permission, read-only), or None if `e` is not one."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return f"{e.filename or fallback}: cannot write ({e.strerror or os.strerror(e.errno)})"
    text = str(e)
    markers = (
        "No space left",
        "Disk quota",
        "Read-only file system",
        "Permission denied",
        "file write failed",
    )
    if type(e).__name__ in ("SafetensorError", "RuntimeError") and (
        any(m in text for m in markers) or "iostream error" in text
    ):
        return f"{fallback}: cannot write ({text.strip().splitlines()[-1][:200]})"
    return None


def intact_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint in `out` that is complete and matches its manifest."""
    from lora_rm.checkpoint import complete_checkpoints, damage

    return next((p for p in reversed(complete_checkpoints(out)) if not damage(p)), None)


@contextlib.contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """Turn a failed write under `out` into a UserError naming the path and what is kept intact."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        message = write_error_message(e, out)
        if message is None:
            raise
        kept = intact_checkpoint(out)
        raise UserError(
            f"{message}. Kept intact: "
            + (
                f"checkpoint {kept}; free space or fix permissions, then resume with: {resume_command()}"
                if kept
                else "your input files; no checkpoint of this run was complete yet"
            )
        ) from None


@contextlib.contextmanager
def claim_output_dir(cfg: Any, main_process: bool = True) -> Iterator[Path]:
    """Hold `cfg.output_dir` for one run: the folder is checked, locked against a second run (released on
    exit, however the run ends), refused for a fresh run if it holds another run (unless
    --overwrite-output-dir), and write errors inside become UserErrors. Other processes of a distributed run
    only get the write-error handling: the main process holds the lock for them."""
    out = Path(cfg.output_dir)
    check_output_folder(out, "--output-dir")
    if not main_process:
        with write_errors(out):
            yield out
        return
    created = not out.exists()
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out)
    try:
        old = run_outputs(out)
        if old and not cfg.resume and not cfg.overwrite_output_dir:
            raise UserError(
                f"{out}: holds another run ({', '.join(p.name for p in old[:4])}{', ...' if len(old) > 4 else ''}); "
                f"continue it with: {resume_command()}  -- or start over (deleting it) with --overwrite-output-dir, "
                "or choose another --output-dir"
            )
        with write_errors(out):
            yield out
    finally:
        respect_umask(out)
        with contextlib.suppress(OSError):
            lock.unlink()
        if created:  # a run refused before writing leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()


class Terminated(Exception):
    """SIGTERM arrived outside the training loop (which turns it into a checkpoint and a clean stop)."""


def terminate_on_sigterm() -> None:
    """Make SIGTERM raise Terminated (main thread only), so the CLI prints a message and exits 143, and the
    output-dir lock is released on the way out."""
    import signal
    import threading

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated("terminated (SIGTERM)")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
