"""Read preference rows from a local .jsonl/.json/.csv/.parquet file, a dataset folder or the Hugging Face Hub,
and hold out an eval split. Each row is a `Row` that remembers where it came from (`file:line`, `file:item N`,
`dataset[split]:row N`) and the duplicate keys met while parsing it; a missing, unreadable, non-UTF-8 or
malformed file, or an unknown dataset or split, is one UserError naming the file and every bad line. What the
rows hold is checked in `lora_rm.checks`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_rm.errors import UserError, problems_message

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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
            from lora_rm.checks import check_csv_records, csv_margins

            text = _read_text(path)
            check_csv_records(text, path)  # a header-only or ragged file: told with its line
            lines = _csv_record_lines(text)
            # only an empty cell is missing: pandas would also read "NA", "None" or "null" answers as null
            ds = _load_hf("csv", str(path), None, keep_default_na=False, na_values=[""])["train"]
            return csv_margins([Row(f"{path}:{lines[i]}", dict(r)) for i, r in enumerate(ds)]), []
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
