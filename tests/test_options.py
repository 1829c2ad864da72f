"""Every option value checked before anything is written, through the real command line: an invalid value
(out of range, NaN, infinite, or more than this model or device can run) ends the run with exit 2 and a
message naming the option and its valid range, no traceback, and no --output-dir created."""

from __future__ import annotations

import cli_runner
import pytest
from cli_runner import SCRIPT, Case
from conftest import integration, preference_rows, write_jsonl

CASES = {  # name: (flags, expected in stderr)
    "learning_rate_nan": (["--learning-rate", "nan"], "learning_rate: must be a finite number, got nan"),
    "learning_rate_inf": (["--learning-rate", "inf"], "learning_rate: must be a finite number, got inf"),
    "learning_rate_huge": (["--learning-rate", "1e39"], "learning_rate: must be in (0, 1], got 1e+39"),
    "learning_rate_negative": (["--learning-rate=-1e-4"], "learning_rate: must be in (0, 1]"),
    "weight_decay_negative": (["--weight-decay", "-1"], "weight_decay: must be >= 0, got -1.0"),
    "max_grad_norm_negative": (
        ["--max-grad-norm", "-1"],
        "max_grad_norm: must be >= 0 (0 disables clipping)",
    ),
    "warmup_ratio_nan": (["--warmup-ratio", "nan"], "warmup_ratio: must be a finite number, got nan"),
    "seed_negative": (["--seed", "-1"], "seed: must be in [0, 2**32), got -1"),
    "seed_too_large": (["--seed", str(2**40)], f"seed: must be in [0, 2**32), got {2**40}"),
    "max_length_beyond_positions": (["--max-length", "1000"], "max_length: must be in [4, 64]"),
    "quant_4bit_on_cpu": (
        ["--quant", "4bit"],
        "quant: 4bit on CPU needs a hidden size that is a multiple of 64",
    ),
}


@pytest.fixture(scope="module")
@integration
def runs(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("options")
    data = write_jsonl(tmp / "prefs.jsonl", preference_rows(8))
    overflow = write_jsonl(tmp / "overflow.jsonl", [{**r, "margin": 1e39} for r in preference_rows(8)])
    base = ["--base", str(tiny_gpt2), "--precision", "fp32", "--max-steps", "1"]
    cases = {
        name: Case(
            SCRIPT,
            [*base, "--quant", "none", "--dataset", str(data), "--output-dir", str(tmp / name), *flags],
        )
        for name, (flags, _) in CASES.items()
    }  # --quant 4bit given later overrides --quant none
    cases["margin_overflow"] = Case(
        SCRIPT, [*base, "--quant", "none", "--dataset", str(overflow), "--output-dir", str(tmp / "margin")]
    )
    runs = cli_runner.start(cases, tmp, preload=cli_runner.TRAINING_MODULES)
    yield runs
    runs.stop()


@pytest.mark.parametrize("name", [*CASES, "margin_overflow"])
def test_invalid_value_is_refused_before_anything_is_written(runs, name):
    expected = CASES[name][1] if name in CASES else "margin: expected a number in [-1e+06, 1e+06], got 1e+39"
    r = runs.result(name)
    assert r.code == 2 and "Traceback" not in r.err, f"exit {r.code}\n{r.err[-3000:]}"
    assert expected in r.err, r.err
    case = runs.cases[name]
    assert not (case.output_dir or runs.tmp / name).exists() and not (runs.tmp / name).exists()
