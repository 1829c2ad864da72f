"""One run per output folder, through the real command line: a second run or resume into a folder in use is
refused, a fresh run never overwrites a finished one, a full disk is a clear error, output paths are checked
up front. Every case asserts the exit code, that no traceback was printed, and what is on disk afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli_runner
import pytest
from cli_runner import ROOT, SCRIPT, Case, run_training, train_command, train_env
from conftest import preference_rows, write_jsonl

from lora_rm.checkpoint import complete_checkpoints, damage
from lora_rm.errors import UserError
from lora_rm.outdir import LOCK, acquire_lock

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into a read-only folder anyway


def _cmd(base, data, out, *extra: str, steps: int = 6) -> list[str]:
    return train_command(
        base, data, out, *extra, max_steps=steps, save_steps=2, eval_fraction=0.25, logging_steps=1
    )


def _snapshot(out: Path) -> dict[str, str]:
    """sha256 of every file under `out`: what must not change when a run is refused."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _refused(proc, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]


def test_second_run_and_resume_into_a_folder_in_use_are_refused(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    out = tmp_path / "run"
    first = subprocess.Popen(
        _cmd(tiny_gpt2, data, out), cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 240
        while not (out / "step-000002" / "COMPLETE").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # alive and holding the lock while the others try
        lock = json.loads((out / LOCK).read_text(encoding="utf-8"))
        assert lock["pid"] == first.pid
        before = _snapshot(out)
        for extra in ((), ("--resume",)):
            _refused(run_training(_cmd(tiny_gpt2, data, out, *extra)), "another run is using this folder")
        assert _snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps]) == len(set(steps)) + 1  # 6 train + 1 final eval
    assert not (out / LOCK).exists()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename}), encoding="utf-8")
    lock = acquire_lock(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
        acquire_lock(tmp_path)  # now held by a live process: this one


def test_a_finished_run_is_never_overwritten_by_a_fresh_one(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    out = tmp_path / "run"
    assert run_training(_cmd(tiny_gpt2, data, out)).returncode == 0
    before = _snapshot(out)
    refused = run_training(_cmd(tiny_gpt2, data, out, steps=4))
    _refused(refused, "holds another run", "--resume", "--overwrite-output-dir")
    assert _snapshot(out) == before and not (out / LOCK).exists()

    # resuming the finished run from its final checkpoint redoes the final eval instead of writing {}
    resumed = run_training(_cmd(tiny_gpt2, data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    saved = json.loads((out / "adapter" / "lora_rm_config.json").read_text())
    assert saved["eval"]["n_pairs"] == 6

    replaced = run_training(_cmd(tiny_gpt2, data, out, "--overwrite-output-dir", steps=3))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert [p.name for p in out.glob("step-*")] == ["step-000002"]  # the old run's step-000004/6 are gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3


# Patches torch.save to fail like a full disk at one file, then runs the training script as a user would.
DISK_FULL = r"""
import errno, runpy, sys, torch
real_save, target = torch.save, sys.argv.pop(1)
def save(obj, f, *a, **k):
    if str(f).endswith(target):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *a, **k)
torch.save = save
sys.argv[0] = sys.argv[1]; del sys.argv[1]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    out = tmp_path / "run"
    cmd = _cmd(tiny_gpt2, data, out)
    proc = run_training([cmd[0], "-c", DISK_FULL, "step-000004.partial/optimizer.pt", *cmd[1:]])
    _refused(
        proc,
        f"{out}/step-000004.partial/optimizer.pt: cannot write (No space left on device)",
        f"Kept intact: checkpoint {out}/step-000002",
        "--resume",
    )
    assert [p.name for p in complete_checkpoints(out)] == ["step-000002"]
    assert damage(out / "step-000002") is None
    assert not list(out.glob("*.partial")) and not (out / LOCK).exists()


def test_output_paths_are_checked_before_anything_runs(tmp_path, trained_run):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    model = str(trained_run.adapter_dir)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "question :", "response": " sure"}])
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    cli = ROOT / "lora_rm" / "cli.py"
    cases = {
        "train_into_file": Case(
            SCRIPT, ["--base", model, "--dataset", str(data), "--output-dir", str(a_file)]
        ),
        "score_into_dir": Case(
            cli, ["score", "--model", model, "--input", str(rows), "--output", str(tmp_path)]
        ),
        "eval_into_file": Case(
            cli, ["eval", "--model", model, "--dataset", str(data), "--output-dir", str(a_file)]
        ),
    }
    expected = {
        "train_into_file": f"--output-dir {a_file}: is a file, not a folder",
        "score_into_dir": f"--output {tmp_path}: is a folder; give a file name",
        "eval_into_file": f"--output-dir {a_file}: is a file, not a folder",
    }
    runs = cli_runner.start(cases, tmp_path)
    try:
        for name, text in expected.items():
            result = runs.result(name)
            assert result.code == 2 and "Traceback" not in result.err and text in result.err, result.err
    finally:
        runs.stop()
    assert a_file.read_text(encoding="utf-8") == "x"


@pytest.mark.skipif(AS_ROOT, reason="root writes into a read-only folder")
def test_a_read_only_output_dir_is_refused(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused(run_training(_cmd(tiny_gpt2, data, locked / "run")), "is not writable")
    finally:
        locked.chmod(0o755)
    assert not (locked / "run").exists()
