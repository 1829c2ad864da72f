"""Run command-line cases as real processes, fast: shared by test_cli.py and test_validation.py; and the
command, environment and runner for a tiny training run as a plain subprocess, shared by test_checkpoint.py
and test_distributed.py.

Each case runs a script (e.g. `scripts/train_lora.py`) as `__main__` in a process of its own, and the
test reads that process's exit status and the bytes it wrote to file descriptors 1 and 2. Importing
torch and transformers costs about 4 s of CPU per process, so to keep the suite fast on two cores:

- cases named in `exec_names` are a plain `python script ...` subprocess, the exact command a user types;
- the others are forked from one subprocess that has done those imports once (the script file itself
  still runs in each fork, from its first line). Set LORA_RM_TEST_CLI_EXEC=1 to run every case as a
  plain subprocess instead; platforms without fork always do.

All processes start together in `start()`; `Runs.result(name)` waits for that case's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "train_lora.py"
TIMEOUT = 240
EXEC_ALL = os.environ.get("LORA_RM_TEST_CLI_EXEC") == "1" or not hasattr(os, "fork")

# Imports what the scripts import (and the modules in argv[2]), then forks one child per case. A child points fds 1 and 2 at its own
# files and runs its script as __main__; an uncaught exception prints its traceback as the interpreter
# would. The parent prints {case: exit status} as JSON.
FORK_RUNNER = r"""
import importlib, json, os, runpy, sys, traceback
cases = json.loads(sys.argv[1])
import lora_rm.cli, accelerate  # what every case imports, once (transformers imports lazily)
from transformers import AutoConfig, AutoTokenizer
for module in json.loads(sys.argv[2]):
    importlib.import_module(module)
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

    def stop(self) -> None:
        """Kill whatever is still running (a test that failed before reading every result)."""
        for proc in [self.forked, *(c.proc for c in self.cases.values())]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


# What a run that trains imports beyond a run rejected during validation: ~5 s of CPU per process
TRAINING_MODULES = (
    "lora_rm.training.loop",
    "peft",
    "transformers.models.auto.modeling_auto",
    "transformers.models.gpt2.modeling_gpt2",
)


def start(
    cases: dict[str, Case], tmp: Path, exec_names: Iterable[str] = (), preload: Iterable[str] = ()
) -> Runs:
    """Start every case at once: those in `exec_names` (or all, with EXEC_ALL) as plain subprocesses,
    the rest forked from one runner that first imports `preload` (e.g. TRAINING_MODULES when some cases
    train). Each forked case writes `tmp/<name>.out` and `tmp/<name>.err`."""
    exec_names = set(exec_names)
    forked = {}
    for name, case in cases.items():
        if EXEC_ALL or name in exec_names:
            case.proc = popen([sys.executable, str(case.script), *case.argv])
        else:
            forked[name] = [str(case.script), case.argv, str(tmp / f"{name}.out"), str(tmp / f"{name}.err")]
    runner = (
        popen([sys.executable, "-c", FORK_RUNNER, json.dumps(forked), json.dumps(list(preload))])
        if forked
        else None
    )
    return Runs(cases, runner, tmp)


def train_env() -> dict[str, str]:
    """cli_env() with one thread per process: torchrun starts several."""
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def train_command(base, dataset, output_dir, *extra: str, processes: int = 1, **flags) -> list[str]:
    """`python scripts/train_lora.py ...` (with `processes` > 1: under torchrun) for a tiny run on CPU:
    no quantization, fp32, batches of 2; then each of `flags` as `--flag-name value`, in the order given;
    then `extra` as written."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    argv = ["--base", str(base), "--dataset", str(dataset), "--output-dir", str(output_dir)]
    for name, value in {"quant": "none", "precision": "fp32", "batch_size": 2, **flags}.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return [*launcher, str(SCRIPT), *argv, *extra]


def run_training(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root to its end (at most 300 s), its output captured as text."""
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
