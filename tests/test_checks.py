"""Recognising a dataset's format and rejecting bad rows with a message naming the file, row and field."""

from __future__ import annotations

import json

import pytest
from conftest import ROW, jsonl_with, load_checked, user_error, write_lines

from lora_rm.data.checks import check_rows, detect_format, row_problems
from lora_rm.data.read import Row
from lora_rm.errors import UserError

# ---------------------------------------------------------------- missing columns


def test_missing_columns_lists_the_present_ones(tmp_path):
    path = jsonl_with(tmp_path, {"question": "how ?", "answer": "sure", "score": 1})
    msg = user_error(path)
    assert str(path) in msg
    assert "missing column(s) chosen, rejected" in msg
    assert "found answer, question, score" in msg


def test_one_missing_column(tmp_path):
    path = jsonl_with(tmp_path, {"prompt": "how ?", "chosen": "sure", "reject": "no"})
    msg = user_error(path)
    assert "missing column(s) rejected;" in msg
    assert "found chosen, prompt, reject" in msg


# ---------------------------------------------------------------- row errors


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing or null"),
        (42, "expected text, got int"),
        (1.5, "expected text, got float"),
        (True, "expected text, got bool"),
        ({"text": "sure"}, "expected text, got dict"),
        ("", "empty or whitespace-only text"),
        ("   \n\t ", "empty or whitespace-only text"),
        ("\u200b\u200d\ufeff", "empty or whitespace-only text"),
        (" \u200b \u2060 ", "empty or whitespace-only text"),
        ("sure\x00first", "contains a NUL character"),
        ("sure\x07first", "contains control character U+0007"),
        ("sure\x1b[31mfirst", "contains control character U+001B"),
        ("page\x0cbreak", "contains control character U+000C"),
        ("del\x7f", "contains control character U+007F"),
        ("\x93quoted\x94", "contains control character U+0093"),
        ("sure \ud800 first", "contains a lone surrogate (broken UTF-16)"),
        ("\udfff", "contains a lone surrogate (broken UTF-16)"),
    ],
)
def test_bad_text_field_is_located(tmp_path, value, reason):
    path = jsonl_with(tmp_path, ROW, {**ROW, "chosen": value})
    msg = user_error(path)
    assert f"{path}:2: chosen: {reason}" in msg
    assert f"{path}:1:" not in msg


@pytest.mark.parametrize(
    "text", ["tab\there", "two\nlines", "crlf\r\nend", "next\x85line", "emoji 🍚 \u2028"]
)
def test_allowed_whitespace_and_line_breaks(tmp_path, text):
    path = jsonl_with(tmp_path, {**ROW, "chosen": text})
    assert load_checked(path)[0][0].fields["chosen"] == text


def test_missing_field_in_a_later_row(tmp_path):
    row = dict(ROW)
    del row["prompt"]
    path = jsonl_with(tmp_path, ROW, row)
    assert f"{path}:2: prompt: missing or null" in user_error(path)


def test_bad_prompt_and_rejected_are_located(tmp_path):
    path = jsonl_with(tmp_path, {**ROW, "prompt": ["how ?"]}, {**ROW, "rejected": ""})
    msg = user_error(path)
    assert f"{path}: 2 problem(s)" in msg
    assert f"{path}:1: prompt: a message list, but chosen and rejected are text" in msg
    assert f"{path}:2: rejected: empty or whitespace-only text" in msg


def test_chosen_equal_to_rejected(tmp_path):
    path = jsonl_with(tmp_path, ROW, {**ROW, "rejected": ROW["chosen"]})
    assert f"{path}:2: rejected: identical to chosen" in user_error(path)


def test_every_bad_row_is_listed(tmp_path):
    rows = [ROW, {**ROW, "chosen": None}, ROW, {**ROW, "rejected": 3}, {**ROW, "margin": "x"}]
    path = jsonl_with(tmp_path, *rows)
    msg = user_error(path)
    assert msg.startswith(f"{path}: 3 problem(s) in 3 row(s)")
    assert f"{path}:2: chosen: missing or null" in msg
    assert f"{path}:4: rejected: expected text, got int" in msg
    assert f"{path}:5: margin: expected a finite number, got 'x'" in msg
    assert f"{path}:1:" not in msg and f"{path}:3:" not in msg


def _rows_for_skipping():
    return [
        Row("f:1", dict(ROW)),
        Row("f:2", {**ROW, "chosen": None}),
        Row("f:3", {**ROW, "chosen": "", "rejected": 3}),
        Row("f:4", dict(ROW)),
    ]


def test_check_rows_counts_problems_per_reason():
    with pytest.raises(UserError) as e:
        check_rows(_rows_for_skipping(), "explicit", "f")
    msg = str(e.value)
    assert msg.startswith("f: 3 problem(s) in 2 row(s) [")
    assert "1 x chosen: missing or null" in msg
    assert "1 x rejected: expected text, got int" in msg
    assert "f:3: chosen: empty or whitespace-only text" in msg
    assert "--skip-invalid" in msg


def test_check_rows_skip_invalid_keeps_good_rows_and_logs():
    logged = []
    kept = check_rows(_rows_for_skipping(), "explicit", "f", skip_invalid=True, log=logged.append)
    assert [r.where for r in kept] == ["f:1", "f:4"]
    assert len(logged) == 1
    assert logged[0].startswith("data: skipped 2 invalid row(s) of f [")


def test_check_rows_good_rows_returned_unchanged():
    rows = [Row("f:1", dict(ROW)), Row("f:2", {**ROW, "chosen": "good"})]
    assert check_rows(rows, "explicit", "f") == rows


def test_check_rows_skip_invalid_with_nothing_left():
    with pytest.raises(UserError, match="f: every row is invalid"):
        check_rows(_rows_for_skipping()[1:3], "explicit", "f", skip_invalid=True, log=lambda *_: None)


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('"margin": "abc"', "'abc'"),
        ('"margin": NaN', "nan"),
        ('"margin": Infinity', "inf"),
        ('"margin": -Infinity', "-inf"),
        ('"margin": true', "True"),
        ('"margin": [1]', "[1]"),
        ('"margin": "0.5"', "'0.5'"),
        ('"margin": 1' + "0" * 400, "1000000000000000000000000000000000000..."),
        ('"margin": {"value": 1}', "{'value': 1}"),
    ],
)
def test_bad_margin(tmp_path, line, shown):
    path = write_lines(
        tmp_path / "margin.jsonl",
        [json.dumps(ROW), '{"chosen": "sure", "rejected": "no", "prompt": "how ?", ' + line + "}"],
    )
    msg = user_error(path)
    assert f"{path}:2: margin: expected a finite number, got {shown}" in msg


@pytest.mark.parametrize("margin", [0, 1, 0.5, -2.25, None])
def test_good_margin(tmp_path, margin):
    path = jsonl_with(tmp_path, {**ROW, "margin": margin})
    rows, _ = load_checked(path)
    assert rows[0].fields["margin"] == margin


# ---------------------------------------------------------------- conversational rows

USER = {"role": "user", "content": "how do i cook rice ?"}
GOOD = {"role": "assistant", "content": "sure first"}
BAD = {"role": "assistant", "content": "whatever"}


def conv(**fields):
    return {"chosen": [USER, GOOD], "rejected": [USER, BAD], **fields}


def test_conversational_rows_are_accepted(tmp_path):
    path = jsonl_with(
        tmp_path,
        conv(),
        {"prompt": [{"role": "system", "content": "be nice"}, USER], "chosen": [GOOD], "rejected": [BAD]},
    )
    rows, fmt = load_checked(path)
    assert fmt == "conversational"
    assert len(rows) == 2


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (conv(chosen=[]), "chosen: expected a non-empty list of {role, content} messages"),
        (conv(rejected="whatever"), "rejected: expected a non-empty list of {role, content} messages"),
        (
            conv(chosen=[{"role": "robot", "content": "beep"}, GOOD]),
            "chosen: message 0: unknown role 'robot'",
        ),
        (conv(chosen=[USER, {"role": "assistant"}]), "chosen: message 1: missing content"),
        (conv(rejected=[{"content": "hi"}, BAD]), "rejected: message 0: missing role"),
        (conv(chosen=[USER, {"text": "sure"}]), "chosen: message 1: missing role and content"),
        (
            conv(chosen=[USER, "sure first"]),
            "chosen: message 1: expected an object with role and content, got str",
        ),
        (
            conv(chosen=[USER, {"role": "assistant", "content": "sure\x1b[0m"}]),
            "chosen: message 1: content contains control character U+001B",
        ),
        (
            conv(chosen=[USER, {"role": "assistant", "content": " "}]),
            "chosen: message 1: content empty or whitespace-only text",
        ),
        (
            conv(rejected=[USER, {"role": "assistant", "content": None}]),
            "rejected: message 1: content missing or null",
        ),
        (conv(chosen=[GOOD, USER]), "chosen: last message must be the assistant's"),
        (conv(rejected=[USER]), "rejected: last message must be the assistant's"),
        (conv(prompt=[]), "prompt: expected a non-empty list of {role, content} messages"),
        (conv(prompt=[{"role": "narrator", "content": "x"}]), "prompt: message 0: unknown role 'narrator'"),
        (conv(rejected=[USER, GOOD]), "rejected: identical to chosen"),
        (
            conv(rejected=[{"role": "user", "content": "how do i fix bike ?"}, BAD]),
            "rejected: prompt turns differ from chosen's",
        ),
        (
            conv(rejected=[{"role": "system", "content": "be brief"}, USER, BAD]),
            "rejected: prompt turns differ from chosen's",
        ),
        (
            conv(prompt="how do i cook rice ?"),
            "prompt: text, but chosen and rejected are message lists",
        ),
    ],
)
def test_bad_conversational_rows(tmp_path, fields, expected):
    path = jsonl_with(tmp_path, conv(), fields)
    msg = user_error(path)
    assert f"{path}:2: {expected}" in msg
    assert f"{path}:1:" not in msg


def test_conversational_with_prompt_column_may_differ_in_earlier_turns(tmp_path):
    # with a prompt column, chosen and rejected are whole multi-turn responses: they may differ anywhere
    ask = {"role": "user", "content": "more ?"}
    path = jsonl_with(tmp_path, {"prompt": [USER], "chosen": [GOOD, ask, GOOD], "rejected": [BAD, ask, BAD]})
    rows, fmt = load_checked(path)
    assert fmt == "conversational" and len(rows) == 1


def test_conversational_null_prompt_is_no_prompt(tmp_path):
    path = jsonl_with(
        tmp_path, conv(prompt=None), conv(prompt=None, rejected=[USER, {**BAD, "content": "no"}])
    )
    assert len(load_checked(path)[0]) == 2


def test_unhashable_role_is_a_row_problem(tmp_path):
    path = jsonl_with(tmp_path, conv(chosen=[{"role": ["user"], "content": "hi"}, GOOD]))
    assert f"{path}:1: chosen: message 0: unknown role" in user_error(path)


# ---------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    ("fields", "fmt"),
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
        ({"chosen": "p a", "rejected": "p b"}, "implicit"),
        ({"chosen": "p a", "rejected": "p b", "margin": 1.0}, "implicit"),
        ({"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "conversational"),
        ({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "conversational"),
    ],
)
def test_detect_format(fields, fmt):
    assert detect_format([Row("x:1", fields)], "x") == fmt


def test_detect_format_needs_rows():
    with pytest.raises(UserError, match="src: no rows"):
        detect_format([], "src")


def test_detect_format_missing_columns_no_columns():
    with pytest.raises(UserError, match="missing column\\(s\\) chosen, rejected; found none"):
        detect_format([Row("x:1", {})], "x")


def test_row_problems_of_a_good_row_is_empty():
    assert row_problems(Row("x:1", dict(ROW)), "explicit") == []


def test_one_odd_row_does_not_flip_the_format_of_the_others(tmp_path):
    from conftest import preference_rows, write_jsonl

    rows = preference_rows(36)
    rows[5]["chosen"] = [{"role": "assistant", "content": "sure"}]
    message = user_error(write_jsonl(tmp_path / "data.jsonl", rows))
    assert (
        "1 problem(s) in 1 row(s)" in message
        and f"{tmp_path / 'data.jsonl'}:6: chosen: expected text" in message
    )


def test_a_margin_that_would_overflow_the_loss_is_refused():
    assert row_problems(Row("x:1", {**ROW, "margin": 1e39}), "explicit") == [
        "x:1: margin: expected a number in [-1e+06, 1e+06], got 1e+39"
    ]


def test_a_header_only_or_ragged_csv_is_reported_with_its_line(tmp_path):
    header_only = write_lines(tmp_path / "h.csv", ["prompt,chosen,rejected"])
    assert user_error(header_only) == f"{header_only}: only a header line (prompt, chosen, rejected), no rows"
    ragged = write_lines(tmp_path / "r.csv", ["prompt,chosen,rejected", "q,a,b", "q,a,b,extra"])
    assert f"{ragged}:3: expected 3 fields (as the header), got 4" in user_error(ragged)


def test_one_bad_margin_cell_in_a_csv_is_the_only_row_flagged(tmp_path):
    lines = ["prompt,chosen,rejected,margin"] + [f"q{i},sure first,whatever,0.5" for i in range(6)]
    lines[3] = "q2,sure first,whatever,lots"
    message = user_error(write_lines(tmp_path / "m.csv", lines))
    assert (
        "1 problem(s) in 1 row(s)" in message
        and f"{tmp_path / 'm.csv'}:4: margin: expected a finite number" in message
    )
