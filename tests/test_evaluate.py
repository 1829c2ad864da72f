"""lora_rm.evaluation.evaluate: the full evaluation written at the end of training and by `lora-rm eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_rm.data.encode import EncodedPair
from lora_rm.evaluation.evaluate import _ranked_lists, evaluate, full_evaluation, write_full_eval
from lora_rm.model.collate import PreferenceCollator
from lora_rm.model.load import load_base_model, load_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def test_training_writes_eval_json_plots_and_reward_stats(trained_run):
    out = trained_run.output_dir / "eval"
    report = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    for key in (
        "accuracy",
        "loss",
        "ties",
        "n_pairs",
        "calibration",
        "length_bias",
        "reward_stats",
        "warnings",
    ):
        assert key in report, key
    assert report["n_pairs"] == 12 and report["accuracy"] == pytest.approx(
        trained_run.eval_metrics["accuracy"]
    )
    assert report["loss"] == pytest.approx(trained_run.eval_metrics["loss"], rel=1e-5)
    assert {"margin_mean", "margin_std", "margin_p05", "margin_p50", "margin_p95"} <= report.keys()
    assert 0 <= report["calibration"]["ece"] <= 1 and len(report["calibration"]["curve"]) == 10
    assert report["length_bias"]["n_chosen_longer"] + report["length_bias"]["n_chosen_shorter"] <= 12
    for name in ("reward_hist.png", "reliability.png", "training_curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    stats = report["reward_stats"]
    assert stats["n_rewards"] <= 24 and stats["std"] > 0
    for folder in (trained_run.adapter_dir, trained_run.merged_dir, out):
        saved = json.loads((folder / "reward_stats.json").read_text(encoding="utf-8"))
        assert saved["mean"] == stats["mean"] and saved["std"] == stats["std"]


def test_full_evaluation_agrees_with_the_training_eval(trained_run):
    tokenizer, model = trained_run.tokenizer, trained_run.model
    pairs = [
        EncodedPair([5, 6, 7, 0], [5, 9, 0]),
        EncodedPair([8, 0], [8, 10, 11, 12, 0], margin=0.5),
        EncodedPair([13, 14, 0], [15, 0]),
    ]
    report, r_c, r_r = full_evaluation(model, pairs, tokenizer.pad_token_id, batch_size=2)
    quick = evaluate(model, pairs, PreferenceCollator(tokenizer.pad_token_id), batch_size=3)
    assert report["accuracy"] == quick["accuracy"] and report["ties"] == quick["ties"]
    assert report["loss"] == pytest.approx(quick["loss"], rel=1e-5)  # margins applied in both
    # response lengths are counted after the prefix both sides share: (2, 1), (1, 4), (2, 1)
    assert report["length_bias"]["n_chosen_longer"] == 2 and report["length_bias"]["n_chosen_shorter"] == 1
    assert "ranking" not in report


def test_a_model_that_has_not_learned_is_flagged(tiny_gpt2, tmp_path):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    model = load_base_model(str(tiny_gpt2), tokenizer.pad_token_id, seed=0)
    torch.nn.init.zeros_(model.score.weight)  # every reward 0: every pair a tie
    pairs = [EncodedPair([5, 6, 0], [7, 0]), EncodedPair([8, 0], [9, 10, 0])]
    logs = []
    report = write_full_eval(model, tokenizer, pairs, tmp_path / "eval", log=logs.append)
    assert report["ties"] == 2 and report["accuracy"] == 0.5 and report["loss"] == pytest.approx(math.log(2))
    assert report["warnings"] and "ln 2" in report["warnings"][0]
    assert any(line.startswith("warning:") for line in logs)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert saved["length_bias"]["reward_length_spearman"] is None  # NaN (constant rewards) as null
    assert not (tmp_path / "eval" / "training_curves.png").exists()  # no metrics.jsonl given


def test_no_eval_pairs_writes_no_report(tmp_path):
    assert write_full_eval(None, None, [], tmp_path / "eval", log=lambda *_: None) == {}
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_ranked_lists_are_read_back_in_rank_order():
    a, b, c, d = [1, 0], [2, 0], [3, 0], [4, 0]
    pairs = [
        EncodedPair(a, b, group=0),
        EncodedPair(a, c, group=0),
        EncodedPair(b, c, group=0),
        EncodedPair(d, a),  # a plain pair belongs to no list
        EncodedPair(d, c, group=1),
    ]
    rewards = {tuple(a): 1.0, tuple(b): 2.0, tuple(c): 0.0, tuple(d): 5.0}
    assert _ranked_lists(pairs, rewards) == [[1.0, 2.0, 0.0], [5.0, 0.0]]


def test_sequence_rewards_score_in_eval_mode_and_give_the_mode_back(tiny_gpt2):
    """A model in training mode is scored without dropout and handed back in training mode; a model already in
    eval mode (the server's, every call) is not walked module by module again."""
    from lora_rm.evaluation.evaluate import sequence_rewards

    model = load_base_model(str(tiny_gpt2), 0, seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.9  # in training mode, rewards would differ from call to call
    seqs = [[5, 6, 7, 8], [9, 10, 11]]
    model.train()
    first, second = sequence_rewards(model, seqs, 0), sequence_rewards(model, seqs, 0)
    assert torch.equal(first, second) and model.training
    assert all(m.training for m in model.modules())
    model.eval()
    calls = []
    model.train = lambda mode=True: calls.append(mode)  # eval() is train(False)
    assert torch.equal(sequence_rewards(model, seqs, 0), first) and calls == []


@pytest.mark.parametrize(
    "loss, margin_std, flagged",
    [(math.log(2), 0.0, True), (0.6931, 0.05, True), (0.6837, 0.78, False), (0.60, 0.0, False)],
)
def test_only_equal_rewards_are_flagged_as_not_learned(loss, margin_std, flagged):
    """Near ln 2 with margins spread wide is a model that learned a hard task a little (SmolLM2 on HH)."""
    from lora_rm.evaluation.evaluate import chance_warning

    assert (chance_warning(loss, margin_std) is not None) is flagged


def test_rewards_that_do_not_spread_write_no_reward_stats(tiny_gpt2, tmp_path):
    """std 0 would make normalised scores divide by zero, and a folder holding it is refused on load."""
    tokenizer = load_tokenizer(str(tiny_gpt2))
    model = load_base_model(str(tiny_gpt2), tokenizer.pad_token_id, seed=0)
    torch.nn.init.zeros_(model.score.weight)  # every reward 0
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    pairs = [EncodedPair([5, 6, 0], [7, 0]), EncodedPair([8, 0], [9, 10, 0])]
    logs = []
    report = write_full_eval(model, tokenizer, pairs, tmp_path / "eval", [model_dir], log=logs.append)
    assert report["reward_stats"]["std"] == 0
    assert (
        not (tmp_path / "eval" / "reward_stats.json").exists()
        and not (model_dir / "reward_stats.json").exists()
    )
    assert any("do not spread" in line and "no reward_stats.json" in line for line in logs)
    assert (tmp_path / "eval" / "eval.json").is_file()
