"""Two processes (torchrun, gloo on CPU) train to the same weights as one with the same global batch."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import ROOT, run_training, train_command, train_env
from conftest import integration
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="gloo multi-process test runs on Linux and macOS"
)


def _cmd(base, data, out, accumulation: int, *extra: str, processes: int = 1) -> list[str]:
    return train_command(
        base,
        data,
        out,
        *extra,
        processes=processes,
        gradient_accumulation_steps=accumulation,
        max_steps=6,
        save_steps=3,
        lora_dropout=0,
        eval_fraction=0.2,
        eval_steps=6,
        learning_rate="5e-3",
        seed=3,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
@integration
def single(tmp_path_factory, tiny_gpt2):
    from conftest import preference_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("single")
    data = write_jsonl(tmp / "prefs.jsonl", preference_rows(40))
    proc = run_training(_cmd(tiny_gpt2, data, tmp / "one", 4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, tmp / "one"


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_two_processes_match_one(single, tiny_gpt2, tmp_path):
    data, one = single
    proc = run_training(_cmd(tiny_gpt2, data, tmp_path / "two", 2, processes=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final eval") == 1, "one process reports"
    _assert_same(_weights(one), _weights(tmp_path / "two"))


def test_resume_under_two_processes(single, tiny_gpt2, tmp_path):
    data, one = single
    out = tmp_path / "two"
    cmd = _cmd(tiny_gpt2, data, out, 2, processes=2)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (out / "step-000003" / "COMPLETE").is_file():
        assert proc.poll() is None and time.time() < deadline, (
            proc.stderr.read()[-2000:] if proc.stderr else ""
        )
        time.sleep(0.01)
    import psutil  # accelerate's dependency

    # torchrun starts each worker in a session of its own: killing its group alone leaves them to finish the run
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    psutil.wait_procs(workers, timeout=60)
    proc.wait(timeout=60)
    resumed = run_training([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    _assert_same(_weights(one), _weights(out))
