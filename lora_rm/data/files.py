"""The text of a local data file: its kind from its name, decompressed, decoded as UTF-8 (a bad byte told with its
line), parsed as JSON with every duplicate key found, or split into CSV records with their line numbers. What
becomes of the text (rows that remember their `file:line`) is `lora_rm.data.read`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lora_rm.errors import UserError, problems_message
from lora_rm.util import bounds

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}


def file_kind(path: Path) -> tuple[str | None, str | None]:
    """(format suffix, compression suffix) of a file name: `a.jsonl.gz` -> ('.jsonl', '.gz'),
    `a.csv` -> ('.csv', None); an unknown format gives None for it."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else None
    fmt = suffixes[-1] if suffixes and suffixes[-1] in LOCAL_SUFFIXES else None
    return fmt, compression


def _reader(path: Path, compression: str) -> Any:
    """A binary stream of the decompressed bytes of `path`."""
    if compression == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if compression == ".bz2":
        import bz2

        return bz2.open(path, "rb")
    if compression == ".xz":
        import lzma

        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
    return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz, .bz2, .xz or .zst; UserError when it cannot be
    read, is not valid for its compression, or is (or decompresses to) more than MAX_TEXT_BYTES."""
    limit = bounds.MAX_TEXT_BYTES
    bounds.check_file_size(path, limit)  # a huge (or sparse) file: refused from its size, unread
    compression = file_kind(path)[1]
    try:
        if compression is None:
            return path.read_bytes()
        with _reader(path, compression) as stream:
            return bounds.read_limited(stream, path, limit)  # stops early: a small bomb cannot fill memory
    except UserError:
        raise
    except OSError as e:
        if compression is None or e.strerror:  # a file that cannot be opened, not a bad archive
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        raise _invalid(path, compression, e) from None
    except Exception as e:  # EOFError, lzma.LZMAError, zstandard.ZstdError
        raise _invalid(path, compression, e) from None


def _invalid(path: Path, compression: str | None, e: Exception) -> UserError:
    kind = COMPRESSED_SUFFIXES.get(compression or "", "compressed")
    return UserError(f"{path}: not a valid {kind} file ({type(e).__name__}: {e})")


def decoded_text(path: Path) -> str:
    """The file's text; UserError if it cannot be read, is too big, is not UTF-8 (with the line) or is empty."""
    raw = read_bytes(path)
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


def show_key(key: str) -> str:
    return key if key and key.isprintable() and key.strip() == key else repr(key)


def parse_json(text: str) -> tuple[Any, list[tuple[tuple[str | int, ...], str]]]:
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


def duplicate_key_problem(at: tuple[str | int, ...], key: str) -> str:
    """'field: reason' for a duplicate `key` in the object at path `at` inside one row."""
    if not at:
        return f"{show_key(key)}: duplicate key"
    inner = "".join(f"[{p}]" if isinstance(p, int) else f"[{p!r}]" for p in at[1:])
    return f"{show_key(str(at[0]))}: duplicate key {key!r} in {at[0]}{inner}"


def csv_record_lines(text: str) -> list[int]:
    """The line each CSV record of `text` starts on (records can span lines inside quotes)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader, None)  # header
    starts, end = [], reader.line_num
    for record in reader:
        if record:
            starts.append(end + 1)
        end = reader.line_num
    return starts


def check_csv_records(text: str, path: Any) -> None:
    """UserError, with the line, for a CSV that has only a header or a record whose field count is not the
    header's (the CSV reader would otherwise fail with no line)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    problems, rows = [], 0
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for record in reader:
            if record:
                rows += 1
                if len(record) != len(header):
                    problems.append(
                        f"{path}:{start}: expected {len(header)} fields (as the header), got {len(record)}"
                    )
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if problems:
        raise UserError(problems_message(f"{path}: {len(problems)} malformed record(s):", problems))
    if not rows:
        raise UserError(f"{path}: only a header line ({', '.join(header)}), no rows")
