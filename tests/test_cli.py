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
from conftest import preference_rows, write_jsonl

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
    assert "usage: lora-rm {train,score,compare,eval,plan}" in capsys.readouterr().err
