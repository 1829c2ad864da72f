"""Read preference rows from a local file or the hub, recognise their format, and check every row.

Three formats are accepted, one per dataset:
- explicit: `prompt`, `chosen`, `rejected` texts (the seed notebook's format);
- implicit: `chosen`, `rejected` full texts sharing a prefix (Anthropic HH);
- conversational: `chosen`, `rejected` (and optionally `prompt`) as lists of {role, content} messages.
An optional numeric `margin` column asks for r_chosen - r_rejected >= margin.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_rm.errors import UserError, problems_message

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant", "tool"}
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


@dataclass
class Row:
    """One preference row and where it came from (`file:line` or `dataset[split]:row N`)."""

    where: str
    fields: dict[str, Any]


def load_rows(source: str, split: str = "train", revision: str | None = None) -> tuple[list[Row], list[Row]]:
    """Read `source` (a local .jsonl/.json/.csv/.parquet file, a dataset folder or a hub id).

    Returns (rows of `split`, rows of the dataset's own test or validation split, empty if none).
    Raises UserError for a missing file, an unreadable or malformed file (every bad line listed),
    an unknown dataset or split, and an unreachable hub.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in LOCAL_SUFFIXES or path.is_file():
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        if suffix in (".jsonl", ".json") or suffix not in LOCAL_SUFFIXES:
            return _read_json_rows(path), []
        if suffix == ".csv":
            # only an empty cell is missing: pandas would also read "NA", "None" or "null" answers as null
            ds = _load_hf("csv", str(path), None, keep_default_na=False, na_values=[""])["train"]
            lines = _csv_record_lines(path)
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


def _read_json_rows(path: Path) -> list[Row]:
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
    if text.lstrip().startswith("["):  # a JSON array of objects rather than JSON Lines
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of objects or one JSON object per line")
        rows, problems = [], []
        for i, item in enumerate(items, 1):
            if isinstance(item, dict):
                rows.append(Row(f"{path}:item {i}", item))
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
            item = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{lineno}: not valid JSON: {e}")
            continue
        if not isinstance(item, dict):
            problems.append(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            continue
        rows.append(Row(f"{path}:{lineno}", item))
    if problems:
        raise UserError(problems_message(f"{path}: {len(problems)} malformed line(s):", problems))
    return rows


def _csv_record_lines(path: Path) -> list[int]:
    """The line each CSV record starts on (records can span lines inside quotes)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
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
    """Return 'explicit', 'implicit' or 'conversational' from the columns; UserError if chosen/rejected are missing."""
    if not rows:
        raise UserError(f"{source}: no rows")
    columns = set().union(*(r.fields.keys() for r in rows[:100]))
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
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "contains a lone surrogate (broken UTF-16)"
    return None


def _messages_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i}: expected an object with role and content"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return f"message {i}: unknown role {m['role']!r}"
        problem = _text_problem(m["content"])
        if problem:
            return f"message {i}: content {problem}"
    return None


def row_problems(row: Row, fmt: str) -> list[str]:
    """Every problem of one row as 'where: field: reason' (empty when the row is usable)."""
    f, out = row.fields, []
    check = _messages_problem if fmt == "conversational" else _text_problem
    names = ("prompt", "chosen", "rejected") if fmt == "explicit" else ("chosen", "rejected")
    for name in names:
        problem = check(f.get(name))
        if problem:
            out.append(f"{row.where}: {name}: {problem}")
    if fmt == "conversational":
        if f.get("prompt") is not None and _messages_problem(f["prompt"]):
            out.append(f"{row.where}: prompt: {_messages_problem(f['prompt'])}")
        for name in ("chosen", "rejected"):
            if not _messages_problem(f.get(name)) and f[name][-1]["role"] != "assistant":
                out.append(f"{row.where}: {name}: last message must be the assistant's")
    if not out and f["chosen"] == f["rejected"]:
        out.append(f"{row.where}: rejected: identical to chosen")
    margin = f.get("margin")
    if margin is not None and (
        isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin)
    ):
        out.append(f"{row.where}: margin: expected a finite number, got {margin!r}")
    return out


def check_rows(
    rows: list[Row], fmt: str, source: str, skip_invalid: bool = False, log: Any = print
) -> list[Row]:
    """Return the usable rows. Bad rows raise one UserError listing every problem (first 20 shown, with
    counts per reason), or with `skip_invalid` are dropped and counted in the log."""
    problems = {r.where: row_problems(r, fmt) for r in rows}
    bad = [p for ps in problems.values() for p in ps]
    if not bad:
        return rows
    reasons = Counter(p.split(": ", 1)[1] for p in bad)
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
