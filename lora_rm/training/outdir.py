"""One run per output folder: an exclusive lock, no fresh run over another run's outputs, output paths checked
up front, and write errors (disk full, permission, read-only) turned into one clear message."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_rm.errors import UserError
from lora_rm.util.atomic import respect_umask, write_text_atomic
from lora_rm.util.paths import is_within

LOCK = ".lora_rm.lock"


# Written into --output-dir once a run starts writing there: the folder is a run's, and --overwrite-output-dir
# may delete the names below in it (and nothing else)
MARKER = ".lora_rm_run"


# What a run writes into its --output-dir, each also as a `.partial` while it is being written
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "adapter", "merged", "eval", "runs", "lora_rm")


OWNED = re.compile(r"(?:" + "|".join(re.escape(n) for n in RUN_OUTPUTS) + r"|step-\d+)(?:\.partial)?")


WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EPERM, errno.EDQUOT, errno.EFBIG}


_held: dict[Path, Any] = {}  # lock file -> the FileLock this process holds on it


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


def check_output_file(path: str | Path, option: str, keep: tuple[str | Path | None, ...] = ()) -> None:
    """Raise a UserError unless `path` names a regular file that can be written (not a folder, device, FIFO
    or symlink, in a writable folder) and is none of the files of `keep`, nor in any of its folders (the
    model, the input file): a rename would replace them."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a symlink" if path.is_symlink() else "not a regular file (a device, FIFO or socket)"
        raise UserError(f"{option} {path}: is {kind}; give the path of a regular file to write")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path}: is not writable")
    for kept in keep:
        if kept is not None and Path(kept).exists() and is_within(path, kept):
            raise UserError(
                f"{option} {path}: would replace {kept} or a file in it; write the output elsewhere"
            )
    check_output_folder(path.parent, option)


def check_not_protected(out: Path, cfg: Any) -> None:
    """Raise a UserError when --output-dir is, contains or sits inside a folder the run reads (the base model,
    the data) or another run's folder, contains the current folder (or is it, holding other files), or is or
    contains lora_rm's own source tree: a run writes, and with --overwrite-output-dir deletes, in its output
    folder."""
    # the source tree first: when it and an input share a parent folder, this is the refusal to name
    source = Path(__file__).resolve().parents[2]
    if (source / "pyproject.toml").is_file() and is_within(source, out):
        raise UserError(
            f"--output-dir {out}: is or contains lora_rm's source tree ({source}); choose another"
        )
    read = [("--base", cfg.base), ("--dataset", cfg.dataset), ("--eval-dataset", cfg.eval_dataset)]
    for option, value in read:
        if not value or not Path(value).exists():
            continue  # a hub id
        if is_within(value, out) or (Path(value).is_dir() and is_within(out, value)):
            raise UserError(
                f"--output-dir {out}: overlaps the folder of {option} {value}; a run must not write where "
                "its inputs are. Choose another --output-dir"
            )
    cwd, here = Path.cwd().resolve(), Path(out).resolve()
    if here in cwd.parents or (here == cwd and foreign_entries(cwd)):  # a run may start in an empty folder
        where = (
            "is the current folder, which holds files no run wrote"
            if here == cwd
            else "contains the current folder"
        )
        raise UserError(f"--output-dir {out}: {where} ({cwd}); give the run a folder of its own")
    for parent in Path(out).resolve().parents:
        if (parent / MARKER).exists() or (parent / LOCK).exists():
            raise UserError(
                f"--output-dir {out}: is inside the folder of another run ({parent}); choose a folder outside it"
            )


def holds_a_run(folder: Path) -> bool:
    """Whether `folder` is, or holds somewhere below it, a run folder (its marker or lock)."""
    return any(p.name in (MARKER, LOCK) for p in folder.rglob("*"))


def is_run_folder(out: Path) -> bool:
    """Whether lora_rm marked `out` as a run's folder (or an older lora_rm wrote its config.json there)."""
    if (out / MARKER).is_file():
        return True
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"sequence_format", "output_dir", "base"} <= config.keys()


def foreign_entries(out: Path) -> list[str]:
    """The entries of `out` that no lora_rm run wrote: all of them when `out` is not a run folder, else each
    name a run never writes, a symlink, or a folder holding another run."""
    entries = sorted(p for p in out.iterdir() if p.name not in (LOCK, MARKER)) if out.is_dir() else []
    if not is_run_folder(out):
        return [p.name for p in entries]
    return [
        p.name
        for p in entries
        if not OWNED.fullmatch(p.name) or p.is_symlink() or (p.is_dir() and holds_a_run(p))
    ]


def mark_run_folder(out: Path) -> None:
    """Mark `out` as this run's folder (what --overwrite-output-dir later checks)."""
    if not (out / MARKER).is_file():
        write_text_atomic(out / MARKER, json.dumps({"lora_rm_run": 1}) + "\n")


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


def refuse_foreign(out: Path) -> None:
    """Raise a UserError listing what in `out` no lora_rm run wrote: --overwrite-output-dir deletes nothing
    then."""
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 10 else "")
        raise UserError(
            f"{out}: --overwrite-output-dir deletes only what a lora_rm run wrote, and this folder also holds "
            f"{shown}; nothing was deleted. Move those away, or choose another --output-dir"
        )


def clear_previous_run(out: Path, cfg: Any, log: Any = print) -> None:
    """With --overwrite-output-dir on a fresh run, delete the outputs of the run that was in `out` (called once
    every input has been checked, just before the new run writes); refuses (deleting nothing) when `out`
    holds anything else. Then marks `out` as this run's folder."""
    if not cfg.resume and cfg.overwrite_output_dir:
        refuse_foreign(out)
        old = sorted(p for p in out.iterdir() if OWNED.fullmatch(p.name))
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old:
            log(
                f"--overwrite-output-dir: deleted the previous run's {', '.join(p.name for p in old)} in {out}"
            )
    mark_run_folder(out)


def acquire_lock(out: Path) -> Path:
    """Lock `out` for this process (an OS lock on `out/.lora_rm.lock`, which holds this pid and host), or
    raise a UserError naming the run that holds it. The OS drops the lock when its process dies (killed,
    crashed), so a stale lock file is simply taken; of processes trying at once, exactly one wins."""
    from filelock import FileLock, Timeout

    lock = out / LOCK
    held = FileLock(str(lock), timeout=0)
    try:
        held.acquire()
    except Timeout:
        try:
            holder = json.loads(lock.read_text(encoding="utf-8"))
            who = f"pid {holder['pid']} on {holder['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process starting up"
        raise UserError(
            f"{out}: another run is using this folder ({who}, lock file {lock}); wait for it, or use another "
            "--output-dir"
        ) from None
    # the holder, for the message above; other processes only read the file
    with lock.open("r+", encoding="utf-8") as f:
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    _held[lock] = held
    return lock


def release_lock(lock: Path) -> None:
    """Delete the lock file, then drop the OS lock (a process waiting on the deleted file tries again)."""
    with contextlib.suppress(OSError):
        lock.unlink()
    held = _held.pop(lock, None)
    if held is not None:
        held.release()


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
    from lora_rm.training.checkpoint import complete_checkpoints, damage

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
    """Hold `cfg.output_dir` for one run: the folder is checked (never a folder the run reads, the current
    folder or another run's), locked against a second run (released on exit, however the run ends), refused
    for a fresh run if it holds another run (unless --overwrite-output-dir, which is refused when the folder
    holds anything a run did not write), and write errors inside become UserErrors. Other processes of a
    distributed run only get the write-error handling: the main process holds the lock for them."""
    out = Path(cfg.output_dir)
    check_output_folder(out, "--output-dir")
    check_not_protected(out, cfg)
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
        if cfg.overwrite_output_dir and not cfg.resume:
            refuse_foreign(out)
        with write_errors(out):
            yield out
    finally:
        respect_umask(out)
        release_lock(lock)
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
