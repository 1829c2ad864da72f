"""Small inputs that would exhaust memory or never finish are refused with one clear line (`lora_rm.util.bounds`):
a YAML alias bomb, a data file that inflates to gigabytes, a huge sparse file, epoch and step counts no run
finishes, and batch sizes that are not positive integers."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import cli_runner
import pytest
from cli_runner import ROOT, Case
from conftest import PROMPTS, ROW, integration, preference_rows, write_jsonl

from lora_rm.args import read_config_file
from lora_rm.config import TrainConfig
from lora_rm.data.read import load_rows
from lora_rm.errors import UserError
from lora_rm.util import bounds

LORA_RM = Path(sys.executable).with_name("lora-rm")
if not LORA_RM.is_file():
    LORA_RM = ROOT / "lora_rm" / "cli.py"

# nine levels of nine aliases: 9**9 = 387 million strings once expanded
ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi")
)


def test_yaml_aliases_are_refused_unexpanded(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB.replace("i: &i", "target_modules: &i"), encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_config_file(path)
    assert str(e.value) == (
        f"{path}:2: YAML aliases (*a) are not supported in config files; write the value out"
    )


def test_a_yaml_anchor_without_alias_still_reads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("lora_r: &r 8\nepochs: 2\n", encoding="utf-8")
    assert read_config_file(path) == {"lora_r": 8, "epochs": 2}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_deeply_nested_config_is_refused(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    with pytest.raises(UserError, match=f"deep{suffix}: not valid (JSON|YAML): nested too deeply"):
        read_config_file(path)


def test_a_huge_config_file_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.truncate(bounds.MAX_CONFIG_BYTES + 1)
    with pytest.raises(UserError, match="config file larger than 1 MiB"):
        read_config_file(path)


@pytest.mark.parametrize("opener", [gzip.open, "bz2", "xz"])
def test_decompression_stops_at_the_limit(tmp_path, monkeypatch, opener):
    import bz2
    import lzma

    opener = {"bz2": bz2.open, "xz": lzma.open}.get(opener, opener)
    suffix = {gzip.open: ".gz", bz2.open: ".bz2", lzma.open: ".xz"}[opener]
    path = tmp_path / f"bomb.jsonl{suffix}"
    with opener(path, "wb") as f:
        for _ in range(8):  # 8 MiB of spaces in a few KiB
            f.write(b" " * 2**20)
    assert path.stat().st_size < 2**16
    monkeypatch.setattr(bounds, "MAX_TEXT_BYTES", 2**20)
    with pytest.raises(UserError) as e:
        load_rows(str(path))
    assert str(e.value) == (
        f"{path}: data file larger than 1 MiB, the most lora_rm reads into memory; convert it to Parquet or a "
        "save_to_disk folder (read memory-mapped) (decompressed)"
    )
    monkeypatch.setattr(bounds, "MAX_TEXT_BYTES", 2**30)
    monkeypatch.setattr(bounds, "RATIO_FLOOR", 2**21)
    with pytest.raises(UserError) as e:
        load_rows(str(path))
    assert str(e.value).startswith(f"{path}: inflates to over 100 times its ")
    assert "(stopped at 3,145,728): a compression bomb; if it is real data, decompress it" in str(e.value)


def test_a_huge_sparse_file_is_refused_at_once(tmp_path):
    import time

    path = tmp_path / "sparse.jsonl"
    with path.open("wb") as f:
        f.truncate(2 * 10**9)
    started = time.perf_counter()
    with pytest.raises(UserError, match="sparse.jsonl: data file larger than 1024 MiB"):
        load_rows(str(path))
    assert time.perf_counter() - started < 1.0  # from its size: not a byte read


def test_compressed_data_under_the_limit_reads(tmp_path):
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in preference_rows(3)))
    assert len(load_rows(str(path))[0]) == 3


def test_a_damaged_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "prefs.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"prefs.jsonl.gz: not a valid gzip file \(BadGzipFile"):
        load_rows(str(path))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"epochs": 1_000_000_000},
            "epochs: 1000000000 is more than 10,000 passes over the data; use --max-steps",
        ),
        ({"max_steps": 10**9}, "max_steps: 1000000000 is more than 1,000,000 optimizer steps, past any run"),
    ],
)
def test_counts_no_run_finishes_are_refused(options, expected):
    with pytest.raises(UserError, match=expected):
        TrainConfig(base="gpt2", dataset="d.jsonl", **options)


def test_planned_steps_over_the_cap_are_refused():
    bounds.check_total_steps(bounds.MAX_STEPS, 10)
    with pytest.raises(UserError, match="epochs: 10 epochs are 1,000,001 optimizer steps"):
        bounds.check_total_steps(bounds.MAX_STEPS + 1, 10)


@pytest.mark.parametrize("size", [-1, 0, 2.0, "4", True, None])
def test_batch_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        bounds.check_batch_size(size)


def test_library_calls_refuse_a_bad_batch_size(trained_run, tmp_path):
    import lora_rm
    from lora_rm.evaluation.reward_model import RewardModel

    rm = RewardModel.from_pretrained(trained_run.adapter_dir, device="cpu")
    calls = {
        "score": lambda: rm.score([PROMPTS[0]], [" sure"], batch_size=-1),
        "score_texts": lambda: rm.score_texts([PROMPTS[0] + " sure"], batch_size=0),
        "evaluate": lambda: rm.evaluate(str(tmp_path / "none.jsonl"), tmp_path / "eval", batch_size=-2),
        "reward_function": lambda: lora_rm.reward_function(rm, batch_size=-4),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="batch_size must be a positive integer") as e:
            call()
        assert "\n" not in str(e.value), name
    assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
@integration
def runs(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds-cli")
    (tmp / "bomb.yaml").write_text(ALIAS_BOMB, encoding="utf-8")
    sparse = tmp / "sparse.jsonl"
    with sparse.open("wb") as f:
        f.truncate(2 * 10**9)  # 2 GB that take no disk
    prefs = write_jsonl(tmp / "prefs.jsonl", [ROW] * 4)
    base, out = ["--base", str(tiny_gpt2)], str(tmp / "out")
    cases = {
        "alias_bomb": ["train", "--config", str(tmp / "bomb.yaml")],
        "sparse_train": ["train", *base, "--dataset", str(sparse), "--output-dir", out, "--quant", "none"],
        "sparse_score": ["score", "--model", str(tmp / "model"), "--input", str(sparse), "--output", str(tmp / "s.jsonl")],
        "epochs": ["train", *base, "--dataset", str(prefs), "--output-dir", out, "--epochs", "1000000000"],
    }  # fmt: skip
    runs = cli_runner.start({name: Case(LORA_RM, argv) for name, argv in cases.items()}, tmp)
    yield runs, tmp
    runs.stop()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("alias_bomb", "bomb.yaml:2: YAML aliases (*a) are not supported in config files"),
        ("sparse_train", "sparse.jsonl: data file larger than 1024 MiB"),
        ("sparse_score", "sparse.jsonl: data file larger than 1024 MiB"),
        ("epochs", "epochs: 1000000000 is more than 10,000 passes over the data; use --max-steps"),
    ],
)
def test_cli_refuses_with_one_line(runs, name, expected):
    runs, tmp = runs
    r = runs.result(name)
    assert r.code == 2 and "Traceback" not in r.err, f"exit {r.code}\n{r.err}"
    assert expected in r.err and "lol" not in r.err and len(r.err) < 1000, r.err
    assert (tmp / "sparse.jsonl").stat().st_size == 2 * 10**9 and not (tmp / "out").exists()
