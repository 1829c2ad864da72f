"""Validation before training, through the real command line (`scripts/train_lora.py`).

Every kind of bad input must end the run with exit code 2 and one `error:` message that locates each
problem as `file:line: field: reason`, with no traceback and without creating `--output-dir`. A few
near misses (a UTF-8 BOM, a JSON array, `--skip-invalid`) must train instead.

Each case is one test. All cases start at once when the module fixture first runs, forked from one
process that imported torch and transformers once (see cli_runner.py); each test waits for its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cli_runner
import pytest
from cli_runner import SCRIPT, Case
from conftest import integration, preference_rows, write_jsonl

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads a chmod 000 file anyway


@dataclass
class Spec:
    dataset: Path
    expected: list[str]  # substrings of stderr (of stdout for a run that must succeed)
    flags: tuple[str, ...] = ()


def rows_with(line: int, **changes) -> list[dict]:
    """Eight good explicit rows; the one on `line` (1-based) updated with `changes`."""
    rows = preference_rows(8)
    rows[line - 1].update(changes)
    return rows


def raw_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_lines(n: int = 8) -> list[str]:
    return [json.dumps(r) for r in preference_rows(n)]


def field_case(line: int, field: str, value, reason: str) -> Callable[[Path], Spec]:
    """A case whose row `line` has `field` set to `value`, reported as `file:line: field: reason`."""

    def build(tmp: Path) -> Spec:
        path = write_jsonl(tmp / "data.jsonl", rows_with(line, **{field: value}))
        return Spec(path, [f"{path}:{line}: {field}: {reason}"])

    return build


USER = {"role": "user", "content": "how do i cook rice ?"}
GOOD = {"role": "assistant", "content": "sure first you should mix"}
BAD = {"role": "assistant", "content": "whatever"}


def conv_case(line: int, expected: str, **changes) -> Callable[[Path], Spec]:
    """Eight good conversational rows, the one on `line` updated; reported as `file:line: <expected>`."""

    def build(tmp: Path) -> Spec:
        rows = [{"chosen": [USER, GOOD], "rejected": [USER, BAD]} for _ in range(8)]
        rows[line - 1].update(changes)
        path = write_jsonl(tmp / "chat.jsonl", rows)
        return Spec(path, [f"{path}:{line}: {expected}"])

    return build


# ---------------------------------------------------------------- files


def missing_file(tmp: Path) -> Spec:
    path = tmp / "nope.jsonl"
    return Spec(path, [f"{path}: no such file"])


def empty_file(tmp: Path) -> Spec:
    path = tmp / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    return Spec(path, [f"{path}: file is empty"])


def unreadable_file(tmp: Path) -> Spec:
    path = write_jsonl(tmp / "secret.jsonl", preference_rows(8))
    path.chmod(0)
    return Spec(path, [f"{path}: cannot read (Permission denied)"])


def directory(tmp: Path) -> Spec:
    path = tmp / "prefs"
    path.mkdir()
    return Spec(path, [f"{path}: a folder with no data files in it"])


def invalid_utf8(tmp: Path) -> Spec:
    path = tmp / "latin1.jsonl"
    lines = [line.encode() for line in good_lines()]
    lines[2] = b'{"prompt": "caf\xe9 ?", "chosen": " sure", "rejected": " no"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    return Spec(path, [f"{path}:3: not valid UTF-8 (byte 0xe9)"])


def malformed_json(tmp: Path) -> Spec:
    lines = good_lines()
    lines[1] = '{"prompt": "how ?", "chosen": " sure"'
    lines[4] = "{'prompt': 'single quotes'}"
    lines[6] = "not json at all"
    path = raw_lines(tmp / "broken.jsonl", lines)
    return Spec(path, ["3 malformed line(s)", *(f"{path}:{n}: not valid JSON" for n in (2, 5, 7))])


def json_array_not_objects(tmp: Path) -> Spec:
    path = tmp / "array.json"
    rows = preference_rows(4)
    path.write_text(json.dumps([rows[0], ["a", "b"], rows[1], "text"], indent=2), encoding="utf-8")
    return Spec(
        path,
        [
            f"{path}:item 2: expected a JSON object, got list",
            f"{path}:item 4: expected a JSON object, got str",
        ],
    )


def missing_columns(tmp: Path) -> Spec:
    rows = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "reject": r["rejected"]} for r in preference_rows(8)
    ]
    path = write_jsonl(tmp / "columns.jsonl", rows)
    return Spec(path, [f"{path}: missing column(s) rejected; found chosen, prompt, reject"])


# ---------------------------------------------------------------- fields of a row


def duplicate_keys(tmp: Path) -> Spec:
    lines = good_lines()
    lines[3] = '{"prompt": "how ?", "chosen": " sure", "rejected": " no", "chosen": " whatever"}'
    path = raw_lines(tmp / "dups.jsonl", lines)
    return Spec(path, [f"{path}:4: chosen: duplicate key"])


def lone_surrogate(tmp: Path) -> Spec:
    lines = good_lines()
    lines[1] = '{"prompt": "how ?", "chosen": " sure \\ud800 first", "rejected": " no"}'
    path = raw_lines(tmp / "utf16.jsonl", lines)
    return Spec(path, [f"{path}:2: chosen: contains a lone surrogate (broken UTF-16)"])


def margin_case(text: str, shown: str) -> Callable[[Path], Spec]:
    def build(tmp: Path) -> Spec:
        lines = good_lines()
        lines[4] = '{"prompt": "how ?", "chosen": " sure", "rejected": " no", "margin": ' + text + "}"
        path = raw_lines(tmp / "margin.jsonl", lines)
        return Spec(path, [f"{path}:5: margin: expected a finite number, got {shown}"])

    return build


def mixed_prompt_list(tmp: Path) -> Spec:
    path = write_jsonl(tmp / "mixed.jsonl", rows_with(2, prompt=[USER]))
    return Spec(path, [f"{path}:2: prompt: a message list, but chosen and rejected are text"])


def no_chat_template(tmp: Path) -> Spec:
    rows = [{"chosen": [USER, GOOD], "rejected": [USER, BAD]} for _ in range(8)]
    path = write_jsonl(tmp / "chat.jsonl", rows)
    return Spec(
        path,
        [f"{path}:1: chosen: a list of chat messages needs a tokenizer with a chat template"],
        ("--eval-fraction", "0"),
    )


def too_long(tmp: Path) -> Spec:
    rows = [{"prompt": "how ?", "chosen": " sure", "rejected": " no"} for _ in range(8)]
    rows[3]["chosen"] = " sure first you should mix then heat then stir"
    path = write_jsonl(tmp / "long.jsonl", rows)
    return Spec(
        path,
        [f"{path}:4: chosen: 11 tokens > max_length 8", "1 sequence(s) over the length limit"],
        ("--length-policy", "error", "--max-length", "8"),
    )


FAILING: dict[str, Callable[[Path], Spec]] = {
    "missing_file": missing_file,
    "empty_file": empty_file,
    **({} if AS_ROOT else {"unreadable_file": unreadable_file}),
    "directory": directory,
    "invalid_utf8": invalid_utf8,
    "malformed_json": malformed_json,
    "json_array_not_objects": json_array_not_objects,
    "missing_columns": missing_columns,
    "null_text": field_case(3, "rejected", None, "missing or null"),
    "number_text": field_case(3, "chosen", 42, "expected text, got int"),
    "bool_text": field_case(3, "prompt", True, "expected text, got bool"),
    "dict_text": field_case(3, "chosen", {"text": "sure"}, "expected text, got dict"),
    "duplicate_keys": duplicate_keys,
    "empty_text": field_case(6, "chosen", "", "empty or whitespace-only text"),
    "whitespace_text": field_case(6, "rejected", " \t\n ", "empty or whitespace-only text"),
    "zero_width_text": field_case(6, "prompt", "\u200b\u2060\ufeff", "empty or whitespace-only text"),
    "chosen_equals_rejected": field_case(
        5, "rejected", preference_rows(8)[4]["chosen"], "identical to chosen"
    ),
    "lone_surrogate": lone_surrogate,
    "nul_character": field_case(7, "rejected", " no\x00way", "contains a NUL character"),
    "control_character": field_case(7, "chosen", " \x1b[31msure\x1b[0m", "contains control character U+001B"),
    "margin_nan": margin_case("NaN", "nan"),
    "margin_infinity": margin_case("-Infinity", "-inf"),
    "margin_string": margin_case('"0.5"', "'0.5'"),
    "margin_bool": margin_case("true", "True"),
    "conversational_empty_list": conv_case(
        2, "chosen: expected a non-empty list of {role, content} messages", chosen=[]
    ),
    "conversational_missing_role": conv_case(
        3, "rejected: message 1: missing role", rejected=[USER, {"content": "whatever"}]
    ),
    "conversational_unknown_role": conv_case(
        4, "chosen: message 0: unknown role 'robot'", chosen=[{"role": "robot", "content": "beep"}, GOOD]
    ),
    "conversational_last_turn_not_assistant": conv_case(
        5, "chosen: last message must be the assistant's", chosen=[GOOD, USER]
    ),
    "conversational_different_prompt_turns": conv_case(
        6,
        "rejected: prompt turns differ from chosen's",
        rejected=[{"role": "user", "content": "how do i fix bike ?"}, BAD],
    ),
    "conversational_text_prompt": conv_case(
        7, "prompt: text, but chosen and rejected are message lists", prompt="how do i cook rice ?"
    ),
    "conversational_list_prompt_with_text_answers": mixed_prompt_list,
    "conversational_without_chat_template": no_chat_template,
    "sequence_over_the_limit": too_long,
}


# ---------------------------------------------------------------- runs that must train


def bom_accepted(tmp: Path) -> Spec:
    path = tmp / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(good_lines()).encode() + b"\n")
    return Spec(path, ["data: explicit format"])


def json_array_accepted(tmp: Path) -> Spec:
    path = tmp / "array.json"
    path.write_text(json.dumps(preference_rows(8), indent=2), encoding="utf-8")
    return Spec(path, ["data: explicit format"])


def skip_invalid(tmp: Path) -> Spec:
    lines = good_lines()
    lines[1] = json.dumps({**preference_rows(2)[1], "chosen": None})
    lines[4] = '{"prompt": "how ?", "chosen": " sure", "rejected": " no", "rejected": " whatever"}'
    lines[6] = json.dumps({**preference_rows(7)[6], "prompt": "how \x07?"})
    path = raw_lines(tmp / "some_bad.jsonl", lines)
    return Spec(
        path,
        [
            f"data: skipped 3 invalid row(s) of {path} [",
            "1 x chosen: missing or null",
            "1 x rejected: duplicate key",
            "1 x prompt: contains control character U+0007",
        ],
        ("--skip-invalid",),
    )


PASSING: dict[str, Callable[[Path], Spec]] = {
    "bom_accepted": bom_accepted,
    "json_array_accepted": json_array_accepted,
    "skip_invalid": skip_invalid,
}


@pytest.fixture(scope="module")
@integration
def runs(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validation")
    cases = {}
    for name, build in {**FAILING, **PASSING}.items():
        folder = tmp / name
        folder.mkdir()
        spec = build(folder)
        out = folder / "out"
        argv = ["--base", str(tiny_gpt2), "--quant", "none", "--max-steps", "1", "--output-dir", str(out)]
        cases[name] = Case(SCRIPT, [*argv, "--dataset", str(spec.dataset), *spec.flags], out, spec.expected)
    runs = cli_runner.start(cases, tmp, preload=cli_runner.TRAINING_MODULES)
    yield runs
    runs.stop()


def assert_rejected(runs, name: str) -> None:
    case, r = runs.cases[name], runs.result(name)
    assert "Traceback" not in r.err, r.err
    assert r.code == 2, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert r.err.count("error:") == 1, r.err
    for text in case.expected:
        assert text in r.err, f"{text!r} not in stderr:\n{r.err}"
    assert not case.output_dir.exists(), f"{case.output_dir} was created"


def assert_trained(runs, name: str) -> str:
    case, r = runs.cases[name], runs.result(name)
    assert r.code == 0, f"exit {r.code}\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert "Traceback" not in r.err, r.err
    for text in case.expected:
        assert text in r.out, f"{text!r} not in stdout:\n{r.out}"
    assert (case.output_dir / "adapter" / "adapter_model.safetensors").is_file()
    return r.out


@pytest.mark.parametrize("name", [n for n in FAILING if n != "unreadable_file"])
def test_bad_input_is_rejected_before_training(runs, name):
    assert_rejected(runs, name)


@pytest.mark.skipif(AS_ROOT, reason="root can read a chmod 000 file (the directory case still runs)")
def test_unreadable_file_is_rejected(runs):
    assert_rejected(runs, "unreadable_file")


def test_utf8_bom_is_accepted(runs):
    assert_trained(runs, "bom_accepted")


def test_json_array_is_accepted(runs):
    assert_trained(runs, "json_array_accepted")


def test_skip_invalid_skips_and_counts_bad_rows(runs):
    out = assert_trained(runs, "skip_invalid")
    assert out.count("data: skipped") == 1
