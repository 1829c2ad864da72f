"""Bad input through the real command line: exit code 2, a located `error:` line, no traceback, no output.

Each case runs `scripts/train_lora.py` in a process of its own (see cli_runner.py: one case is a plain
subprocess, the exact command a user types; the others are forked from one process that imported torch
and transformers once). tests/test_validation.py covers every kind of bad data the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cli_runner
import pytest
from cli_runner import ROOT, SCRIPT, Case
from conftest import integration, preference_rows, write_jsonl

EXEC_CASE = "missing_dataset_file"  # always run as a plain subprocess


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (flags, substrings the error must contain)."""
    good = write_jsonl(tmp / "good.jsonl", preference_rows(8))

    missing_columns = write_jsonl(tmp / "columns.jsonl", [{"question": "how ?", "answer": "sure"}] * 3)

    rows = preference_rows(4)
    rows[2]["chosen"] = "   "
    empty_field = write_jsonl(tmp / "empty.jsonl", rows)

    rows = preference_rows(4)
    rows[3]["rejected"] = 7
    non_string = write_jsonl(tmp / "number.jsonl", rows)

    lines = [json.dumps(r) for r in preference_rows(5)]
    lines[1] = '{"prompt": "how ?", "chosen": "sure"'
    lines[4] = "not json at all"
    malformed = tmp / "malformed.jsonl"
    malformed.write_text("\n".join(lines) + "\n", encoding="utf-8")

    nope = tmp / "nope.jsonl"
    return {
        "missing_dataset_file": ([f"--dataset={nope}"], [f"{nope}: no such file"]),
        "missing_columns": (
            [f"--dataset={missing_columns}"],
            [f"{missing_columns}: missing column(s) chosen, rejected", "found answer, question"],
        ),
        "empty_field": (
            [f"--dataset={empty_field}"],
            [f"{empty_field}:3: chosen: empty or whitespace-only text"],
        ),
        "non_string_field": (
            [f"--dataset={non_string}"],
            [f"{non_string}:4: rejected: expected text, got int"],
        ),
        "malformed_json": (
            [f"--dataset={malformed}"],
            ["2 malformed line(s)", f"{malformed}:2: not valid JSON", f"{malformed}:5: not valid JSON"],
        ),
        "unknown_local_model": (
            [f"--dataset={good}", "--base", "/nonexistent/model"],
            ["/nonexistent/model"],
        ),
        "unknown_hub_model": (
            [f"--dataset={good}", "--base", "no-such-org/no-such-model-xyz"],
            ["no-such-org/no-such-model-xyz"],
        ),
        "unknown_hub_dataset": (
            ["--dataset", "no-such-org/no-such-dataset-xyz"],
            ["no-such-org/no-such-dataset-xyz"],
        ),
    }


@pytest.fixture(scope="module")
@integration
def runs(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cases = {}
    for name, (flags, expected) in _bad_inputs(tmp).items():
        out = tmp / f"out-{name}"
        # later flags win: a case's own --base replaces the tiny model
        argv = [
            "--base",
            str(tiny_gpt2),
            "--quant",
            "none",
            "--max-steps",
            "1",
            "--output-dir",
            str(out),
            *flags,
        ]
        cases[name] = Case(SCRIPT, argv, out, expected)
    # the console script pip wrote next to this interpreter; where there is none (Windows: lora-rm.exe),
    # the module it calls, which ends in the same `raise SystemExit(main())`
    lora_rm = Path(sys.executable).with_name("lora-rm")
    if not lora_rm.is_file():
        lora_rm = ROOT / "lora_rm" / "cli.py"
    cases["lora_rm_no_args"] = Case(lora_rm, [])
    cases["lora_rm_help"] = Case(lora_rm, ["--help"])

    runs = cli_runner.start(cases, tmp, exec_names=[EXEC_CASE])
    yield runs
    runs.stop()


@pytest.mark.parametrize(
    "name",
    [
        "missing_dataset_file",
        "missing_columns",
        "empty_field",
        "non_string_field",
        "malformed_json",
        "unknown_local_model",
        "unknown_hub_model",
        "unknown_hub_dataset",
    ],
)
def test_bad_input_exits_2_without_traceback_or_output(runs, name):
    case, r = runs.cases[name], runs.result(name)
    assert "Traceback" not in r.err, r.err
    assert r.code == 2, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "error:" in r.err
    for text in case.expected:
        assert text in r.err, f"{text!r} not in stderr:\n{r.err}"
    assert not case.output_dir.exists(), f"{case.output_dir} was created"


def test_lora_rm_without_arguments_exits_2(runs):
    r = runs.result("lora_rm_no_args")
    assert r.code == 2
    assert "usage: lora-rm" in r.err
    assert "Traceback" not in r.err


def test_lora_rm_help_exits_0(runs):
    r = runs.result("lora_rm_help")
    assert r.code == 0
    assert "usage: lora-rm" in r.out + r.err
    assert "Traceback" not in r.err


# The same entry point in this process: cases whose difference from the ones above is only the message.


def _main(capsys, *argv: str) -> tuple[int, str]:
    from lora_rm.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_main_invalid_config_lists_all_problems(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _main(
        capsys, "train", "--base", "b", "--dataset", "d.jsonl", "--lora-r", "0", "--batch-size", "-1",
        "--output-dir", str(out),
    )  # fmt: skip
    assert code == 2
    assert err.startswith("error: Invalid configuration:")
    assert "lora_r: must be > 0, got 0" in err
    assert "batch_size: must be > 0, got -1" in err
    assert not out.exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_main_bad_eval_dataset(tiny_gpt2, tmp_path, capsys, precision):
    good = write_jsonl(tmp_path / "good.jsonl", preference_rows(8))
    bad = write_jsonl(tmp_path / "eval.jsonl", [{**preference_rows(1)[0], "rejected": None}])
    out = tmp_path / "out"
    code, err = _main(
        capsys, "train", "--base", str(tiny_gpt2), "--quant", "none", "--max-steps", "1",
        "--precision", precision, "--dataset", str(good), "--eval-dataset", str(bad), "--output-dir", str(out),
    )  # fmt: skip
    assert code == 2
    assert f"{bad}:1: rejected: missing or null" in err
    assert not out.exists()


def test_main_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        _main(capsys, "train", "--lora-r", "eight")
    assert e.value.code == 2
    assert "--lora-r" in capsys.readouterr().err


def test_main_help_and_unknown_command(capsys):
    from lora_rm.cli import main

    assert main([]) == 2
    assert main(["--help"]) == 0
    assert main(["-h"]) == 0
    assert main(["fit"]) == 2
    assert "usage: lora-rm {train,score,compare,eval,plan,serve}" in capsys.readouterr().err


def test_lora_rm_help_lists_every_command(capsys):
    from lora_rm.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert any(line.split()[:1] == [name] and len(line.split()) > 3 for line in out.splitlines()), name


# ---------------------------------------------------------------- an unreachable hub: seconds, one line


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub switched on but at a closed local port: every connection is refused at once."""
    from huggingface_hub import constants

    from lora_rm.util import offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(offline, "_probed", {})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # an earlier in-process run fixed another precision


@pytest.mark.parametrize(
    "argv, asked",
    [
        (
            ["train", "--base", "no-org/no-model", "--dataset", "{good}"],
            "no-org/no-model: cannot fetch the tokenizer",
        ),
        (
            ["train", "--base", "{tiny}", "--dataset", "no-org/no-data"],
            "no-org/no-data: cannot fetch the dataset",
        ),
        (["plan", "--base", "no-org/no-model"], "no-org/no-model: cannot fetch the model config"),
        (["score", "--model", "no-org/no-rm", "--input", "{rows}", "--output", "{tmp}/s.jsonl"], "no-org/no-rm: cannot fetch the reward model"),
        (["eval", "--model", "no-org/no-rm", "--dataset", "{good}", "--output-dir", "{tmp}/e"], "no-org/no-rm: cannot fetch the reward model"),
        (["compare", "--model", "no-org/no-rm", "--prompt", "q", "a", "b"], "no-org/no-rm: cannot fetch the reward model"),
        (["serve", "--model", "no-org/no-rm", "--port", "0"], "no-org/no-rm: cannot fetch the reward model"),
    ],
)  # fmt: skip
def test_unreachable_hub_fails_fast_in_one_line(unreachable_hub, tiny_gpt2, tmp_path, capsys, argv, asked):
    import time

    from lora_rm.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", preference_rows(4))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"}])
    argv = [a.format(good=good, tiny=tiny_gpt2, rows=rows, tmp=tmp_path) for a in argv]
    if argv[0] == "train":
        argv += ["--output-dir", str(tmp_path / "out"), "--quant", "none", "--precision", "fp32"]
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2 and seconds < 10, (code, seconds, err)
    assert err.count("\n") == 1 and err.startswith(f"error: {asked}: the Hugging Face Hub is unreachable"), (
        err
    )
    assert "127.0.0.1:9" in err and "local path" in err and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "out").exists()


def test_hub_probe_is_bounded(monkeypatch):
    import socket
    import time

    from lora_rm.util import offline

    monkeypatch.setattr(offline, "PROBE_SECONDS", 0.3)

    def black_hole(*args, **kwargs):
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", black_hole)
    started = time.perf_counter()
    assert "no answer from example.org:443" in offline._probe("example.org", 443)
    assert time.perf_counter() - started < 1.5


def test_hub_offline_reads_the_variable_as_huggingface_hub_does(monkeypatch):
    from huggingface_hub import constants

    from lora_rm.util.offline import hub_offline

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for value, expected in [
        ("1", True),
        ("ON", True),
        ("yes", True),
        ("true", True),
        ("0", False),
        ("", False),
    ]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is expected, value


# ---------------------------------------------------------------- every data source, TRL flags, a quiet run


def _sources(tmp: Path) -> dict[str, Path]:
    import bz2
    import gzip

    import datasets
    import zstandard

    rows = preference_rows(8)
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    out = {
        "jsonl_gz": tmp / "prefs.jsonl.gz",
        "jsonl_zst": tmp / "prefs.jsonl.zst",
        "csv_bz2": tmp / "prefs.csv.bz2",
        "saved_dataset": tmp / "saved-dataset",
        "saved_dataset_dict": tmp / "saved-dict",
    }
    out["jsonl_gz"].write_bytes(gzip.compress(text))
    out["jsonl_zst"].write_bytes(zstandard.ZstdCompressor().compress(text))
    csv = "prompt,chosen,rejected\n" + "".join(
        f'"{r["prompt"]}","{r["chosen"]}","{r["rejected"]}"\n' for r in rows
    )
    out["csv_bz2"].write_bytes(bz2.compress(csv.encode()))
    datasets.Dataset.from_list(rows).save_to_disk(str(out["saved_dataset"]))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(out["saved_dataset_dict"]))
    return out


QUICKSTART = "quickstart"  # a plain subprocess, the command a user types


@pytest.fixture(scope="module")
@integration
def source_runs(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sources")
    common = ["--quant", "none", "--precision", "fp32", "--max-steps", "1", "--batch-size", "2"]
    cases = {
        name: Case(
            SCRIPT,
            ["--base", str(tiny_gpt2), "--dataset", str(path), "--output-dir", str(tmp / name), *common],
        )
        for name, path in _sources(tmp).items()
    }
    trl = [
        "--model_name_or_path", str(tiny_gpt2), "--dataset_name", str(write_jsonl(tmp / "p.jsonl", preference_rows(8))),
        "--output_dir", str(tmp / "trl"), "--per_device_train_batch_size", "2", "--num_train_epochs", "1",
        "--max_steps", "1", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "1",
        "--gradient_checkpointing", "--lora_target_modules", "c_attn", "--quant", "none", "--precision", "fp32",
    ]  # fmt: skip
    cases["trl_flags"] = Case(SCRIPT, trl, tmp / "trl")
    cases[QUICKSTART] = Case(
        SCRIPT,
        ["--config", str(ROOT / "examples" / "quickstart.yaml"), "--output-dir", str(tmp / "qs"),
         "--precision", "fp32", "--max-steps", "4", "--eval-steps", "2", "--save-steps", "4"],
        tmp / "qs",
    )  # fmt: skip
    runs = cli_runner.start(cases, tmp, exec_names=[QUICKSTART], preload=cli_runner.TRAINING_MODULES)
    yield runs
    runs.stop()


@pytest.mark.parametrize("name", ["jsonl_gz", "jsonl_zst", "csv_bz2", "saved_dataset", "saved_dataset_dict"])
def test_training_reads_every_data_source(source_runs, name):
    r = source_runs.result(name)
    assert r.code == 0, r.err
    assert "data: explicit format" in r.out
    assert (source_runs.tmp / name / "adapter" / "adapter_model.safetensors").is_file()


def test_training_with_trl_flag_names(source_runs):
    r = source_runs.result("trl_flags")
    assert r.code == 0, r.err
    config = json.loads((source_runs.tmp / "trl" / "config.json").read_text(encoding="utf-8"))
    assert config["batch_size"] == 2 and config["gradient_checkpointing"] is True
    assert config["target_modules"] == ["c_attn"] and config["logging_steps"] == 1


# lora_rm's own lines; a tqdm bar or an eval line may follow a bar on the same line
OWN_LINE_STARTS = ("data: ", "model: ", "layout: ", "train: ", "step ", "eval @ step", "eval: ", "saved ",
                   "final eval: ", "done in ", "precision: ", "learning rate: ", "warning: eval loss is ~ln 2", "warning: loss ")  # fmt: skip


def test_a_quickstart_prints_only_lora_rm_lines(source_runs):
    r = source_runs.result(QUICKSTART)
    assert r.code == 0, r.err
    lines = [
        part.strip() for line in (r.out + r.err).splitlines() for part in line.split("\r") if part.strip()
    ]
    foreign = [line for line in lines if not line.startswith(OWN_LINE_STARTS)]
    assert not foreign, "\n".join(foreign)
    for noise in ("Warning", "LOAD REPORT", "kernels-community", "Loading weights", "fan_in_fan_out"):
        assert noise not in r.out + r.err, noise
    assert "precision fp32" in r.out
    finals = [line for line in r.out.splitlines() if line.startswith(("eval: ", "final eval: "))]
    accuracies = {line.split("accuracy ")[1].split(" ")[0] for line in finals}
    assert len(finals) == 2 and len(accuracies) == 1, finals  # one final number, the full evaluation's
    saved = json.loads((source_runs.tmp / "qs" / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert f"{saved['accuracy']:.3f}" in accuracies
