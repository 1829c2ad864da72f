"""Checkpoint manifests: a damaged newest checkpoint is reported and the next intact one resumed from, or the
run exits 2 naming what is damaged; never a traceback, never a silent resume from changed weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runner import run_training, train_command
from conftest import preference_rows, write_jsonl

from lora_rm.training.checkpoint import MARKER, damage, write_manifest


def _checkpoint(folder: Path, weights: bytes) -> Path:
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (folder / "state.json").write_text("{}", encoding="utf-8")
    write_manifest(folder)
    (folder / MARKER).write_text("1", encoding="utf-8")
    return folder


def test_damage_names_the_file_and_what_is_wrong(tmp_path):
    a = _checkpoint(tmp_path / "step-000001", b"weights of step 1")
    b = _checkpoint(tmp_path / "step-000002", b"weights of step 2")
    assert damage(a) is None
    shutil.copy(a / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors")
    assert damage(b) == "adapter/adapter_model.safetensors does not match its checksum " + (
        "(changed or corrupted since it was written)"
    )
    (a / "state.json").write_text("", encoding="utf-8")
    assert damage(a) == "state.json has 0 bytes, 2 were written (truncated or replaced)"
    (a / "state.json").unlink()
    assert damage(a) == "state.json is missing"
    (a / MARKER).unlink()
    assert damage(a).startswith("no COMPLETE marker")


def _cmd(base, data, out, *extra):
    return train_command(
        base,
        data,
        out,
        *extra,
        max_steps=6,
        save_steps=2,
        save_total_limit=3,
        logging_steps=1,
        eval_steps=1000,
    )


@pytest.mark.integration
def test_resume_skips_a_damaged_checkpoint_and_refuses_when_all_are(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    out = tmp_path / "run"
    assert run_training(_cmd(tiny_gpt2, data, out)).returncode == 0
    newest = out / "step-000006" / "adapter" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short, as by a full disk or a copy
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 7, "lo')  # a kill mid-write

    resumed = run_training(_cmd(tiny_gpt2, data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint step-000006: adapter/adapter_model.safetensors has 100 bytes" in (
        resumed.stdout + resumed.stderr
    )
    assert f"resumed from {out / 'step-000004'} at step 4" in resumed.stdout + resumed.stderr
    assert damage(out / "step-000006") is None  # written again by the resumed run
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 6]  # the last: the final eval

    (out / "step-000002" / "rng.safetensors").unlink()
    opt = out / "step-000004" / "optimizer.pt"
    opt.write_bytes(bytes(opt.stat().st_size))  # zeroed, same size
    (out / "step-000006" / "state.json").write_text("{}", encoding="utf-8")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    refused = run_training(_cmd(tiny_gpt2, data, out, "--resume"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    for text in (
        "every checkpoint is damaged",
        "step-000006: state.json has 2 bytes",
        "step-000004: optimizer.pt does not match its checksum",
        "step-000002: rng.safetensors is missing",
    ):
        assert text in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    named = run_training(_cmd(tiny_gpt2, data, out, "--resume", str(out / "step-000004")))
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert (
        f"{out / 'step-000004'}: damaged checkpoint: optimizer.pt does not match its checksum" in named.stderr
    )
