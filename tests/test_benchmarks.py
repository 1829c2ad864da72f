"""The benchmark scripts behind docs/benchmarks.md run end to end, smoke-sized, on tiny local models and
test-made data (the figures themselves come from the full-sized commands in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import train_env
from conftest import caller_base, preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.integration
def test_the_appended_eos_reading_is_read_at_the_eos(tmp_path):
    import reading

    from lora_rm.data.sequences import fit_text, tokenize_texts
    from lora_rm.model.load import load_tokenizer

    base = caller_base(tmp_path / "base", "chat")  # pad == EOS == <|im_end|>, <unk> at id 0
    view, eos = reading.eos_base(base, tmp_path / "out")
    tokenizer = load_tokenizer(str(view))
    assert eos == "<|im_end|>" and tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0
    assert json.loads((view / "config.json").read_text(encoding="utf-8"))["pad_token_id"] == 0
    rows = write_jsonl(tmp_path / "rows.jsonl", preference_rows(2))
    marked = [json.loads(line) for line in reading.with_eos(rows, eos, tmp_path / "eos.jsonl").open()]
    assert marked[0]["prompt"] == preference_rows(1)[0]["prompt"]  # the prompt is left alone
    text = marked[0]["prompt"] + marked[0]["chosen"]
    # the reward is read at the last id that is not padding: the EOS, as pad is now distinct
    ids = fit_text(tokenize_texts(tokenizer, [text], False, 64)[0], 64, tokenizer.pad_token_id)[0]
    assert ids[-1] == tokenizer.eos_token_id
    own = load_tokenizer(str(base))  # pad == EOS: the same text's EOS is padding, never read
    assert fit_text(tokenize_texts(own, [text], False, 64)[0], 64, own.pad_token_id)[0] == ids[:-1]
    with pytest.raises(SystemExit, match="pad == EOS"):
        reading.eos_base(caller_base(tmp_path / "distinct", "distinct_pad"), tmp_path / "out2")


@pytest.mark.integration
def test_reading_benchmark_runs_smoke_sized(tmp_path):
    base = caller_base(tmp_path / "base", "chat")
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(30))
    flags = [
        "--base",
        str(base),
        "--data",
        str(data),
        "--train",
        "16",
        "--heldout",
        "8",
        "--seeds",
        "0",
        "--rest",
    ]
    flags += ["--max-length", "48", "--batch-size", "4", "--accumulation", "1", "--precision", "fp32"]
    bench = subprocess.run(
        [sys.executable, "benchmarks/reading.py", *flags, "--out", str(tmp_path / "runs")],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "| 0 | last token (this version) |" in bench.stdout and "| 0 | appended EOS |" in bench.stdout
    assert " (6) | " in bench.stdout  # the 6 pairs left over
    assert (
        "appended EOS, all held-out pairs: accuracy" in bench.stdout
        and "last token minus this:" in bench.stdout
    )


@pytest.mark.integration
def test_defaults_benchmark_runs_smoke_sized(tmp_path, tiny_bert):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(16))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", preference_rows(24)[16:])
    flags = ["--base", str(tiny_bert), "--files", str(train), str(heldout), "--seeds", "0", "--grid", "3e-3"]
    flags += [
        "--extra",
        "--quant none --precision fp32 --batch-size 4",
        "--output-dir",
        str(tmp_path / "runs"),
    ]
    bench = subprocess.run(
        [sys.executable, "benchmarks/defaults.py", *flags],
        cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stdout + bench.stderr
    table = bench.stdout[bench.stdout.index("16 train / 8 held-out") :]
    for row in (
        "| lora_rm defaults (lr 0.001) |",
        "| lora_rm --learning-rate 0.003 |",
        "| TRL RewardTrainer",
    ):
        assert row in table
