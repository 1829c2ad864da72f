"""Damaged or inconsistent model folders are refused on load with one line naming the file and the field
(`lora_rm.model.folder_checks`, `lora_rm.model.folder_fit`): in the library, and through `lora-rm score`, `compare` and
`eval` as real processes (exit 2, no traceback, the folder left as it was)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import cli_runner
import pytest
import torch
from cli_runner import ROOT, TRAINING_MODULES, Case
from conftest import PROMPTS, _save_tiny_model, preference_rows, write_jsonl

from lora_rm.errors import UserError
from lora_rm.evaluation.reward_model import RewardModel

LORA_RM = Path(sys.executable).with_name("lora-rm")
if not LORA_RM.is_file():
    LORA_RM = ROOT / "lora_rm" / "cli.py"


def _edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        change(data)
        (folder / name).write_text(json.dumps(data), encoding="utf-8")

    return damage


def _set(name: str, field: str, value) -> Callable[[Path], None]:
    return _edit_json(name, lambda d: d.__setitem__(field, value))


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: len(raw) // 2])

    return damage


def _tensors(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / name)
        change(tensors)
        save_file(tensors, folder / name, metadata={"format": "pt"})

    return damage


def _nan_head(tensors: dict) -> None:
    key = next(k for k in tensors if "score" in k)
    tensors[key][0, 0] = math.nan


def _drop_head(tensors: dict) -> None:
    for key in [k for k in tensors if "score" in k]:
        del tensors[key]


def _remove(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / n).unlink() for n in names]


ADAPTER, MERGED = "adapter_model.safetensors", "model.safetensors"
CASES = {  # name: (folder kind, damage, expected message)
    "adapter_config_not_json": ("adapter", _write("adapter_config.json", b"{r: 16"), "adapter_config.json: not valid JSON"),
    "adapter_config_list": ("adapter", _write("adapter_config.json", b"[1, 2]"), "adapter_config.json: expected a JSON object, got list"),
    "adapter_r_text": ("adapter", _set("adapter_config.json", "r", "sixteen"), "adapter_config.json: r: expected a positive integer, got 'sixteen'"),
    "adapter_targets": ("adapter", _set("adapter_config.json", "target_modules", 5), "adapter_config.json: target_modules: expected a list of module names, got 5"),
    "adapter_rank": ("adapter", _set("adapter_config.json", "r", 8), "lora_A.weight: rank 16, but adapter_config.json: r is 8"),
    "run_config_max_length": ("adapter", _set("lora_rm_config.json", "max_length", "long"), "lora_rm_config.json: max_length: expected an integer >= 4, got 'long'"),
    "stats_std_zero": ("adapter", _set("reward_stats.json", "std", 0), "reward_stats.json: std: expected a finite number > 0, got 0"),
    "stats_std_negative": ("adapter", _set("reward_stats.json", "std", -1.5), "reward_stats.json: std: expected a finite number > 0, got -1.5"),
    "stats_std_nan": ("merged", _set("reward_stats.json", "std", math.nan), "reward_stats.json: std: expected a finite number > 0, got nan"),
    "stats_mean_text": ("adapter", _set("reward_stats.json", "mean", "0.1"), "reward_stats.json: mean: expected a finite number, got '0.1'"),
    "stats_no_std": ("adapter", _edit_json("reward_stats.json", lambda d: d.pop("std")), "reward_stats.json: std: missing"),
    "weights_truncated": ("adapter", _truncate(ADAPTER), "lie outside the file's"),
    "weights_garbage": ("adapter", _write(ADAPTER, b"\xff" * 64), "adapter_model.safetensors: not a safetensors file"),
    "weights_missing": ("adapter", _remove(ADAPTER), "no weights (adapter_model.safetensors or adapter_model.bin)"),
    "head_nan": ("adapter", _tensors(ADAPTER, _nan_head), "score.weight: holds NaN or infinite values"),
    "head_missing": ("adapter", _tensors(ADAPTER, _drop_head), "adapter_model.safetensors: no reward head"),
    "tokenizer_damaged": ("adapter", _write("tokenizer.json", b"\x00not json"), "tokenizer.json: not valid JSON"),
    "merged_head_nan": ("merged", _tensors(MERGED, _nan_head), "model.safetensors: score.weight: holds NaN"),
    "merged_width": ("merged", _set("config.json", "n_embd", 48), "model.safetensors: score.weight: shape [1, 32], but config.json (gpt2, hidden size 48"),
    "merged_model_type": ("merged", _edit_json("config.json", lambda d: d.pop("model_type")), "config.json: model_type: expected an architecture name"),
    "merged_no_tokenizer": ("merged", _remove("tokenizer.json", "tokenizer_config.json"), "no tokenizer (tokenizer.json or tokenizer_config.json)"),
    "merged_truncated": ("merged", _truncate(MERGED), "model.safetensors: "),
}  # fmt: skip


def _damaged(trained_run, root: Path, name: str) -> Path:
    kind, damage, _ = CASES[name]
    source = trained_run.adapter_dir if kind == "adapter" else trained_run.merged_dir
    folder = shutil.copytree(source, root / name)
    damage(folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", list(CASES))
def test_damaged_folder_is_refused_with_one_line(trained_run, tmp_path, name):
    folder = _damaged(trained_run, tmp_path, name)
    before = _snapshot(folder)
    with pytest.raises(UserError) as e:
        RewardModel.from_pretrained(folder, device="cpu")
    message = str(e.value)
    assert CASES[name][2] in message and "\n" not in message, message
    assert str(folder) in message
    assert _snapshot(folder) == before  # nothing written or deleted


@pytest.fixture(scope="module")
def wide_gpt2(tmp_path_factory) -> Path:
    """The tiny GPT-2 at twice the width: the --base of another width."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save_tiny_model(
        tmp_path_factory, "gpt2", GPT2LMHeadModel, GPT2Config,
        n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def test_a_base_of_another_width_is_refused(trained_run, wide_gpt2):
    with pytest.raises(UserError) as e:
        RewardModel.from_pretrained(trained_run.adapter_dir, base=str(wide_gpt2), device="cpu")
    assert str(e.value).startswith(
        f"{trained_run.adapter_dir / ADAPTER}: base_model.model.score.weight: shape "
    )
    assert "(gpt2, hidden size 64); the adapter was trained on another base" in str(e.value)


def test_a_base_of_another_architecture_is_refused(trained_run, tiny_bert):
    with pytest.raises(
        UserError,
        match=r"score.weight: the base has no such parameter \(bert, hidden size 32\); the adapter was trained on",
    ):
        RewardModel.from_pretrained(trained_run.adapter_dir, base=str(tiny_bert), device="cpu")


def test_a_plain_causal_lm_needs_the_explicit_flag(tiny_gpt2, trained_run, tmp_path):
    with pytest.raises(UserError, match=r"model.safetensors: no reward head .* --allow-untrained-head"):
        RewardModel.from_pretrained(tiny_gpt2, device="cpu")
    rm = RewardModel.from_pretrained(tiny_gpt2, device="cpu", allow_untrained_head=True)
    assert len(rm.score([PROMPTS[0]], [" sure"])) == 1
    headless = _damaged(trained_run, tmp_path, "head_missing")  # as PEFT saves an adapter without a head:
    _edit_json("adapter_config.json", lambda d: d.update(modules_to_save=None, task_type=None))(headless)
    rm = RewardModel.from_pretrained(headless, device="cpu", allow_untrained_head=True)
    assert math.isfinite(rm.score([PROMPTS[0]], [" sure"])[0])


def test_a_non_finite_reward_is_an_error_not_a_number(trained_run):
    rm = RewardModel.from_pretrained(trained_run.merged_dir, device="cpu")
    with torch.no_grad():
        rm.model.transformer.ln_f.weight.fill_(math.inf)
    with pytest.raises(UserError, match="merged: gave a non-finite reward .NaN or inf. for 2 of 2 texts"):
        rm.score([PROMPTS[0], PROMPTS[1]], [" sure", " no"])
    with pytest.raises(UserError, match="non-finite reward"):
        rm.score_texts([PROMPTS[0]])


@pytest.fixture(scope="module")
def runs(trained_run, tiny_gpt2, wide_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder-cli")
    data = write_jsonl(tmp / "in.jsonl", [{"prompt": PROMPTS[0], "response": " sure"}])
    prefs = write_jsonl(tmp / "prefs.jsonl", preference_rows(4))
    folders = {n: _damaged(trained_run, tmp, n) for n in ("adapter_r_text", "stats_std_zero", "head_nan", "merged_width", "weights_truncated")}  # fmt: skip

    def score(model, out, *extra):
        return ["score", "--model", str(model), "--input", str(data), "--output", str(tmp / out), *extra]

    cases = {
        "adapter_r_text": score(folders["adapter_r_text"], "a.jsonl"),
        "stats_std_zero": score(folders["stats_std_zero"], "b.jsonl"),
        "head_nan": ["compare", "--model", str(folders["head_nan"]), "--prompt", PROMPTS[0], " a", " b"],
        "merged_width": ["eval", "--model", str(folders["merged_width"]), "--dataset", str(prefs), "--output-dir", str(tmp / "ev")],
        "weights_truncated": score(folders["weights_truncated"], "c.jsonl"),
        "wide_base": score(trained_run.adapter_dir, "d.jsonl", "--base", str(wide_gpt2)),
        "plain_lm": score(tiny_gpt2, "e.jsonl"),
        "plain_lm_allowed": score(tiny_gpt2, "f.jsonl", "--allow-untrained-head"),
    }  # fmt: skip
    before = {n: _snapshot(f) for n, f in folders.items()}
    runs = cli_runner.start(
        {n: Case(LORA_RM, argv) for n, argv in cases.items()},
        tmp,
        preload=("lora_rm.evaluation.reward_model", *TRAINING_MODULES),
    )
    yield runs, tmp, folders, before
    runs.stop()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adapter_r_text", "adapter_config.json: r: expected a positive integer"),
        ("stats_std_zero", "reward_stats.json: std: expected a finite number > 0, got 0"),
        ("head_nan", "score.weight: holds NaN or infinite values"),
        ("merged_width", "score.weight: shape [1, 32], but config.json (gpt2, hidden size 48"),
        ("weights_truncated", "lie outside the file's"),
        ("wide_base", "(gpt2, hidden size 64); the adapter was trained on another base"),
        ("plain_lm", "no reward head (score or classifier weights) was trained and saved"),
    ],
)
def test_cli_refuses_a_damaged_folder(runs, name, expected):
    runs, tmp, folders, before = runs
    r = runs.result(name)
    assert r.code == 2 and "Traceback" not in r.err, f"exit {r.code}\n{r.err}"
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.err
    if name in folders:
        assert _snapshot(folders[name]) == before[name]
    assert not any(tmp.glob("[a-e].jsonl")) and not (tmp / "ev").exists()


def test_cli_scores_a_plain_lm_when_asked(runs):
    runs, tmp, _, _ = runs
    r = runs.result("plain_lm_allowed")
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in (tmp / "f.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["reward"])


def test_an_adapter_saved_as_bin_loads_and_a_damaged_bin_is_refused(trained_run, tmp_path):
    from safetensors.torch import load_file

    folder = shutil.copytree(trained_run.adapter_dir, tmp_path / "bin")
    torch.save(load_file(folder / ADAPTER), folder / "adapter_model.bin")
    (folder / ADAPTER).unlink()
    expected = RewardModel.from_pretrained(trained_run.adapter_dir, device="cpu").score(
        [PROMPTS[0]], [" sure"]
    )
    assert RewardModel.from_pretrained(folder, device="cpu").score([PROMPTS[0]], [" sure"]) == expected
    (folder / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(UserError, match=r"adapter_model.bin: not a readable PyTorch weights file"):
        RewardModel.from_pretrained(folder, device="cpu")


def test_a_local_base_with_a_damaged_config_is_refused(trained_run, tiny_gpt2, tmp_path):
    base = shutil.copytree(tiny_gpt2, tmp_path / "base")
    (base / "config.json").write_text('{"model_type": "gpt2",', encoding="utf-8")
    with pytest.raises(UserError, match=r"base/config.json: not valid JSON"):
        RewardModel.from_pretrained(trained_run.adapter_dir, base=str(base), device="cpu")
