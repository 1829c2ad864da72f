"""lora_rm.evaluation.reward_model: RewardModel scores as training computes rewards; compare, normalisation, merged vs adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROMPTS, preference_rows

from lora_rm.data.encode import encode_pairs
from lora_rm.data.read import Row
from lora_rm.data.sequences import encode_sequences
from lora_rm.errors import UserError
from lora_rm.evaluation.reward_model import RewardModel
from lora_rm.model.collate import PreferenceCollator
from lora_rm.model.rewards import compute_rewards

LONG_PROMPT = " ".join(["question : how do i make a cake ?"] * 12) + " answer :"  # > 64 tokens


@pytest.fixture(scope="module")
def adapter(trained_run) -> RewardModel:
    return RewardModel.from_pretrained(trained_run.adapter_dir)


def _rows() -> list[dict]:
    rows = preference_rows(6)
    rows[1]["prompt"] = LONG_PROMPT  # the prompt loses tokens from the left, as in training
    rows[2]["chosen"] = " " + " ".join(["sure first you should mix then heat"] * 12)  # the response too
    return rows


def test_score_equals_the_training_forward(adapter):
    rows = _rows()
    pairs, report = encode_pairs(
        [Row(f"r{i}", r) for i, r in enumerate(rows)], "explicit", adapter.tokenizer, adapter.max_length
    )
    assert report.prompt_truncated == 1 and report.response_truncated == 1 and len(pairs) == 6
    batch = PreferenceCollator(adapter.tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        expected = compute_rewards(adapter.model, batch.input_ids, batch.attention_mask)
    prompts = [r["prompt"] for r in rows]
    got = adapter.score(
        prompts * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], batch_size=4
    )
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-5, atol=1e-6)
    seqs = encode_sequences(prompts, [r["chosen"] for r in rows], adapter.tokenizer, adapter.max_length)
    assert seqs == [p.chosen for p in pairs]  # the very same token ids


def test_score_reads_the_training_length_and_format(adapter, trained_run):
    saved = json.loads((trained_run.adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    assert adapter.max_length == saved["max_length"] == 64
    assert adapter.data_format == saved["data_format"] == "explicit"
    assert not adapter.model.training


def test_compare_is_antisymmetric(adapter):
    prompt, good, bad = PROMPTS[0], " sure first you should mix then heat", " go away"
    ab, ba = adapter.compare(prompt, good, bad), adapter.compare(prompt, bad, good)
    assert ab["p_a_preferred"] + ba["p_a_preferred"] == pytest.approx(1.0, abs=1e-12)
    assert (ab["reward_a"], ab["reward_b"]) == (ba["reward_b"], ba["reward_a"])
    expected = torch.sigmoid(torch.tensor(ab["reward_a"] - ab["reward_b"], dtype=torch.float64))
    assert ab["p_a_preferred"] == pytest.approx(float(expected), abs=1e-12)
    assert ab["p_a_preferred"] > 0.5  # the trained model prefers the helpful answer


def test_merged_and_adapter_models_score_alike(adapter, trained_run):
    merged = RewardModel.from_pretrained(trained_run.merged_dir)
    rows = _rows()
    args = ([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    torch.testing.assert_close(
        torch.tensor(merged.score(*args)), torch.tensor(adapter.score(*args)), atol=1e-5, rtol=1e-5
    )
    assert merged.max_length == adapter.max_length and merged.reward_stats == adapter.reward_stats


def test_adapter_onto_an_already_loaded_base(adapter, trained_run, tiny_gpt2):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_gpt2), num_labels=1)
    other = RewardModel.from_pretrained(trained_run.adapter_dir, base=base)
    rows = _rows()
    args = ([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert other.score(*args) == adapter.score(*args)


def test_normalize_uses_the_stored_statistics(adapter, trained_run):
    stats = json.loads((trained_run.adapter_dir / "reward_stats.json").read_text(encoding="utf-8"))
    eval_report = json.loads((trained_run.output_dir / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert stats["mean"] == eval_report["reward_stats"]["mean"] and stats["std"] > 0
    assert adapter.reward_stats == stats
    rows = _rows()
    args = ([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    raw, normalized = adapter.score(*args), adapter.score(*args, normalize=True)
    assert normalized == pytest.approx([(r - stats["mean"]) / stats["std"] for r in raw], rel=1e-12)


def test_normalize_without_statistics_is_a_clear_error(trained_run, tmp_path):
    bare = shutil.copytree(trained_run.adapter_dir, tmp_path / "adapter")
    (bare / "reward_stats.json").unlink()
    model = RewardModel.from_pretrained(bare)
    assert model.reward_stats is None
    assert len(model.score([PROMPTS[0]], [" sure"])) == 1
    with pytest.raises(UserError, match="no reward statistics .reward_stats.json.*lora-rm eval"):
        model.score([PROMPTS[0]], [" sure"], normalize=True)


def test_from_pretrained_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="neither an adapter folder"):
        RewardModel.from_pretrained(tmp_path)


def test_score_takes_lists(adapter):
    with pytest.raises(TypeError, match="lists"):
        adapter.score(PROMPTS[0], " sure")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        adapter.score(PROMPTS[:2], [" sure"])
    assert adapter.score([], []) == []


def test_score_tokenizes_the_joined_text(adapter):
    joined = encode_sequences([PROMPTS[0]], [" sure"], adapter.tokenizer, 64)
    assert joined == [adapter.tokenizer(PROMPTS[0] + " sure")["input_ids"]]
    assert adapter.score_texts([PROMPTS[0] + " sure"]) == adapter.score([PROMPTS[0]], [" sure"])


def test_chat_prompts_need_a_chat_template_and_no_mixing(adapter):
    with pytest.raises(UserError, match="chat template"):
        adapter.score([[{"role": "user", "content": "hi"}]], [" sure"])
    with pytest.raises(UserError, match="mix text and chat"):
        adapter.score([PROMPTS[0], [{"role": "user", "content": "hi"}]], [" sure", " no"])


def test_a_hub_id_offline_is_one_clear_error():
    with pytest.raises(
        UserError, match="no-org/no-rm: no local reward model by that name, and HF_HUB_OFFLINE=1"
    ):
        RewardModel.from_pretrained("no-org/no-rm")  # HF_HUB_OFFLINE=1 from conftest, an empty cache


@pytest.fixture
def hub_copy(trained_run, monkeypatch, tmp_path):
    """The hub switched on and reachable, its snapshot_download serving a copy of the trained adapter."""
    import huggingface_hub
    from huggingface_hub import constants

    from lora_rm.util import offline

    folder = shutil.copytree(trained_run.adapter_dir, tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(offline, "_probe", lambda host, port: None)
    monkeypatch.setattr(offline, "_probed", {})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_id_is_downloaded_and_loaded(hub_copy, adapter, capsys):
    from lora_rm.cli import main

    model = RewardModel.from_pretrained("me/rm")
    assert hub_copy == ["me/rm"]
    prompts, responses = [PROMPTS[0], PROMPTS[1]], [" sure", " no"]
    assert model.score(prompts, responses) == pytest.approx(adapter.score(prompts, responses), abs=1e-6)
    assert main(["compare", "--model", "me/rm", "--prompt", PROMPTS[0], " sure", " no"]) == 0
    assert hub_copy == ["me/rm", "me/rm"] and "P(A preferred)" in capsys.readouterr().out
