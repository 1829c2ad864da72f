"""One run per output folder, through the real command line: a second run or resume into a folder in use is
refused, a fresh run never overwrites a finished one, a full disk is a clear error, output paths are checked
up front. Every case asserts the exit code, that no traceback was printed, and what is on disk afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import cli_runner
import pytest
from cli_runner import ROOT, SCRIPT, Case, run_training, train_command, train_env
from conftest import preference_rows, write_jsonl

from lora_rm.errors import UserError
from lora_rm.training.checkpoint import complete_checkpoints, damage
from lora_rm.training.outdir import LOCK, MARKER, acquire_lock
from lora_rm.util.atomic import NotReplaceable, staged, write_text_atomic

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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with its content's sha256 (folders as 'dir')."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def test_overwrite_and_output_folders_never_touch_what_a_run_did_not_write(tmp_path, tiny_gpt2, trained_run):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    # a finished run with the user's own files put beside its outputs
    run = tmp_path / "run"
    shutil.copytree(trained_run.output_dir, run)
    (run / "notes.txt").write_text("mine", encoding="utf-8")
    (run / "step-000002" / "inner").mkdir(parents=True)
    (run / "step-000002" / "inner" / ".lora_rm.lock").write_text("{}", encoding="utf-8")
    # a source checkout that happens to hold run-like names, with no lora_rm marker
    checkout = tmp_path / "checkout"
    (checkout / "runs" / "old").mkdir(parents=True)
    (checkout / "config.json").write_text("{}", encoding="utf-8")
    (checkout / "pyproject.toml").write_text("[project]\n", encoding="utf-8")
    # the base model's own folder and a dataset folder
    base = tmp_path / "base"
    shutil.copytree(tiny_gpt2, base)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(data, data_dir / "train.jsonl")
    before = _tree(tmp_path)

    def case(out: Path, *extra: str, base_path: Path = tiny_gpt2, dataset: Path = data) -> Case:
        argv = ["--base", str(base_path), "--dataset", str(dataset), "--output-dir", str(out)]
        return Case(SCRIPT, [*argv, "--quant", "none", "--max-steps", "2", "--overwrite-output-dir", *extra])

    cases = {
        "foreign_files": case(run),
        "no_marker": case(checkout),
        "base_folder": case(base, base_path=base),
        "inside_base": case(base / "rm", base_path=base),
        "inside_dataset_folder": case(data_dir / "rm", dataset=data_dir),
        "holds_the_dataset": case(tmp_path, dataset=data),
        "inside_another_run": case(run / "step-000002" / "rm"),
        "holds_the_source_tree": case(ROOT.parent),
    }
    expected = {
        "foreign_files": "also holds notes.txt, step-000002; nothing was deleted",
        "no_marker": "also holds config.json, pyproject.toml, runs; nothing was deleted",
        "base_folder": f"overlaps the folder of --base {base}",
        "inside_base": f"overlaps the folder of --base {base}",
        "inside_dataset_folder": f"overlaps the folder of --dataset {data_dir}",
        "holds_the_dataset": f"overlaps the folder of --dataset {data}",
        "inside_another_run": f"is inside the folder of another run ({run})",
        "holds_the_source_tree": "is or contains lora_rm's source tree",
    }
    (tmp_path / "logs").mkdir()
    runs = cli_runner.start(cases, tmp_path / "logs")
    try:
        for name, text in expected.items():
            result = runs.result(name)
            assert result.code == 2 and "Traceback" not in result.err, (name, result.err[-2000:])
            assert text in result.err, (name, result.err[-2000:])
    finally:
        runs.stop()
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("logs")} == before


@pytest.mark.integration
def test_a_run_started_in_the_current_folder_is_refused(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "train.py").write_text("print('mine')\n", encoding="utf-8")
    cmd = _cmd(tiny_gpt2, data, ".", "--overwrite-output-dir")
    proc = subprocess.run(cmd, cwd=checkout, env=train_env(), capture_output=True, text=True, timeout=300)
    _refused(proc, "--output-dir .: is the current folder, which holds files no run wrote")
    assert sorted(p.name for p in checkout.iterdir()) == ["train.py"]


@pytest.mark.integration
def test_overwrite_deletes_exactly_the_previous_runs_outputs(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    out = tmp_path / "run"
    first = run_training(_cmd(tiny_gpt2, data, out, "--merge", steps=4))
    assert first.returncode == 0, first.stderr[-2000:]
    assert (out / MARKER).is_file() and (out / "merged").is_dir()
    # a forced resume without --merge: the merged model of the earlier adapter must not stay beside the new one
    resumed = run_training(_cmd(tiny_gpt2, data, out, "--resume", "--force-resume", "--no-merge", steps=6))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        not (out / "merged").exists() and "merged from an earlier adapter" in resumed.stderr + resumed.stdout
    )
    replaced = run_training(_cmd(tiny_gpt2, data, out, "--overwrite-output-dir", steps=2))
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "adapter", "config.json", "eval", "metrics.jsonl", "step-000002"]
    )


# Takes the lock of argv[1] (a stale lock file: its process is gone), holds it for a moment, prints the outcome.
TAKE_LOCK = r"""
import sys, time
from pathlib import Path
from lora_rm.errors import UserError
from lora_rm.training.outdir import acquire_lock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together
try:
    acquire_lock(Path(sys.argv[1]))
    print("won", flush=True)
    time.sleep(1.5)
except UserError:
    print("lost", flush=True)
"""


@pytest.mark.integration
def test_of_processes_taking_a_stale_lock_at_once_exactly_one_wins(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for trial in range(5):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        (folder / LOCK).write_text(
            json.dumps({"pid": gone.pid, "host": os.uname().nodename}), encoding="utf-8"
        )
        at = str(time.time() + 5.0)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", TAKE_LOCK, str(folder), at],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outcomes == ["lost", "lost", "won"], (trial, outcomes)


def test_staged_writes_never_replace_a_symlink_a_fifo_or_another_kind(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep", encoding="utf-8")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for final, is_folder in ((link, False), (fifo, False), (folder, False), (target, True)):
        with pytest.raises(NotReplaceable, match="nothing was written"), staged(final, folder=is_folder):
            pass
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "keep"
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and folder.is_dir()
    # a leftover `.partial` that is a symlink is removed, not followed
    (tmp_path / "new.txt.partial").symlink_to(target)
    write_text_atomic(tmp_path / "new.txt", "fresh")
    assert (tmp_path / "new.txt").read_text(encoding="utf-8") == "fresh" and target.read_text() == "keep"


def test_score_and_eval_never_write_over_the_model_the_input_or_special_files(tmp_path, trained_run):
    model = trained_run.adapter_dir
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "question :", "response": " sure"}])
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(8))
    target = tmp_path / "target.jsonl"
    target.write_text("keep\n", encoding="utf-8")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    weights = model / "adapter_model.safetensors"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (weights, model / "reward_stats.json")}
    cli = ROOT / "lora_rm" / "cli.py"

    def score(output: Path) -> Case:
        return Case(cli, ["score", "--model", str(model), "--input", str(rows), "--output", str(output)])

    cases = {
        "symlink": score(link),
        "fifo": score(fifo),
        "model_weights": score(weights),
        "the_input": score(rows),
        "eval_into_model": Case(
            cli, ["eval", "--model", str(model), "--dataset", str(data), "--output-dir", str(model)]
        ),
    }
    expected = {
        "symlink": "is a symlink",
        "fifo": "is not a regular file",
        "model_weights": f"would replace {model}",
        "the_input": f"would replace {rows}",
        "eval_into_model": f"is in the model folder {model}",
    }
    runs = cli_runner.start(cases, tmp_path)
    try:
        for name, text in expected.items():
            result = runs.result(name)
            assert result.code == 2 and "Traceback" not in result.err, (name, result.err[-2000:])
            assert text in result.err, (name, result.err[-2000:])
    finally:
        runs.stop()
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "keep\n"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
