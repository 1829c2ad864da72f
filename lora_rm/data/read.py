"""Read preference rows from a local .jsonl/.json/.csv/.parquet file (JSON and CSV also as .gz/.bz2/.xz/.zst),
a `save_to_disk` folder, a folder of data files or the Hugging Face Hub (`owner/name[/data_dir][:config]`),
and hold out an eval split. Each row is a `Row` that remembers where it came from (`file:line`, `file:item N`,
`dataset[split]:row N`) and the duplicate keys met while parsing it; a missing, unreadable, non-UTF-8 or
malformed file, or an unknown dataset or split, is one UserError naming the file and every bad line. What the
rows hold is checked in `lora_rm.data.checks`.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_rm.data.files import (
    LOCAL_SUFFIXES,
    check_csv_records,
    csv_record_lines,
    decoded_text,
    duplicate_key_problem,
    file_kind,
    parse_json,
)
from lora_rm.errors import UserError, problems_message
from lora_rm.util.offline import require_hub, unreachable_message


@dataclass
class Row:
    """One preference row and where it came from (`file:line` or `dataset[split]:row N`)."""

    where: str
    fields: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # 'field: reason' found while parsing (duplicate keys)


def hub_source(source: str) -> tuple[str, str | None, str | None]:
    """Split a hub dataset reference `owner/name[/data_dir][:config]` into (repo id, config, data_dir):
    `Anthropic/hh-rlhf/harmless-base` reads the repo's harmless-base folder, `org/set:subset` its subset
    config."""
    name, config = source, None
    if ":" in source:
        name, _, config = source.rpartition(":")
    parts = name.split("/")
    return "/".join(parts[:2]), config or None, "/".join(parts[2:]) or None


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


# a dataset's own held-out split, in this order of preference
HELD_OUT_SPLITS = ("test", "validation", "eval")


def load_rows(
    source: str, split: str = "train", revision: str | None = None, eval_split: str | None = None
) -> tuple[list[Row], list[Row]]:
    """Read `source`: a local .jsonl/.json/.csv/.parquet file (JSON and CSV also compressed: .gz, .bz2, .xz,
    .zst), a `save_to_disk` folder (Dataset or DatasetDict), a folder of data files, or a hub dataset
    `owner/name[/data_dir][:config]`.

    Returns (rows of `split`, rows of `eval_split` or else the dataset's own test or validation split, empty if
    none; a saved `Dataset` has no splits: all its rows, whatever `split`). Raises UserError for a missing
    file, an unreadable or malformed file (every bad line listed), an unknown dataset or split (`eval_split`
    of a source without splits too), and an unreachable hub.
    """
    splits = read_source(source, revision)
    if isinstance(splits, list):
        if eval_split is not None:
            raise UserError(
                f"{source}: has no splits, so no eval split {eval_split!r}; give held-out data with --eval-dataset"
            )
        return splits, []
    held_out = eval_split or next((s for s in HELD_OUT_SPLITS if s in splits and s != split), None)
    return split_rows_of(source, splits, split), split_rows_of(source, splits, held_out) if held_out else []


def load_eval_rows(source: str, split: str | None = None) -> tuple[list[Row], str]:
    """The rows to evaluate a model on, and which ones they are ("all rows", "the test split"): `split` if
    given, else the dataset's test (or validation, or eval) split where it has one, else its train split.
    Raises UserError as `load_rows` does."""
    splits = read_source(source)
    if isinstance(splits, list):
        return splits, "all rows"
    if split is None:
        split = next((s for s in (*HELD_OUT_SPLITS, "train") if s in splits), next(iter(splits)))
    return split_rows_of(source, splits, split), f"the {split} split"


def split_rows_of(source: str, splits: Any, name: str) -> list[Row]:
    """The rows of split `name` of a dataset's splits; UserError naming the splits it has when there is none."""
    if name not in splits:
        raise UserError(f"{source}: has no split {name!r}; it has {', '.join(splits)}")
    return [Row(f"{source}[{name}]:row {i + 1}", dict(r)) for i, r in enumerate(splits[name])]


def read_source(source: str, revision: str | None = None) -> Any:
    """The rows of a source without splits (a file, a saved `Dataset`), or the splits of a dataset (a
    `DatasetDict`-like mapping of name to rows)."""
    path = Path(source)
    fmt, compression = file_kind(path)
    if path.is_file() or ((fmt or compression) and not path.is_dir()):  # a folder is a dataset folder
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        if fmt in (".jsonl", ".json") or fmt is None:
            return _read_json_rows(path)
        if fmt == ".csv":
            text = decoded_text(path)
            check_csv_records(text, path)  # a header-only or ragged file: told with its line
            lines = csv_record_lines(text)
            # only an empty cell is missing: pandas would also read "NA", "None" or "null" answers as null
            ds = _load_csv(path, text)
            return _csv_margins([Row(f"{path}:{lines[i]}", dict(r)) for i, r in enumerate(ds)])
        if compression:
            raise UserError(
                f"{source}: compressed {fmt} is not supported; decompress it (Parquet compresses itself)"
            )
        ds = _load_hf(LOCAL_SUFFIXES[fmt], str(path), None)["train"]
        return [Row(f"{path}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]
    if path.is_dir() and _is_saved_dataset(path):
        splits = _load_from_disk(path)
        if not isinstance(splits, dict):  # one Dataset: no splits of its own
            return [Row(f"{source}:row {i + 1}", dict(r)) for i, r in enumerate(splits)]
        return splits
    if path.is_dir():
        return _load_hf(source, None, revision)
    repo, config, data_dir = hub_source(source)
    return _load_hf(repo, None, revision, name=config, data_dir=data_dir)


def _load_from_disk(path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder: missing arrow files, bad JSON
        raise UserError(f"{path}: cannot read this save_to_disk folder ({type(e).__name__}: {e})") from None


def _load_csv(path: Path, text: str) -> Any:
    """The CSV's rows through `datasets` (its column typing), from the decompressed text when compressed."""
    if file_kind(path)[1] is None:
        return _load_hf("csv", str(path), None, keep_default_na=False, na_values=[""])["train"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / (path.name.rsplit(".", 1)[0])
        plain.write_text(text, encoding="utf-8")
        return _load_hf("csv", str(plain), None, keep_default_na=False, na_values=[""])["train"]


def _read_json_rows(path: Path) -> list[Row]:
    text = decoded_text(path)
    if text.lstrip().startswith("["):  # a JSON array of objects rather than JSON Lines
        try:
            items, dups = parse_json(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of objects or one JSON object per line")
        per_item: dict[Any, list[str]] = {}
        for at, key in dups:
            per_item.setdefault(at[0], []).append(duplicate_key_problem(at[1:], key))
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
            item, dups = parse_json(line)
        except ValueError as e:
            problems.append(f"{path}:{lineno}: not valid JSON: {e}")
            continue
        if not isinstance(item, dict):
            problems.append(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            continue
        rows.append(Row(f"{path}:{lineno}", item, [duplicate_key_problem(at, key) for at, key in dups]))
    if problems:
        raise UserError(problems_message(f"{path}: {len(problems)} malformed line(s):", problems))
    return rows


def _load_hf(source: str, data_files: str | None, revision: str | None, **kwargs: Any) -> Any:
    import datasets

    if data_files is None and not Path(source).is_dir():
        require_hub(source, "dataset")  # seconds, not a minute of retries, when the hub is out of reach
    try:
        return datasets.load_dataset(source, data_files=data_files, revision=revision, **kwargs)
    except FileNotFoundError as e:
        if data_files is None and Path(source).is_dir():
            raise UserError(
                f"{source}: a folder with no data files in it; pass a .jsonl/.json/.csv/.parquet file "
                "or a folder of them"
            ) from None
        raise UserError(
            f"{source}: not a local file or folder, and not found on the Hugging Face Hub ({e})"
        ) from None
    except (ConnectionError, TimeoutError) as e:
        raise UserError(unreachable_message(source, "dataset", type(e).__name__)) from None
    except Exception as e:  # datasets and huggingface_hub wrap failures in many exception types
        kind = type(e).__name__
        if "NotFound" in kind or "Repository" in kind:
            raise UserError(f"{source}: dataset not found (not a local path, not on the hub)") from None
        if any(k in kind for k in ("Offline", "Connection", "Timeout", "HTTP")):
            raise UserError(unreachable_message(source, "dataset", kind)) from None
        raise UserError(f"{source}: cannot load dataset ({kind}: {e})") from None


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


def _csv_margins(rows: list[Row]) -> list[Row]:
    """Margins read as text (a CSV whose margin column has one non-number makes the whole column text) become
    numbers again where they are: only the bad cell is then reported, not every row."""
    for row in rows:
        margin = row.fields.get("margin")
        if isinstance(margin, str):
            with contextlib.suppress(ValueError):
                row.fields["margin"] = float(margin)
    return rows
