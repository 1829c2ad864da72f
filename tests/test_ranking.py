"""Ranked lists of K responses: format checks, expansion into weighted pairs, batching, per-list loss
normalisation in the accumulation window, and training with all_pairs and plackett_luce end to end."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from conftest import BAD, GOOD, PROMPTS, tiny_run_config, write_jsonl

from lora_rm.data.batches import plan_ranked_list_batches
from lora_rm.data.checks import check_rows, detect_format
from lora_rm.data.encode import EncodedPair, encode_rankings
from lora_rm.data.read import Row, load_rows
from lora_rm.errors import UserError
from lora_rm.loss import all_pairs_loss, pairwise_loss, plackett_luce_loss
from lora_rm.model.collate import PreferenceCollator
from lora_rm.model.load import add_lora, load_base_model, load_tokenizer
from lora_rm.model.rewards import compute_rewards
from lora_rm.training.loop import backward_window, train


def ranked_rows(n: int) -> list[dict]:
    """A helpful answer, then a vague one, then a rude one: the same order in every row."""
    return [
        {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "responses": [" " + GOOD[i % len(GOOD)], " " + BAD[1], " " + BAD[0]],
        }
        for i in range(n)
    ]


def test_ranking_format_is_detected_and_checked_per_row(tmp_path):
    rows = ranked_rows(6)
    rows[1]["responses"] = "just text"
    rows[2]["responses"] = [" sure"]
    rows[3]["responses"] = [" sure", "  "]
    rows[4]["responses"] = [" sure", " no", " sure"]
    rows[5]["prompt"] = None
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    loaded = load_rows(str(path))[0]
    assert detect_format(loaded, str(path)) == "ranking"
    with pytest.raises(UserError) as e:
        check_rows(loaded, "ranking", str(path))
    message = str(e.value)
    for expected in (
        f"{path}:2: responses: expected a list of at least 2 texts, best first, got 'just text'",
        f"{path}:3: responses: expected a list of at least 2 texts, best first, got 1",
        f"{path}:4: responses[1]: empty or whitespace-only text",
        f"{path}:5: responses[2]: identical to responses[0]",
        f"{path}:6: prompt: missing or null",
    ):
        assert expected in message
    assert f"{path}:1:" not in message


def test_ranked_lists_need_a_prompt():
    with pytest.raises(UserError, match="need a prompt column"):
        detect_format([Row("x:1", {"responses": ["a", "b"]})], "x")


@pytest.mark.parametrize(
    "loss, links, weight",
    [
        ("all_pairs", [(0, 1), (0, 2), (1, 2)], 1 / 3),
        ("pairwise", [(0, 1), (0, 2), (1, 2)], 1.0),
        ("plackett_luce", [(0, 1), (1, 2)], 1 / 2),
    ],
)
def test_rankings_expand_into_weighted_pairs_of_one_group(tiny_gpt2, loss, links, weight):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    rows = [Row(f"r:{i}", r) for i, r in enumerate(ranked_rows(2))]
    pairs, report = encode_rankings(rows, tokenizer, 64, loss=loss)
    assert report.pairs_in == len(pairs) == 2 * len(links)

    def seq(row: int, k: int) -> list[int]:
        text = rows[row].fields["prompt"] + rows[row].fields["responses"][k]
        return tokenizer(text)["input_ids"]

    expected = [EncodedPair(seq(g, i), seq(g, j), 0.0, weight, g) for g in (0, 1) for i, j in links]
    assert pairs == expected


def test_responses_identical_after_truncation_are_dropped(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    long = " " + " ".join(["mix"] * 80)
    rows = [Row("r:1", {"prompt": PROMPTS[0], "responses": [" sure" + long, " no" + long, " whatever"]})]
    pairs, report = encode_rankings(rows, tokenizer, 16)
    assert report.dropped_identical == ["r:1 (responses 0 and 1)"] and report.response_truncated == 3
    assert [p.weight for p in pairs] == [0.5, 0.5]  # each list still counts once


def test_group_batches_keep_each_list_together_in_order():
    groups = [0, 0, 0, None, 1, 1, None, 2, 2, 2, 2]
    batches = plan_ranked_list_batches(groups, batch_size=4, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    for units in ([0, 1, 2], [4, 5], [7, 8, 9, 10]):
        assert any(
            b[b.index(units[0]) : b.index(units[0]) + len(units)] == units for b in batches if units[0] in b
        )
    assert all(len(b) <= 4 for b in batches)
    assert batches == plan_ranked_list_batches(groups, batch_size=4, seed=3, epoch=0)


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    m = add_lora(load_base_model(str(tiny_gpt2), 0, seed=0), dropout=0.0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


LIST = [[5, 6, 7, 0], [5, 8, 0], [5, 9, 10, 0]]  # a ranked list of three sequences, best first
PLAIN = EncodedPair([11, 12, 0], [13, 0])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("loss", ["all_pairs", "plackett_luce"])
def test_window_counts_each_list_once(model, loss):
    """One ranked list and one plain pair in a window: the gradient is that of (list loss + pair loss) / 2,
    the list loss being the mean over its pairs (all_pairs) or Plackett-Luce / (K - 1), whatever the split."""
    links = [(0, 1), (0, 2), (1, 2)] if loss == "all_pairs" else [(0, 1), (1, 2)]
    pairs = [EncodedPair(LIST[i], LIST[j], 0.0, 1 / len(links), 0) for i, j in links] + [PLAIN]
    collate = PreferenceCollator(0)
    accelerator = Accelerator(cpu=True)

    model.zero_grad()
    ids = collate(
        [EncodedPair(LIST[0], LIST[1]), EncodedPair(LIST[2], PLAIN.chosen), EncodedPair(PLAIN.rejected, [0])]
    )
    r = compute_rewards(model, ids.input_ids, ids.attention_mask)
    ranked = torch.stack([r[0], r[3], r[1]])  # rows: chosen sides first, then rejected sides
    list_loss = all_pairs_loss(ranked) if loss == "all_pairs" else plackett_luce_loss(ranked) / 2
    ((list_loss + pairwise_loss(r[4:5], r[2:3]).sum()) / 2).backward()
    expected = _grads(model)

    # all_pairs may cut a list across micro-batches; a Plackett-Luce chain (pairs[:2]) stays whole
    for split in ([pairs], [pairs[:2], pairs[2:]]):
        model.zero_grad()
        backward_window(model, [collate(b) for b in split], accelerator, loss=loss)
        got = _grads(model)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss", ["all_pairs", "plackett_luce"])
@pytest.mark.integration
def test_training_on_ranked_lists(tmp_path, tiny_gpt2, loss):
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(40))
    cfg = tiny_run_config(
        tiny_gpt2, data, tmp_path / "run", loss=loss, batch_size=6, gradient_accumulation_steps=1, epochs=2
    )
    result = train(cfg, log=lambda *_: None)
    assert result.eval_metrics["n_pairs"] == 10 * 3  # eval sees every pair of its 10 lists
    report = json.loads((result.output_dir / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert report["n_pairs"] == 30 and report["ranking"]["n_lists"] == 10
    assert 0.0 <= report["ranking"]["top1_accuracy"] <= 1.0
    assert report["ranking"]["plackett_luce_loss"] > 0 and report["ranking"]["all_pairs_loss"] > 0
    saved = json.loads((result.adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    assert saved["data_format"] == "ranking" and saved["loss"] == loss
