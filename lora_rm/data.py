"""Read preference rows from a local file or the hub, recognise their format, and check every row.

Three formats are accepted, one per dataset:
- explicit: `prompt`, `chosen`, `rejected` texts (the seed notebook's format);
- implicit: `chosen`, `rejected` full texts sharing a prefix (Anthropic HH);
- conversational: `chosen`, `rejected` (and optionally `prompt`) as lists of {role, content} messages;
- ranking: `prompt` text and `responses`, a list of two or more distinct texts, best first.
An optional numeric `margin` column asks for r_chosen - r_rejected >= margin.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_rm.errors import UserError, problems_message

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant", "tool"}
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
# C0 controls but tab, LF, CR (NUL has its own message), DEL and C1 controls but NEL (U+0085), which
# Unicode counts as a line break. In preference text they are mostly leftovers: terminal escapes,
# form feeds, or cp1252 text decoded as Latin-1.
CONTROL = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]")
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Row:
    """One preference row and where it came from (`file:line` or `dataset[split]:row N`)."""

    where: str
    fields: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # 'field: reason' found while parsing (duplicate keys)


def load_rows(source: str, split: str = "train", revision: str | None = None) -> tuple[list[Row], list[Row]]:
    """Read `source` (a local .jsonl/.json/.csv/.parquet file, a dataset folder or a hub id).

    Returns (rows of `split`, rows of the dataset's own test or validation split, empty if none).
    Raises UserError for a missing file, an unreadable or malformed file (every bad line listed),
    an unknown dataset or split, and an unreachable hub.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() or (suffix in LOCAL_SUFFIXES and not path.is_dir()):  # a folder is a dataset folder
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        if suffix in (".jsonl", ".json") or suffix not in LOCAL_SUFFIXES:
            return _read_json_rows(path), []
        if suffix == ".csv":
            lines = _csv_record_lines(_read_text(path))
            # only an empty cell is missing: pandas would also read "NA", "None" or "null" answers as null
            ds = _load_hf("csv", str(path), None, keep_default_na=False, na_values=[""])["train"]
            return [Row(f"{path}:{lines[i]}", dict(r)) for i, r in enumerate(ds)], []
        ds = _load_hf(LOCAL_SUFFIXES[suffix], str(path), None)["train"]
        return [Row(f"{path}:row {i + 1}", dict(r)) for i, r in enumerate(ds)], []
    splits = _load_hf(source, None, revision)
    if split not in splits:
        raise UserError(f"{source}: has no split {split!r}; it has {', '.join(splits)}")
    held_out = next((s for s in ("test", "validation", "eval") if s in splits and s != split), None)

    def rows_of(name: str) -> list[Row]:
        return [Row(f"{source}[{name}]:row {i + 1}", dict(r)) for i, r in enumerate(splits[name])]

    return rows_of(split), rows_of(held_out) if held_out else []


def _read_text(path: Path) -> str:
    """The file's text; UserError if it cannot be read, is not UTF-8 (with the line) or is empty."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 BOM is harmless: accept it
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    return text


def _show_key(key: str) -> str:
    return key if key and key.isprintable() and key.strip() == key else repr(key)


def _parse_json(text: str) -> tuple[Any, list[tuple[tuple[str | int, ...], str]]]:
    """json.loads, plus every duplicate object key (json.loads keeps its last value) as (path, key):
    the path of dict keys and list indices from the top to the object that repeats `key`.

    Raises ValueError for invalid JSON, including nesting too deep to parse.
    """
    dups: dict[int, list[str]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                dups.setdefault(id(obj), []).append(key)
            obj[key] = value
        return obj

    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    found: list[tuple[tuple[str | int, ...], str]] = []
    todo: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())] if dups else []
    while todo:  # no recursion: the parser accepts nesting deeper than a recursive walk would
        obj, at = todo.pop()
        if isinstance(obj, dict):
            found.extend((at, key) for key in dict.fromkeys(dups.get(id(obj), ())))
            todo.extend((v, (*at, k)) for k, v in reversed(obj.items()))
        elif isinstance(obj, list):
            todo.extend((v, (*at, i)) for i, v in reversed(list(enumerate(obj))))
    return value, found


def _duplicate_key_problem(at: tuple[str | int, ...], key: str) -> str:
    """'field: reason' for a duplicate `key` in the object at path `at` inside one row."""
    if not at:
        return f"{_show_key(key)}: duplicate key"
    inner = "".join(f"[{p}]" if isinstance(p, int) else f"[{p!r}]" for p in at[1:])
    return f"{_show_key(str(at[0]))}: duplicate key {key!r} in {at[0]}{inner}"


def _read_json_rows(path: Path) -> list[Row]:
    text = _read_text(path)
    if text.lstrip().startswith("["):  # a JSON array of objects rather than JSON Lines
        try:
            items, dups = _parse_json(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of objects or one JSON object per line")
        per_item: dict[Any, list[str]] = {}
        for at, key in dups:
            per_item.setdefault(at[0], []).append(_duplicate_key_problem(at[1:], key))
        rows, problems = [], []
        for i, item in enumerate(items, 1):
            if isinstance(item, dict):
                rows.append(Row(f"{path}:item {i}", item, per_item.get(i - 1, [])))
            else:
                problems.append(f"{path}:item {i}: expected a JSON object, got {type(item).__name__}")
        if problems:
            raise UserError(problems_message(f"{path}: {len(problems)} item(s) are not objects:", problems))
        return rows
    rows, problems = [], []
    # split on "\n" only: str.splitlines() also breaks at U+2028 or \x85 inside a JSON string
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            item, dups = _parse_json(line)
        except ValueError as e:
            problems.append(f"{path}:{lineno}: not valid JSON: {e}")
            continue
        if not isinstance(item, dict):
            problems.append(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            continue
        rows.append(Row(f"{path}:{lineno}", item, [_duplicate_key_problem(at, key) for at, key in dups]))
    if problems:
        raise UserError(problems_message(f"{path}: {len(problems)} malformed line(s):", problems))
    return rows


def _csv_record_lines(text: str) -> list[int]:
    """The line each CSV record of `text` starts on (records can span lines inside quotes)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader, None)  # header
    starts, end = [], reader.line_num
    for record in reader:
        if record:
            starts.append(end + 1)
        end = reader.line_num
    return starts


def _load_hf(name: str, data_files: str | None, revision: str | None, **kwargs: Any) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, data_files=data_files, revision=revision, **kwargs)
    except FileNotFoundError as e:
        if data_files is None and Path(name).is_dir():
            raise UserError(
                f"{name}: a folder with no data files in it; pass a .jsonl/.json/.csv/.parquet file "
                "or a folder of them"
            ) from None
        raise UserError(
            f"{name}: not a local file or folder, and not found on the Hugging Face Hub ({e})"
        ) from None
    except (ConnectionError, TimeoutError) as e:
        raise UserError(_unreachable(name, type(e).__name__)) from None
    except Exception as e:  # datasets and huggingface_hub wrap failures in many exception types
        kind = type(e).__name__
        if "NotFound" in kind or "Repository" in kind:
            raise UserError(f"{name}: dataset not found (not a local path, not on the hub)") from None
        if any(k in kind for k in ("Offline", "Connection", "Timeout", "HTTP")):
            raise UserError(_unreachable(name, kind)) from None
        raise UserError(f"{name}: cannot load dataset ({kind}: {e})") from None


def _unreachable(name: str, kind: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return (
            f"{name}: not a local file or folder, and the hub is off (HF_HUB_OFFLINE=1) with no cached copy"
        )
    return (
        f"{name}: cannot reach the Hugging Face Hub to fetch it ({kind}). Pass a local "
        ".jsonl/.json/.csv/.parquet file or model folder, or set HF_HUB_OFFLINE=1 to use a cached copy."
    )


def detect_format(rows: list[Row], source: str) -> str:
    """Return 'explicit', 'implicit', 'conversational' or 'ranking' from the columns; UserError if
    chosen/rejected (or prompt/responses) are missing."""
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
    if any(isinstance(r.fields.get("chosen"), list) for r in rows[:100]):
        return "conversational"
    return "explicit" if "prompt" in columns else "implicit"


def _text_problem(value: Any) -> str | None:
    if value is None:
        return "missing or null"
    if not isinstance(value, str):
        return f"expected text, got {type(value).__name__}"
    if not value.translate(ZERO_WIDTH).strip():
        return "empty or whitespace-only text"
    if "\x00" in value:
        return "contains a NUL character"
    control = CONTROL.search(value)
    if control:
        return f"contains control character U+{ord(control.group()):04X}"
    if SURROGATE.search(value):
        return "contains a lone surrogate (broken UTF-16)"
    return None


def _messages_problem(value: Any) -> str | None:
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
        problem = _text_problem(m["content"])
        if problem:
            return f"message {i}: content {problem}"
    return None


def _short_repr(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _margin_problem(margin: Any) -> str | None:
    """None (no margin, 0) and finite numbers are fine; bools, strings, NaN and infinities are not."""
    if margin is None:
        return None
    try:
        ok = not isinstance(margin, bool) and isinstance(margin, (int, float)) and math.isfinite(margin)
    except OverflowError:  # an integer too large for a float
        ok = False
    return None if ok else f"expected a finite number, got {_short_repr(margin)}"


MIXED_PROMPT = {  # the prompt's shape differs from chosen's and rejected's, by the dataset's format
    "explicit": "a message list, but chosen and rejected are text; give all three as text, or all three as "
    "lists of {role, content} messages",
    "conversational": "text, but chosen and rejected are message lists; give all three as lists of "
    "{role, content} messages, or all three as text",
}


def _ranking_problems(f: dict[str, Any]) -> list[str]:
    """'field: reason' for the prompt and the ranked responses of one row."""
    out = [f"prompt: {p}" for p in [_text_problem(f.get("prompt"))] if p]
    responses = f.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"{len(responses)}" if isinstance(responses, list) else _short_repr(responses)
        return [*out, f"responses: expected a list of at least 2 texts, best first, got {got}"]
    seen: dict[str, int] = {}
    for k, r in enumerate(responses):
        problem = _text_problem(r)
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
                MIXED_PROMPT[fmt] if name == "prompt" and isinstance(value, list) else _text_problem(value)
            )
            if problem:
                out.append(f"{name}: {problem}")
        return out
    prompt = f.get("prompt")
    if isinstance(prompt, str):
        out.append(f"prompt: {MIXED_PROMPT[fmt]}")
    elif prompt is not None and _messages_problem(prompt):
        out.append(f"prompt: {_messages_problem(prompt)}")
    turns = {}
    for name in ("chosen", "rejected"):
        problem = _messages_problem(f.get(name))
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


def split_rows(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out a seeded random `eval_fraction` of rows (at least one when the fraction is > 0)."""
    if eval_fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise UserError(f"eval_fraction {eval_fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
