"""Check preference rows before they are encoded: recognise a dataset's format (explicit, implicit,
conversational or ranking; see `detect_format`) from its columns, then find every problem of every row (missing,
non-text, empty or control-character text, malformed chat messages, a chosen identical to its rejected, a bad
margin, duplicate keys met while reading) as `where: field: reason`, and either raise them all as one UserError
or, with --skip-invalid, drop those rows and count them. Scoring applies the same text and message checks to
its prompts and responses (`read_score_rows`: the rows of `lora-rm score`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lora_rm.data.read import Row, load_rows
from lora_rm.errors import UserError, problems_message

ROLES = {"system", "user", "assistant", "tool"}
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# C0 controls but tab, LF, CR (NUL has its own message), DEL and C1 controls but NEL (U+0085), which
# Unicode counts as a line break. In preference text they are mostly leftovers: terminal escapes,
# form feeds, or cp1252 text decoded as Latin-1.
CONTROL = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]")
SURROGATE = re.compile("[\ud800-\udfff]")


def detect_format(rows: list[Row], source: str) -> str:
    """The dataset's format, from the columns of its first 100 rows:
    - 'explicit': `prompt`, `chosen`, `rejected` texts;
    - 'implicit': `chosen`, `rejected` full texts sharing a prefix (Anthropic HH);
    - 'conversational': `chosen`, `rejected` (and optionally `prompt`) as lists of {role, content} messages;
    - 'ranking': `prompt` text and `responses`, a list of two or more distinct texts, best first.
    Any of them may add a numeric `margin` column, which asks for r_chosen - r_rejected >= margin.

    Raises UserError when there are no rows, or chosen/rejected (or prompt/responses) are missing.
    """
    if not rows:
        raise UserError(f"{source}: no rows")
    columns = set().union(*(r.fields.keys() for r in rows[:100]))
    if "responses" in columns and "chosen" not in columns:
        if "prompt" not in columns:
            raise UserError(f"{source}: ranked lists (a responses column) need a prompt column too")
        return "ranking"
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(sorted(columns)) or 'none'}. "
            "Expected prompt/chosen/rejected, chosen/rejected, or chat-message lists."
        )
    # the majority decides: one odd row is then reported as that row's problem, not every other row's
    lists = sum(isinstance(r.fields.get("chosen"), list) for r in rows[:100])
    if lists > sum(isinstance(r.fields.get("chosen"), str) for r in rows[:100]):
        return "conversational"
    return "explicit" if "prompt" in columns else "implicit"


def text_problem(value: Any, controls: bool = False) -> str | None:
    """Why `value` is not usable text (null, not a string, blank, NUL, control character, lone surrogate),
    or None when it is. `controls=True` accepts control characters other than NUL (a policy sampling bytes
    can write them, and the tokenizer encodes them: `lora-rm serve` scores such text)."""
    if value is None:
        return "missing or null"
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    if not value.translate(ZERO_WIDTH).strip():
        return "empty or whitespace-only text"
    if "\x00" in value:
        return "contains a NUL character"
    control = None if controls else CONTROL.search(value)
    if control:
        return f"contains control character U+{ord(control.group()):04X}"
    if SURROGATE.search(value):
        return "contains a lone surrogate (broken UTF-16)"
    return None


def messages_problem(value: Any, controls: bool = False) -> str | None:
    """Why `value` is not a usable non-empty list of {role, content} messages (the first bad message named),
    or None when it is; `controls` as in `text_problem`."""
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"message {i}: expected an object with role and content, got {type(m).__name__}"
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            return f"message {i}: missing {' and '.join(missing)}"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return f"message {i}: unknown role {_short_repr(m['role'])} (expected one of {', '.join(sorted(ROLES))})"
        problem = text_problem(m["content"], controls)
        if problem:
            return f"message {i}: content {problem}"
    return None


def _short_repr(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


MAX_MARGIN = 1e6  # rewards are float32: far larger margins overflow the loss, and no reward scale needs them


def _margin_problem(margin: Any) -> str | None:
    """None (no margin, 0) and finite numbers up to MAX_MARGIN in size are fine; bools, strings, NaN,
    infinities and margins that would overflow the float32 loss are not."""
    if margin is None:
        return None
    try:
        ok = not isinstance(margin, bool) and isinstance(margin, (int, float)) and math.isfinite(margin)
    except OverflowError:  # an integer too large for a float
        ok = False
    if ok and abs(margin) > MAX_MARGIN:
        return f"expected a number in [-{MAX_MARGIN:g}, {MAX_MARGIN:g}], got {_short_repr(margin)}"
    return None if ok else f"expected a finite number, got {_short_repr(margin)}"


MIXED_PROMPT = {  # the prompt's shape differs from chosen's and rejected's, by the dataset's format
    "explicit": "a message list, but chosen and rejected are text; give all three as text, or all three as "
    "lists of {role, content} messages",
    "conversational": "text, but chosen and rejected are message lists; give all three as lists of "
    "{role, content} messages, or all three as text",
}


def _ranking_problems(f: dict[str, Any]) -> list[str]:
    """'field: reason' for the prompt and the ranked responses of one row."""
    out = [f"prompt: {p}" for p in [text_problem(f.get("prompt"))] if p]
    responses = f.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"{len(responses)}" if isinstance(responses, list) else _short_repr(responses)
        return [*out, f"responses: expected a list of at least 2 texts, best first, got {got}"]
    seen: dict[str, int] = {}
    for k, r in enumerate(responses):
        problem = text_problem(r)
        if problem:
            out.append(f"responses[{k}]: {problem}")
        elif r in seen:
            out.append(f"responses[{k}]: identical to responses[{seen[r]}]")
        else:
            seen[r] = k
    return out


def _field_problems(f: dict[str, Any], fmt: str) -> list[str]:
    """'field: reason' for the prompt, chosen and rejected (or ranked responses) of one row."""
    if fmt == "ranking":
        return _ranking_problems(f)
    out = []
    if fmt != "conversational":
        for name in ("prompt", "chosen", "rejected") if fmt == "explicit" else ("chosen", "rejected"):
            value = f.get(name)
            problem = (
                MIXED_PROMPT[fmt] if name == "prompt" and isinstance(value, list) else text_problem(value)
            )
            if problem:
                out.append(f"{name}: {problem}")
        return out
    prompt = f.get("prompt")
    if isinstance(prompt, str):
        out.append(f"prompt: {MIXED_PROMPT[fmt]}")
    elif prompt is not None and (problem := messages_problem(prompt)):
        out.append(f"prompt: {problem}")
    turns = {}
    for name in ("chosen", "rejected"):
        problem = messages_problem(f.get(name))
        if problem:
            out.append(f"{name}: {problem}")
        elif f[name][-1]["role"] != "assistant":
            out.append(f"{name}: last message must be the assistant's")
        else:
            turns[name] = f[name][:-1]
    if prompt is None and len(turns) == 2 and turns["chosen"] != turns["rejected"]:
        # without a prompt column, the turns before the final answer are the prompt: one per row
        out.append("rejected: prompt turns differ from chosen's")
    return out


def row_problems(row: Row, fmt: str) -> list[str]:
    """Every problem of one row as 'where: field: reason' (empty when the row is usable)."""
    f = row.fields
    out = list(row.problems)
    fields = _field_problems(f, fmt)
    if not fields and fmt != "ranking" and f["chosen"] == f["rejected"]:
        fields.append("rejected: identical to chosen")
    out += fields
    margin = _margin_problem(f.get("margin"))
    if margin:
        out.append(f"margin: {margin}")
    return [f"{row.where}: {p}" for p in out]


def check_rows(
    rows: list[Row], fmt: str, source: str, skip_invalid: bool = False, log: Any = print
) -> list[Row]:
    """Return the usable rows. Bad rows raise one UserError listing every problem (first 20 shown, with
    counts per reason), or with `skip_invalid` are dropped and counted in the log."""
    problems = {r.where: row_problems(r, fmt) for r in rows}
    bad = [p for ps in problems.values() for p in ps]
    if not bad:
        return rows
    reasons = Counter(p[len(where) + 2 :] for where, ps in problems.items() for p in ps)
    counts = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
    if not skip_invalid:
        header = f"{source}: {len(bad)} problem(s) in {sum(map(bool, problems.values()))} row(s) [{counts}]:"
        raise UserError(problems_message(header, bad) + "\n(--skip-invalid skips such rows instead)")
    kept = [r for r in rows if not problems[r.where]]
    log(f"data: skipped {len(rows) - len(kept)} invalid row(s) of {source} [{counts}]")
    if not kept:
        raise UserError(f"{source}: every row is invalid [{counts}]")
    return kept


def read_score_rows(path: str | Path) -> list[Row]:
    """Rows with a `prompt` (text, or a message list) and a `response` (text) from a local file.

    Raises UserError listing every bad row as `file:line: field: reason` (first 20 shown).
    """
    rows = load_rows(str(path))[0]
    problems = []
    for row in rows:
        prompt = row.fields.get("prompt")
        checks = [
            ("prompt", messages_problem(prompt) if isinstance(prompt, list) else text_problem(prompt)),
            ("response", text_problem(row.fields.get("response"))),
        ]
        problems += [f"{row.where}: {p}" for p in row.problems]
        problems += [f"{row.where}: {name}: {problem}" for name, problem in checks if problem]
    if problems:
        raise UserError(
            problems_message(f"{path}: {len(problems)} problem(s); nothing was scored:", problems)
        )
    return rows
