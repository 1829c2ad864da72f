"""lora_rm.training.checkpoint and resume: a killed run, resumed, ends bit-identical to one never interrupted."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_runner import ROOT, run_training, train_command, train_env
from conftest import integration
from safetensors.torch import load_file

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.training.checkpoint import complete_checkpoints, restore_rng_state, rng_state
from lora_rm.training.loop import TrainingStopped, train

STEPS, SAVE = 24, 5


def _cmd(base, data, out, *extra: str) -> list[str]:
    return train_command(
        base,
        data,
        out,
        *extra,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        save_steps=SAVE,
        save_total_limit=3,
        logging_steps=1,
        eval_steps=1000,
        learning_rate="5e-3",
        lora_dropout=0.1,
        seed=7,
    )


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
@integration
def reference(tmp_path_factory, tiny_gpt2):
    from conftest import preference_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("reference")
    data = write_jsonl(tmp / "prefs.jsonl", preference_rows(40))
    out = tmp / "run"
    proc = run_training(_cmd(tiny_gpt2, data, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, out


def _start_and_kill(cmd, out: Path, ready, sig=signal.SIGKILL) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not ready(out):
        assert proc.poll() is None, (
            "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
        )
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _step_reached(n):
    def ready(out: Path) -> bool:
        path = out / "metrics.jsonl"
        return path.is_file() and any(s >= n for s, _ in _safe_losses(out))

    return ready


def _safe_losses(out):
    try:
        return _losses(out)
    except (ValueError, KeyError):  # a line being written
        return []


def _checkpoint_complete(n):
    return lambda out: (out / f"step-{n:06d}" / "COMPLETE").is_file()


@pytest.mark.parametrize("where", ["mid-epoch", "right-after-checkpoint"])
def test_sigkill_then_resume_is_bit_identical(where, reference, tiny_gpt2, tmp_path):
    data, ref_out = reference
    out = tmp_path / "run"
    ready = _step_reached(SAVE + 2) if where == "mid-epoch" else _checkpoint_complete(2 * SAVE)
    killed = _start_and_kill(_cmd(tiny_gpt2, data, out), out, ready)
    assert killed.returncode == -signal.SIGKILL
    assert complete_checkpoints(out), "no checkpoint was written before the kill"
    proc = run_training(_cmd(tiny_gpt2, data, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    assert _losses(out) == _losses(ref_out)
    ref, got = _weights(ref_out), _weights(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_half_written_checkpoints_are_skipped(reference, tiny_gpt2, tmp_path):
    data, ref_out = reference
    out = tmp_path / "run"
    _start_and_kill(_cmd(tiny_gpt2, data, out), out, _checkpoint_complete(SAVE))
    # What a kill during a checkpoint write leaves: a staging folder, or a renamed one not yet marked complete.
    last = complete_checkpoints(out)[-1]
    step = int(last.name.split("-")[1])
    (out / f"step-{step + 1:06d}.partial").mkdir()
    broken = out / f"step-{step + 2:06d}"
    broken.mkdir()
    (broken / "state.json").write_text("{", encoding="utf-8")
    assert complete_checkpoints(out)[-1] == last
    proc = run_training(_cmd(tiny_gpt2, data, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {last}" in proc.stdout
    assert all(torch.equal(a, b) for a, b in zip(_weights(ref_out).values(), _weights(out).values()))


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(reference, tiny_gpt2, tmp_path):
    data, ref_out = reference
    out = tmp_path / "run"
    proc = _start_and_kill(_cmd(tiny_gpt2, data, out), out, _step_reached(3), sig=signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    interrupted_at = _losses(out)[-1][0]
    assert complete_checkpoints(out)[-1].name == f"step-{interrupted_at:06d}"
    done = run_training(_cmd(tiny_gpt2, data, out, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _losses(out) == _losses(ref_out)


def test_save_total_limit_keeps_the_newest(reference):
    _, ref_out = reference
    assert [p.name for p in complete_checkpoints(ref_out)] == ["step-000010", "step-000015", "step-000020"]
    state = json.loads((ref_out / "step-000020" / "state.json").read_text(encoding="utf-8"))
    assert state["trainer"]["loop"]["step"] == 20
    assert set(state["trainer"]["fingerprints"]) == {"data", "config"}


def _cfg(base, data, out, **kw) -> TrainConfig:
    options = dict(
        base=str(base),
        dataset=str(data),
        output_dir=str(out),
        quant="none",
        precision="fp32",
        batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        save_steps=SAVE,
        logging_steps=1,
        eval_steps=1000,
        learning_rate=5e-3,
        seed=7,
        lora_dropout=0.1,
    )
    return TrainConfig(**{**options, **kw})


def test_resume_with_other_data_or_config_is_refused(reference, tiny_gpt2, tmp_path):
    from conftest import preference_rows, write_jsonl

    data, ref_out = reference
    with pytest.raises(UserError, match="config differ"):
        train(_cfg(tiny_gpt2, data, ref_out, learning_rate=1e-3, resume="latest"), log=lambda *_: None)
    other = write_jsonl(tmp_path / "other.jsonl", preference_rows(40)[::-1])
    with pytest.raises(UserError, match="data differ"):
        train(_cfg(tiny_gpt2, other, ref_out, resume="latest"), log=lambda *_: None)
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(_cfg(tiny_gpt2, data, tmp_path / "empty", resume="latest"), log=lambda *_: None)


def test_resume_of_a_finished_run_says_so_and_exits_0(reference, tiny_gpt2, capsys):
    from lora_rm.cli import main

    data, ref_out = reference  # 24 steps, the last checkpoint at step 20
    metrics, weights = (ref_out / "metrics.jsonl").read_bytes(), _weights(ref_out)
    assert main(["train", *_cmd(tiny_gpt2, data, ref_out)[2:], "--resume"]) == 0
    assert "this run already finished" in capsys.readouterr().out
    assert (ref_out / "metrics.jsonl").read_bytes() == metrics  # steps 21-24 not redone
    assert all(torch.equal(weights[k], v) for k, v in _weights(ref_out).items())


@pytest.mark.integration
def test_resume_of_a_finished_run_without_checkpoints_says_so(tiny_gpt2, prefs_file, tmp_path):
    import dataclasses

    from lora_rm.training.inputs import RunFinished

    cfg = _cfg(tiny_gpt2, prefs_file, tmp_path / "run", max_steps=2)  # shorter than --save-steps
    train(cfg, log=lambda *_: None)
    assert not complete_checkpoints(tmp_path / "run")
    with pytest.raises(RunFinished, match="this run already finished"):
        train(dataclasses.replace(cfg, resume="latest"), log=lambda *_: None)


def test_rng_state_round_trips_without_pickle():
    tensors, py = rng_state()
    json.dumps(py)  # plain JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    expected = (torch.rand(3), random.random())
    torch.rand(5), random.random()
    restore_rng_state(tensors, py)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


@pytest.mark.integration
def test_a_nan_step_is_skipped_and_counted(monkeypatch, tiny_gpt2, prefs_file, tmp_path):
    import lora_rm.training.loop as fit_module

    real, calls = fit_module.batch_losses, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(fit_module, "batch_losses", sometimes_nan)
    result = train(_cfg(tiny_gpt2, prefs_file, tmp_path / "run", max_steps=6), log=lambda *_: None)
    records = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 1, 1, 1, 1, 1]
    assert result.steps == 6
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())


@pytest.mark.integration
def test_repeated_nan_stops_with_a_checkpoint(monkeypatch, tiny_gpt2, prefs_file, tmp_path):
    import lora_rm.training.loop as fit_module

    monkeypatch.setattr(
        fit_module, "batch_losses", lambda _kind, r_c, r_r, *a, **k: (r_c - r_r) * float("nan")
    )
    with pytest.raises(TrainingStopped, match="non-finite") as stopped:
        train(_cfg(tiny_gpt2, prefs_file, tmp_path / "run", max_bad_steps=3), log=lambda *_: None)
    assert stopped.value.exit_code == 3
    assert complete_checkpoints(tmp_path / "run")[-1].name == "step-000003"


@pytest.mark.integration
def test_out_of_memory_halves_micro_batches_with_the_same_result(
    monkeypatch, tiny_gpt2, prefs_file, tmp_path
):
    import lora_rm.training.loop as fit_module

    reference = train(
        _cfg(tiny_gpt2, prefs_file, tmp_path / "ref", max_steps=4, lora_dropout=0.0), log=lambda *_: None
    )
    real = fit_module.backward_window

    def small_memory(model, batches, *args, **kwargs):
        batches = list(batches)
        if any(b.num_pairs > 1 for b in batches):
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(fit_module, "backward_window", small_memory)
    result = train(
        _cfg(tiny_gpt2, prefs_file, tmp_path / "oom", max_steps=4, lora_dropout=0.0), log=lambda *_: None
    )
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "oom")
    for name in ref:
        torch.testing.assert_close(
            got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert result.steps == reference.steps == 4


def test_no_unsafe_deserialization_in_the_package():
    for path in (ROOT / "lora_rm").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}: {line.strip()}"
            assert "trust_remote_code=True" not in line, f"{path.name}: {line.strip()}"
            assert "import pickle" not in line and "pickle.load" not in line, f"{path.name}: {line.strip()}"


def test_rename_retries_while_windows_holds_the_folder(tmp_path, monkeypatch):
    import os

    from lora_rm.util import atomic

    src, dst = tmp_path / "step-1.partial", tmp_path / "step-1"
    src.mkdir()
    real, calls = os.replace, []

    def busy_twice(a, b):
        calls.append(a)
        if len(calls) <= 2:
            raise PermissionError("being scanned")
        real(a, b)

    monkeypatch.setattr(atomic.os, "replace", busy_twice)
    monkeypatch.setattr(atomic.time, "sleep", lambda _s: None)
    atomic.rename_with_retry(src, dst)
    assert len(calls) == 3 and dst.is_dir() and not src.exists()

    (tmp_path / "other.partial").mkdir()
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError("locked")))
    with pytest.raises(PermissionError, match="locked"):
        atomic.rename_with_retry(tmp_path / "other.partial", tmp_path / "other", attempts=3)
