"""Reading preference files and dataset folders: rows and their locations, every way a file can be unreadable
or malformed (each named by file and line), duplicate keys, and the seeded eval split."""

from __future__ import annotations

import json

import pytest
from conftest import ROW, load_checked, preference_rows, user_error, write_jsonl, write_lines

from lora_rm.data.read import Row, load_eval_rows, load_rows, split_rows
from lora_rm.errors import UserError, problems_message

# ---------------------------------------------------------------- reading files


def test_jsonl_rows_and_locations(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(3))
    rows, fmt = load_checked(path)
    assert fmt == "explicit"
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert rows[0].fields == {
        "prompt": "question : how do i make a cake ? answer :",
        "chosen": " sure first you should mix then heat",
        "rejected": " whatever",
    }


def test_jsonl_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    r = json.dumps(ROW)
    path = tmp_path / "gaps.jsonl"
    path.write_text(f"{r}\n\n{r}\n   \n\t\n{r}\n\n", encoding="utf-8")
    rows, _ = load_checked(path)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3", f"{path}:6"]


def test_jsonl_with_utf8_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROW) + "\n").encode("utf-8"))
    rows, fmt = load_checked(path)
    assert fmt == "explicit"
    assert set(rows[0].fields) == {"prompt", "chosen", "rejected"}  # not "\ufeffprompt"


def test_jsonl_with_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes((json.dumps(ROW) + "\r\n" + json.dumps(ROW) + "\r\n").encode())
    rows, _ = load_checked(path)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]


def test_jsonl_non_ascii_text(tmp_path):
    row = {"prompt": "Wie koche ich Reis? 米", "chosen": "Zuerst spülen 🍚", "rejected": "egal"}
    path = tmp_path / "utf8.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    rows, _ = load_checked(path)
    assert rows[0].fields == row


@pytest.mark.parametrize("char", ["\u2028", "\x85"])
def test_jsonl_line_separator_inside_a_string(tmp_path, char):
    row = {"prompt": f"first line{char}second line", "chosen": "sure", "rejected": "no"}
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(ROW) + "\n", encoding="utf-8")
    rows, _ = load_checked(path)
    assert rows[0].fields == row
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]


def test_json_array_file(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(preference_rows(3), indent=2), encoding="utf-8")
    rows, fmt = load_checked(path)
    assert fmt == "explicit"
    assert [r.where for r in rows] == [f"{path}:item 1", f"{path}:item 2", f"{path}:item 3"]
    assert rows[2].fields["chosen"] == " great question you should stir then check"


def test_json_suffix_with_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", preference_rows(2))
    rows, _ = load_checked(path)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]


def test_unknown_suffix_read_as_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "prefs.txt", preference_rows(2))
    rows, _ = load_checked(path)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:2"]


def test_csv_rows_and_locations_after_the_header(tmp_path):
    import datasets

    path = tmp_path / "prefs.csv"
    data = [{**r, "margin": float(i)} for i, r in enumerate(preference_rows(3))]
    datasets.Dataset.from_list(data).to_csv(str(path))
    assert path.read_text(encoding="utf-8").splitlines()[0] == "prompt,chosen,rejected,margin"
    rows, fmt = load_checked(path)
    assert fmt == "explicit"
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert rows[1].fields == data[1]


def test_parquet_rows(tmp_path):
    import datasets

    path = tmp_path / "prefs.parquet"
    data = [{"chosen": f"answer : {w}", "rejected": "answer : no", "margin": 0.5} for w in ("sure", "good")]
    datasets.Dataset.from_list(data).to_parquet(str(path))
    rows, fmt = load_checked(path)
    assert fmt == "implicit"
    assert [r.fields for r in rows] == data
    assert [r.where for r in rows] == [f"{path}:row 1", f"{path}:row 2"]


def test_csv_bad_field_is_located(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected\np one,good,bad\np two,same,same\n", encoding="utf-8")
    msg = user_error(path)
    assert f"{path}:3: rejected: identical to chosen" in msg


def test_csv_locations_with_multiline_fields(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text(
        'prompt,chosen,rejected\np1,"first\nsecond\nthird",r1\n\np2,c2,c2\n',
        encoding="utf-8",
    )
    msg = user_error(path)
    # lines: 1 header, 2-4 the p1 record, 5 blank, 6 "p2,c2,c2"
    assert f"{path}:6: rejected: identical to chosen" in msg


@pytest.mark.parametrize("text", ["NA", "None", "null", "nan"])
def test_csv_keeps_texts_that_look_like_missing_values(tmp_path, text):
    path = tmp_path / "na.csv"
    path.write_text(f"prompt,chosen,rejected\nis there a value ?,{text},yes\n", encoding="utf-8")
    rows, _ = load_checked(path)
    assert rows[0].fields["chosen"] == text


def test_csv_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,chosen,rejected\nhow ?,sure,no\nhow ?,caf\xe9,no\n")
    assert user_error(path).startswith(f"{path}:3: not valid UTF-8 (byte 0xe9)")


def test_csv_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("\n", encoding="utf-8")
    assert user_error(path) == f"{path}: file is empty"


# ---------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    for name in ("nope.jsonl", "nope.json", "nope.csv", "nope.parquet"):
        path = tmp_path / name
        with pytest.raises(UserError, match="no such file") as e:
            load_rows(str(path))
        assert str(path) in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    msg = user_error(path)
    assert msg == f"{path}: file is empty"


def test_empty_json_array(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]", encoding="utf-8")
    assert "no rows" in user_error(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(ROW) + "\n").encode()
    path.write_bytes(good + good + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    msg = user_error(path)
    assert msg.startswith(f"{path}:3: not valid UTF-8")
    assert "0xe9" in msg


def test_all_malformed_json_lines_listed(tmp_path):
    good = json.dumps(ROW)
    path = write_lines(tmp_path / "bad.jsonl", [good, "{not json", good, '{"prompt": "x",', good, "'single'"])
    msg = user_error(path)
    assert "3 malformed line(s)" in msg
    for line in (2, 4, 6):
        assert f"{path}:{line}: not valid JSON" in msg
    for line in (1, 3, 5):
        assert f"{path}:{line}:" not in msg


def test_many_malformed_lines_are_summarised(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{"] * 25)
    msg = user_error(path)
    assert "25 malformed line(s)" in msg
    assert f"{path}:20: not valid JSON" in msg
    assert f"{path}:21:" not in msg
    assert "... and 5 more" in msg


def test_json_list_line_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", [json.dumps(ROW), '["q", "a", "b"]', "42", '"text"'])
    msg = user_error(path)
    assert f"{path}:2: expected a JSON object, got list" in msg
    assert f"{path}:3: expected a JSON object, got int" in msg
    assert f"{path}:4: expected a JSON object, got str" in msg


def test_json_array_with_non_object_items(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([ROW, ["a", "b"], ROW, "c"]), encoding="utf-8")
    msg = user_error(path)
    assert "2 item(s) are not objects" in msg
    assert f"{path}:item 2: expected a JSON object, got list" in msg
    assert f"{path}:item 4: expected a JSON object, got str" in msg


def test_json_array_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"chosen": "a", "rejected": "b"},\n  {"chosen": "a" "rejected": "b"}\n]\n')
    msg = user_error(path)
    assert msg.startswith(f"{path}:3: not valid JSON")


def test_problems_message_limit():
    msg = problems_message("Header:", [f"p{i}" for i in range(5)], limit=3)
    assert msg == "Header:\n  p0\n  p1\n  p2\n  ... and 2 more"
    assert problems_message("H:", ["a"]) == "H:\n  a"


# ---------------------------------------------------------------- parsing: escapes, duplicate keys, nesting


def test_lone_surrogate_escape_in_the_file_is_located(tmp_path):
    path = write_lines(
        tmp_path / "utf16.jsonl",
        [json.dumps(ROW), '{"prompt": "how ?", "chosen": "sure \\ud83d", "rejected": "no"}'],
    )
    assert f"{path}:2: chosen: contains a lone surrogate" in user_error(path)


def test_surrogate_pair_escape_is_fine(tmp_path):
    path = write_lines(
        tmp_path / "pair.jsonl", ['{"prompt": "how ?", "chosen": "rice \\ud83c\\udf5a", "rejected": "no"}']
    )
    assert load_checked(path)[0][0].fields["chosen"] == "rice 🍚"


def test_duplicate_keys_are_located(tmp_path):
    path = write_lines(
        tmp_path / "dups.jsonl",
        [
            json.dumps(ROW),
            '{"prompt": "how ?", "chosen": "sure", "rejected": "no", "chosen": "other"}',
            '{"prompt": "a", "prompt": "b", "chosen": "sure", "chosen": "x", "rejected": "no"}',
        ],
    )
    msg = user_error(path)
    assert f"{path}:2: chosen: duplicate key" in msg
    assert f"{path}:3: prompt: duplicate key" in msg
    assert f"{path}:3: chosen: duplicate key" in msg
    assert "2 x chosen: duplicate key" in msg
    assert f"{path}:1:" not in msg


def test_duplicate_key_in_a_message(tmp_path):
    line = '{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "content": "b"}], '
    line += '"rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}'
    path = write_lines(tmp_path / "dups.jsonl", [line])
    assert f"{path}:1: chosen: duplicate key 'content' in chosen[1]" in user_error(path)


def test_duplicate_keys_in_a_json_array(tmp_path):
    path = tmp_path / "dups.json"
    path.write_text(
        '[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a", "chosen": "b", "rejected": "c", "rejected": "d"}]'
    )
    msg = user_error(path)
    assert f"{path}:item 2: rejected: duplicate key" in msg
    assert f"{path}:item 1:" not in msg


def test_deeply_nested_json_is_malformed_not_a_crash(tmp_path):
    path = write_lines(
        tmp_path / "deep.jsonl", [json.dumps(ROW), '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"]
    )
    assert f"{path}:2: not valid JSON" in user_error(path)


# ---------------------------------------------------------------- split_rows


def rows_n(n):
    return [Row(f"f:{i + 1}", {"i": i}) for i in range(n)]


def test_split_sizes_and_disjoint():
    rows = rows_n(40)
    train, held = split_rows(rows, 0.25, seed=0)
    assert (len(train), len(held)) == (30, 10)
    ids_train, ids_held = {r.fields["i"] for r in train}, {r.fields["i"] for r in held}
    assert not ids_train & ids_held
    assert ids_train | ids_held == set(range(40))


def test_split_keeps_file_order():
    train, held = split_rows(rows_n(40), 0.25, seed=0)
    assert [r.fields["i"] for r in train] == sorted(r.fields["i"] for r in train)
    assert [r.fields["i"] for r in held] == sorted(r.fields["i"] for r in held)


def test_split_deterministic_by_seed():
    rows = rows_n(100)
    a = split_rows(rows, 0.1, seed=42)[1]
    b = split_rows(rows, 0.1, seed=42)[1]
    c = split_rows(rows, 0.1, seed=43)[1]
    assert [r.where for r in a] == [r.where for r in b]
    assert [r.where for r in a] != [r.where for r in c]
    assert [r.fields["i"] for r in a] != list(range(10))  # shuffled, not the first rows


def test_split_fraction_zero_no_eval():
    rows = rows_n(10)
    train, held = split_rows(rows, 0.0, seed=1)
    assert held == []
    assert train == rows


def test_split_at_least_one_eval_row():
    train, held = split_rows(rows_n(10), 0.01, seed=1)
    assert (len(train), len(held)) == (9, 1)


def test_split_leaving_no_training_rows():
    with pytest.raises(UserError, match="leaves no training rows out of 1"):
        split_rows(rows_n(1), 0.05, seed=0)


# ---------------------------------------------------------------- hub and folders


@pytest.mark.parametrize("name", ["no-such-org/no-such-dataset-xyz", "data/missing_folder"])
def test_unknown_hub_dataset_offline_is_a_user_error(name):
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported
    with pytest.raises(UserError) as e:
        load_rows(name)
    assert name in str(e.value)


@pytest.mark.parametrize("name", ["empty_folder", "prefs.jsonl"])
def test_folder_without_data_files(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    with pytest.raises(UserError, match="a folder with no data files in it") as e:
        load_rows(str(folder))
    assert str(folder) in str(e.value)


def test_dataset_folder_with_splits(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", preference_rows(3))
    write_jsonl(folder / "test.jsonl", preference_rows(2))
    train, held = load_rows(str(folder))
    assert len(train) == 3 and len(held) == 2
    assert train[0].where == f"{folder}[train]:row 1"
    assert held[1].where == f"{folder}[test]:row 2"
    with pytest.raises(UserError, match="has no split 'validation'; it has"):
        load_rows(str(folder), split="validation")


def test_eval_split_names_the_held_out_split(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    parts = {"train": 3, "test": 2, "dev": 4}
    splits = {k: datasets.Dataset.from_list(preference_rows(n)) for k, n in parts.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    assert len(load_rows(str(folder))[1]) == 2
    assert len(load_rows(str(folder), eval_split="dev")[1]) == 4  # TRL's --dataset_test_split dev
    with pytest.raises(UserError, match="has no split 'valid'; it has"):
        load_rows(str(folder), eval_split="valid")
    write_jsonl(tmp_path / "one.jsonl", preference_rows(2))
    with pytest.raises(UserError, match="has no splits, so no eval split 'test'"):
        load_rows(str(tmp_path / "one.jsonl"), eval_split="test")


def test_evaluation_reads_the_test_split_and_says_so(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", preference_rows(3))
    write_jsonl(folder / "test.jsonl", preference_rows(2))
    rows, which = load_eval_rows(str(folder))
    assert (len(rows), which) == (2, "the test split") and rows[0].where.endswith("[test]:row 1")
    assert load_eval_rows(str(folder), "train")[1] == "the train split"
    (folder / "test.jsonl").unlink()
    assert load_eval_rows(str(folder))[1] == "the train split"
    write_jsonl(tmp_path / "one.jsonl", preference_rows(2))
    assert load_eval_rows(str(tmp_path / "one.jsonl"))[1] == "all rows"


# ---------------------------------------------------------------- compressed files, saved datasets, hub configs


def _compress(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    import zstandard

    return {
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
        ".xz": lzma.compress,
        ".zst": zstandard.ZstdCompressor().compress,
    }[kind](data)


@pytest.mark.parametrize("kind", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_jsonl_keeps_file_and_line(tmp_path, kind):
    lines = [json.dumps(r) for r in preference_rows(3)]
    path = tmp_path / f"prefs.jsonl{kind}"
    path.write_bytes(_compress(kind, ("\n".join(lines) + "\n").encode()))
    rows, fmt = load_checked(path)
    assert fmt == "explicit" and [r.where for r in rows] == [f"{path}:{i}" for i in (1, 2, 3)]
    lines[1] = '{"prompt": "how ?", "chosen": "sure"'
    path.write_bytes(_compress(kind, "\n".join(lines).encode()))
    assert f"{path}:2: not valid JSON" in user_error(path)


def test_compressed_json_array_and_csv(tmp_path):
    array = tmp_path / "prefs.json.gz"
    array.write_bytes(_compress(".gz", json.dumps(preference_rows(2)).encode()))
    assert [r.where for r in load_rows(str(array))[0]] == [f"{array}:item 1", f"{array}:item 2"]
    csv = tmp_path / "prefs.csv.xz"
    csv.write_bytes(_compress(".xz", b'prompt,chosen,rejected\nq,"two\nlines",NA\nq2,c,\n'))
    rows = load_rows(str(csv))[0]
    assert [r.where for r in rows] == [f"{csv}:2", f"{csv}:4"]
    assert rows[0].fields == {"prompt": "q", "chosen": "two\nlines", "rejected": "NA"}
    assert rows[1].fields["rejected"] is None  # only an empty cell is missing


def test_corrupt_or_non_utf8_compressed_file(tmp_path):
    broken = tmp_path / "prefs.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    assert user_error(broken).startswith(f"{broken}: not a valid gzip file")
    latin = tmp_path / "latin.jsonl.bz2"
    latin.write_bytes(_compress(".bz2", b'{"prompt": "q"}\n{"prompt": "caf\xe9"}\n'))
    assert f"{latin}:2: not valid UTF-8 (byte 0xe9)" in user_error(latin)


def test_save_to_disk_folders(tmp_path):
    import datasets

    rows = preference_rows(4)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    train, held = load_rows(str(tmp_path / "one"))
    assert [r.fields for r in train] == rows and held == []
    assert train[3].where == f"{tmp_path / 'one'}:row 4"
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:])}
    )
    splits.save_to_disk(str(tmp_path / "two"))
    train, held = load_rows(str(tmp_path / "two"))
    assert len(train) == 3 and held[0].where == f"{tmp_path / 'two'}[test]:row 1"
    with pytest.raises(UserError, match="has no split 'dev'; it has train, test"):
        load_rows(str(tmp_path / "two"), split="dev")


@pytest.mark.parametrize(
    "source, expected",
    [
        ("Anthropic/hh-rlhf", ("Anthropic/hh-rlhf", None, None)),
        ("Anthropic/hh-rlhf/harmless-base", ("Anthropic/hh-rlhf", None, "harmless-base")),
        ("org/set:subset", ("org/set", "subset", None)),
        ("org/set/data/en:subset", ("org/set", "subset", "data/en")),
        ("imdb", ("imdb", None, None)),
    ],
)
def test_hub_source(source, expected):
    from lora_rm.data.read import hub_source

    assert hub_source(source) == expected


def test_hub_dataset_with_data_dir_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        rows = datasets.Dataset.from_list(preference_rows(2))
        return datasets.DatasetDict({"train": rows, "test": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, held = load_rows("Anthropic/hh-rlhf/harmless-base", split="test")
    name, kwargs = calls[0]
    assert name == "Anthropic/hh-rlhf" and kwargs["data_dir"] == "harmless-base" and kwargs["name"] is None
    assert train[0].where == "Anthropic/hh-rlhf/harmless-base[test]:row 1" and held == []
    load_rows("org/set:subset")
    assert calls[1][0] == "org/set" and calls[1][1]["name"] == "subset" and calls[1][1]["data_dir"] is None
