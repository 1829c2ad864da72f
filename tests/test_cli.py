"""Bad input through the real command line: exit code 2, a located `error:` line, no traceback, no output.

Each case runs `scripts/train_lora.py` as `__main__` in a process of its own, and the test reads that
process's exit status and the bytes it wrote to file descriptor 2. Importing torch and transformers costs
about 4 s of CPU per process, so to keep the suite fast on two cores:

- one case is a plain `python scripts/train_lora.py ...` subprocess, the exact command a user types;
- the others are forked from one subprocess that has done those imports once (the script file itself
  still runs in each fork, from its first line). Set LORA_RM_TEST_CLI_EXEC=1 to run every case as a
  plain subprocess instead; platforms without fork always do.

All processes start together when the module fixture first runs; each test waits for its own result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import preference_rows, write_jsonl

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "train_lora.py"
TIMEOUT = 240
EXEC_ALL = os.environ.get("LORA_RM_TEST_CLI_EXEC") == "1" or not hasattr(os, "fork")
EXEC_CASE = "missing_dataset_file"  # always run as a plain subprocess

# Imports what the scripts import, then forks one child per case. A child points fds 1 and 2 at its own
# files and runs its script as __main__; an uncaught exception prints its traceback as the interpreter
# would. The parent prints {case: exit status} as JSON.
FORK_RUNNER = r"""
import json, os, runpy, sys, traceback
cases = json.loads(sys.argv[1])
import lora_rm.cli, accelerate  # what every case imports, once (transformers imports lazily)
from transformers import AutoConfig, AutoTokenizer
children = {}
for name, (script, argv, out_path, err_path) in cases.items():
    pid = os.fork()
    if pid:
        children[pid] = name
        continue
    code = 1
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
        sys.argv = [script, *argv]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
codes = {}
while children:
    pid, status = os.wait()
    codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


def cli_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONWARNINGS", None)
    return env


def popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Case:
    script: Path  # run as `python script argv...`
    argv: list[str]
    output_dir: Path | None = None
    expected: list[str] = field(default_factory=list)  # substrings of stderr
    proc: subprocess.Popen | None = None  # a plain subprocess, or None when forked
    result: Result | None = None


@dataclass
class Runs:
    cases: dict[str, Case]
    forked: subprocess.Popen | None
    tmp: Path

    def result(self, name: str) -> Result:
        case = self.cases[name]
        if case.result is None:
            if case.proc is not None:
                out, err = case.proc.communicate(timeout=TIMEOUT)
                case.result = Result(case.proc.returncode, out, err)
            else:
                self._collect_forked()
        return case.result

    def _collect_forked(self) -> None:
        out, err = self.forked.communicate(timeout=TIMEOUT)
        assert self.forked.returncode == 0, f"fork runner failed:\n{out}\n{err}"
        for name, code in json.loads(out.strip().splitlines()[-1]).items():
            self.cases[name].result = Result(
                code,
                (self.tmp / f"{name}.out").read_text(encoding="utf-8", errors="replace"),
                (self.tmp / f"{name}.err").read_text(encoding="utf-8", errors="replace"),
            )


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

    forked = {}
    for name, case in cases.items():
        if EXEC_ALL or name == EXEC_CASE:
            case.proc = popen([sys.executable, str(case.script), *case.argv])
        else:
            forked[name] = [str(case.script), case.argv, str(tmp / f"{name}.out"), str(tmp / f"{name}.err")]
    runner = popen([sys.executable, "-c", FORK_RUNNER, json.dumps(forked)]) if forked else None
    yield Runs(cases, runner, tmp)
    for proc in [runner, *(c.proc for c in cases.values())]:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


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


def test_main_bad_eval_dataset(tiny_gpt2, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", preference_rows(8))
    bad = write_jsonl(tmp_path / "eval.jsonl", [{**preference_rows(1)[0], "rejected": None}])
    out = tmp_path / "out"
    code, err = _main(
        capsys, "train", "--base", str(tiny_gpt2), "--quant", "none", "--max-steps", "1",
        "--dataset", str(good), "--eval-dataset", str(bad), "--output-dir", str(out),
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
    assert "usage: lora-rm {train}" in capsys.readouterr().err
