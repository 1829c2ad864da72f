"""lora_rm.util.quiet: the expected third-party noise is dropped, anything else still gets through."""

from __future__ import annotations

import logging
import warnings

import pytest

from lora_rm.util.quiet import expected_load_report, quiet_third_party

HEAD_ONLY = """GPT2ForSequenceClassification LOAD REPORT from: gpt2
Key          | Status  |
-------------+---------+-
score.weight | MISSING |

Notes:
- MISSING:	those params were newly initialized because missing from the checkpoint."""


def test_load_report_of_the_new_head_is_expected():
    assert expected_load_report(HEAD_ONLY)
    bert = HEAD_ONLY.replace(
        "score.weight | MISSING |", "classifier.weight | MISSING |\ncls.predictions.bias | UNEXPECTED |"
    )
    assert expected_load_report(bert)
    assert not expected_load_report(HEAD_ONLY.replace("score.weight", "transformer.h.0.attn.c_attn.weight"))
    assert not expected_load_report(HEAD_ONLY.replace("MISSING |", "MISMATCH |"))
    assert not expected_load_report("some other warning")


def test_expected_noise_is_dropped_and_the_rest_kept():
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter per logger
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    seen_logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen_logs.append(record.getMessage())
    tokenization = logging.getLogger("transformers.tokenization_utils_base")
    loggers = [bnb, logging.getLogger("transformers.modeling_utils"), tokenization]
    for logger in loggers:  # transformers' loggers do not propagate to the root logger
        logger.addHandler(handler)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no module")
        bnb.warning("CUDA is broken")
        loggers[1].warning(HEAD_ONLY)
        loggers[1].warning(HEAD_ONLY.replace("score.weight", "wte.weight"))
        tokenization.warning(
            "Token indices sequence length is longer than the specified maximum sequence length for this model "
            "(623 > 512). Running this sequence through the model will result in indexing errors"
        )
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen_logs == ["CUDA is broken", HEAD_ONLY.replace("score.weight", "wte.weight")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party()  # catch_warnings reset the filters
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=2,
        )
        warnings.warn(
            "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it.",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn("something unexpected", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in seen] == ["something unexpected"]


def test_a_coloured_load_report_is_expected_too():
    # what transformers writes when stdout is a terminal
    coloured = HEAD_ONLY.replace("MISSING |", "\x1b[31mMISSING\x1b[0m |").replace(
        "GPT2ForSequenceClassification LOAD REPORT", "\x1b[1mGPT2ForSequenceClassification LOAD REPORT\x1b[0m"
    )
    assert expected_load_report(coloured)
    assert not expected_load_report(coloured.replace("score.weight", "wte.weight"))


def test_the_python_api_is_quiet_by_default_and_can_be_turned_off(monkeypatch):
    import lora_rm.util.quiet as quiet

    logger = logging.getLogger("transformers.modeling_utils")
    monkeypatch.setattr(quiet, "_shown", False)
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    quiet.show_third_party()
    assert not any(isinstance(f, quiet._DropExpectedLoadReport) for f in logger.filters)
    quiet.quiet_by_default()  # turned off: installs nothing
    assert not any(isinstance(f, quiet._DropExpectedLoadReport) for f in logger.filters)
    monkeypatch.setattr(quiet, "_shown", False)
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    quiet.quiet_by_default()
    assert not any(isinstance(f, quiet._DropExpectedLoadReport) for f in logger.filters)
    monkeypatch.delenv(quiet.VERBOSE_ENV)
    quiet.quiet_by_default()
    assert any(isinstance(f, quiet._DropExpectedLoadReport) for f in logger.filters)


def test_the_api_entry_points_apply_the_quiet_default():
    import inspect

    from lora_rm.evaluation.reward_model import RewardModel
    from lora_rm.training.loop import train

    for entry in (train, RewardModel.from_pretrained):
        assert "quiet_by_default()" in inspect.getsource(entry), entry


# ---------------------------------------------------------------- in a real terminal


def run_in_terminal(argv: list[str], env: dict[str, str], width: int = 80, timeout: float = 240) -> str:
    """What `argv` writes to a pseudo-terminal of `width` columns (stdout and stderr both), as raw text."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, width, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    raw, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    proc.wait(timeout=max(1, deadline - time.time()))
    os.close(master)
    return raw.decode("utf-8", errors="replace")


def render(raw: str, width: int = 80) -> list[str]:
    """The screen lines a terminal shows for `raw`: carriage returns, line feeds, cursor-up, wrapping at
    `width`; colour codes dropped."""
    import re

    screen: dict[int, dict[int, str]] = {}
    row = col = i = 0
    while i < len(raw):
        code = re.match(r"\x1b\[(\d*)([A-Za-z])", raw[i:])
        if code:
            if code[2] == "A":
                row = max(0, row - int(code[1] or 1))
            i += len(code[0])
            continue
        char = raw[i]
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
        else:
            if col >= width:
                row, col = row + 1, 0
            screen.setdefault(row, {})[col] = char
            col += 1
        i += 1
    return [
        "".join(line.get(c, " ") for c in range(max(line, default=-1) + 1)).rstrip()
        for _, line in sorted(screen.items())
    ]


@pytest.mark.integration
def test_training_in_a_terminal_shows_no_load_report_and_whole_eval_lines(tiny_gpt2, tmp_path):
    from cli_runner import train_command, train_env
    from conftest import preference_rows, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    cmd = train_command(
        tiny_gpt2, data, tmp_path / "run", max_steps=4, eval_steps=2, eval_fraction="0.25",
        gradient_accumulation_steps=1,
    )  # fmt: skip
    raw = run_in_terminal(cmd, train_env())
    assert "done in" in raw, raw[-3000:]
    assert "MISSING" not in raw and "LOAD REPORT" not in raw, raw[:3000]
    screen = render(raw)
    assert any(line.startswith("eval @ step 2: loss") for line in screen), "\n".join(screen)
    assert not any("val @ step" in line and "eval @ step" not in line for line in screen), "\n".join(screen)
