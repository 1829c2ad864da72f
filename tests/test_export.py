"""lora_rm.model.saved and lora_rm.util.atomic: the adapter and merged folders, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from lora_rm.cli import main
from lora_rm.model.saved import CONFIG_FILE, merge_adapter, save_adapter
from lora_rm.util import atomic
from lora_rm.util.atomic import staged


def test_staged_folder_replaces_the_old_one_in_one_rename(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old", encoding="utf-8")
    with staged(final) as staging:
        assert staging == tmp_path / "adapter.partial" and staging.is_dir()
        (staging / "new.txt").write_text("new", encoding="utf-8")
        assert (final / "old.txt").is_file()  # untouched until the block ends
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert not (tmp_path / "adapter.partial").exists()


def test_a_failed_write_leaves_the_old_output(tmp_path):
    final = tmp_path / "scores.jsonl"
    final.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError), staged(final, folder=False) as staging:
        staging.write_text("half", encoding="utf-8")
        raise RuntimeError("killed")
    assert final.read_text(encoding="utf-8") == "old\n"
    with staged(final, folder=False) as staging:  # the leftover .partial does not get in the way
        staging.write_text("new\n", encoding="utf-8")
    assert final.read_text(encoding="utf-8") == "new\n"


def test_save_adapter_writes_weights_tokenizer_and_config(trained_run, tmp_path):
    out = save_adapter(trained_run.model, trained_run.tokenizer, {"lora_r": 16, "eval": {}}, tmp_path / "a")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", CONFIG_FILE} <= names
    assert json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))["lora_r"] == 16
    assert not (tmp_path / "a.partial").exists()


def test_merge_matches_the_adapter_and_refuses_a_disagreement(trained_run, tmp_path, monkeypatch):
    from lora_rm.data.encode import EncodedPair

    pairs = [EncodedPair([5, 6, 7, 0], [5, 8, 0]), EncodedPair([9, 0], [10, 11, 0])]
    check = merge_adapter(trained_run.adapter_dir, tmp_path / "merged", pairs)
    assert check["merge_check_pairs"] == 2 and check["merge_max_abs_diff"] < 1e-4
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / CONFIG_FILE).is_file()

    import lora_rm.model.saved as export

    real = export.compute_rewards
    calls = []

    def drifting(model, *args, **kwargs):  # the second call reads the merged model
        calls.append(1)
        return real(model, *args, **kwargs) + (1.0 if len(calls) == 2 else 0.0)

    monkeypatch.setattr(export, "compute_rewards", drifting)
    with pytest.raises(RuntimeError, match="merged model disagrees with its adapter"):
        merge_adapter(trained_run.adapter_dir, tmp_path / "bad", pairs)
    assert not (tmp_path / "bad").exists()


def test_every_file_a_run_and_a_score_write_is_renamed_into_place(
    tiny_gpt2, prefs_file, tmp_path, monkeypatch
):
    """Every file of a training run (checkpoints, eval, charts, card, merged model) and of `score --output` comes
    into place through lora_rm.util.atomic's one rename: on its own, or inside a staged folder. (metrics.jsonl is
    started that way, then appended to a line at a time: a torn last line is dropped on --resume.)"""
    renamed: list[Path] = []
    rename = atomic.rename_with_retry

    def recording(src: Path, dst: Path, attempts: int = 10) -> None:
        renamed.append(Path(dst))
        rename(src, dst, attempts)

    monkeypatch.setattr(atomic, "rename_with_retry", recording)
    out, scored = tmp_path / "run", tmp_path / "scored.jsonl"
    argv = [f"--base={tiny_gpt2}", f"--dataset={prefs_file}", f"--output-dir={out}", "--quant=none"]
    argv += ["--precision=fp32", "--max-steps=2", "--save-steps=1", "--batch-size=4", "--merge"]
    assert main(["train", *argv, "--gradient-accumulation-steps=1", "--eval-fraction=0.25"]) == 0
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Q:", "response": " A."}])
    assert main(["score", f"--model={out / 'adapter'}", f"--input={rows}", f"--output={scored}"]) == 0
    written = [p for p in [*out.rglob("*"), scored] if p.is_file()]
    for name in (
        "eval/eval.json",
        "eval/reward_hist.png",
        "adapter/README.md",
        "config.json",
        "step-000002/COMPLETE",
    ):
        assert out / name in written and out / name in renamed, name
    assert [str(p) for p in written if not any(d == p or d in p.parents for d in renamed)] == []
