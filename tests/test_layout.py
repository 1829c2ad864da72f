"""Prefix-shared and packed rows give the plain path's rewards, loss and gradients; batch planning; the layout a run picks."""

from __future__ import annotations

import pytest
import torch

from lora_rm.data.batches import pair_cost, plan_length_grouped_batches
from lora_rm.data.encode import EncodedPair
from lora_rm.loss import pairwise_loss
from lora_rm.model import probe as probe_module
from lora_rm.model.collate import PackedBatch, PackedCollator, PreferenceCollator
from lora_rm.model.load import add_lora, load_base_model, load_tokenizer
from lora_rm.model.probe import packed_layout_works, probe_packed_layout, within_noise
from lora_rm.model.rewards import pair_rewards

EOS = 0
MAX_LEN = 64  # the tiny model's n_positions
# lora_rm's sequences end at the token the reward is read at (never a pad id); EOS == pad may occur inside
PAIRS = [
    EncodedPair([5, 6, 7, 8, 9], [5, 6, 7, 10], 0.5),  # shared prefix of 3
    EncodedPair([11, 12], [13, 14, 15]),  # no common prefix
    EncodedPair([5, 6], [5, 6, EOS, 7, 8]),  # chosen is a prefix of rejected
    EncodedPair([5, 6, 7, 8], [5, 6]),  # rejected is a prefix of chosen
    EncodedPair(
        [20 + i % 30 for i in range(MAX_LEN)],
        [20 + i % 30 for i in range(MAX_LEN - 1)] + [9],
    ),
]


@pytest.fixture(scope="module")
def model(tiny_gpt2):
    m = add_lora(load_base_model(str(tiny_gpt2), 0, seed=0), dropout=0.0)
    with torch.no_grad():  # non-zero LoRA B so every LoRA weight has a gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def _rewards_loss_grads(model, batch):
    model.zero_grad()
    r_c, r_r = pair_rewards(model, batch)
    loss = pairwise_loss(r_c, r_r, batch.margin).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.cat([r_c, r_r]).detach(), loss.detach(), grads


def test_packed_collator_layout_literal():
    batch = PackedCollator(pad_token_id=99, share_prefix=True)([PAIRS[0]])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert batch.chosen_index.tolist() == [4] and batch.rejected_index.tolist() == [5]
    mask = batch.attention_mask[0, 0].int()
    assert mask[5].tolist() == [1, 1, 1, 0, 0, 1]  # rejected suffix sees the prefix, not chosen's suffix
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0]  # chosen's last token sees prefix + its own suffix


def test_packing_puts_several_pairs_in_a_row_with_block_diagonal_masks():
    batch = PackedCollator(pad_token_id=99, share_prefix=True, row_tokens=11)(PAIRS[:3])
    assert batch.input_ids.shape[0] == 2  # 6 + 5 tokens fit one row of 11, the third pair starts a new row
    mask = batch.attention_mask[0, 0]
    assert not mask[6:, :6].any() and not mask[:6, 6:].any()
    assert batch.position_ids[0, 6:11].tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize(
    "share, row_tokens", [(True, None), (False, None), (True, 2 * MAX_LEN), (False, 2 * MAX_LEN)]
)
def test_layouts_match_plain_rewards_loss_and_gradients(model, share, row_tokens):
    plain = _rewards_loss_grads(model, PreferenceCollator(EOS)(PAIRS))
    other = _rewards_loss_grads(model, PackedCollator(EOS, share_prefix=share, row_tokens=row_tokens)(PAIRS))
    torch.testing.assert_close(other[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other[1], plain[1], rtol=1e-5, atol=1e-6)
    for name, grad in plain[2].items():
        torch.testing.assert_close(
            other[2][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_probe_accepts_gpt2_and_rejects_an_encoder(model, tiny_bert):
    assert packed_layout_works(model, PAIRS[:2], EOS)
    tokenizer = load_tokenizer(str(tiny_bert))
    bert = add_lora(load_base_model(str(tiny_bert), tokenizer.pad_token_id, seed=0))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    pairs = [
        EncodedPair([cls, 5, 6, 7, sep], [cls, 5, 6, 8, 9, sep]),
        EncodedPair([cls, 10, sep], [cls, 11, 12, sep]),
    ]
    assert not packed_layout_works(bert, pairs, tokenizer.pad_token_id)


@pytest.mark.parametrize(
    "packed_diff, noise_floor, scale, exact",
    [
        (1e-7, 0.0, 1.0, True),  # fp32: no batch noise, packed equal to rounding
        (1.9e-3, 0.0, 1.0, True),  # within 2e-3 of the reward scale
        (2.1e-3, 0.0, 1.0, False),  # ... and no further without noise
        (0.08, 0.08, 1.0, True),  # int8: packed deviates as much as another plain batching does
        (0.24, 0.08, 1.0, True),  # up to 3x the floor (+ 2e-3 x scale)
        (0.25, 0.08, 1.0, False),
        (0.78, 0.08, 1.0, False),  # a mask ignored: ~10x the floor
        (float("inf"), 0.1, 1.0, False),  # the model raised on packed rows
    ],
)
def test_packed_is_judged_against_the_noise_floor(packed_diff, noise_floor, scale, exact):
    assert within_noise(packed_diff, noise_floor, scale) is exact


@pytest.mark.parametrize("packed_noise, accepted", [(0.05, True), (2.0, False)])
def test_probe_measures_batch_to_batch_noise(monkeypatch, model, packed_noise, accepted):
    """A model whose rewards move by up to 0.05 in every batch (as LLM.int8's do): packed rows that move
    like plain ones pass, packed rows that move far more do not."""
    generator = torch.Generator().manual_seed(0)
    exact_rewards = probe_module.pair_rewards

    def noisy(model, batch):
        amplitude = packed_noise if isinstance(batch, PackedBatch) else 0.05
        return tuple(
            r + amplitude * (2 * torch.rand(r.shape, generator=generator) - 1)
            for r in exact_rewards(model, batch)
        )

    monkeypatch.setattr(probe_module, "pair_rewards", noisy)
    probe = probe_packed_layout(model, PAIRS[:4], EOS)
    assert probe.noise_floor > 0.01  # measured, not assumed
    assert probe.packed_diff > probe_module.SCALE_EPSILON * probe.scale  # a fixed tolerance would refuse both
    assert probe.exact is accepted


def test_pair_cost():
    assert pair_cost(PAIRS[0], share_prefix=True) == 3 + 2 + 1
    assert pair_cost(PAIRS[0], share_prefix=False) == 2 * 5


def test_grouped_batches_cover_every_pair_once_and_are_deterministic():
    costs = [(i * 37) % 101 + 1 for i in range(500)]
    a = plan_length_grouped_batches(costs, 8, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(500))
    assert a == plan_length_grouped_batches(costs, 8, seed=1, epoch=0)
    assert a != plan_length_grouped_batches(costs, 8, seed=1, epoch=1)
    assert all(len(b) <= 8 for b in a)


def test_grouping_cuts_padding():
    costs = [(i * 37) % 101 + 1 for i in range(800)]
    padded = lambda batches: sum(len(b) * max(costs[i] for i in b) for b in batches)  # noqa: E731
    grouped = plan_length_grouped_batches(costs, 8, seed=0, epoch=0)
    random = [list(range(i, i + 8)) for i in range(0, 800, 8)]
    assert padded(grouped) < 0.6 * padded(random)


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_is_respected(packed):
    costs = [(i * 37) % 101 + 1 for i in range(300)]
    batches = plan_length_grouped_batches(costs, 8, seed=0, epoch=0, max_tokens=400, packed=packed)
    for b in batches:
        used = sum(costs[i] for i in b) if packed else len(b) * max(costs[i] for i in b)
        assert used <= 400 or len(b) == 1
    assert sorted(i for b in batches for i in b) == list(range(300))


def _layout(base, quant="none", **options):
    from lora_rm.data.encode import EncodedPair
    from lora_rm.model.load import add_lora, load_base_model, load_tokenizer
    from lora_rm.training.layout import choose_layout

    tokenizer = load_tokenizer(str(base))
    model = add_lora(load_base_model(str(base), tokenizer.pad_token_id, quant=quant, seed=0), dropout=0.0)
    end = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []  # an encoder's own suffix
    pairs = [EncodedPair([5, 6, 7, 8 + i, *end], [5, 6, 9, *end]) for i in range(6)]
    from lora_rm.config import TrainConfig

    cfg = TrainConfig(base=str(base), dataset="unused.jsonl", batch_size=4, **options)
    lines = []
    layout = choose_layout(cfg, model, pairs, tokenizer.pad_token_id, 48, lines.append)
    return layout.collator, layout.epoch_batches, lines


@pytest.mark.parametrize("quant", ["none", "8bit"])
def test_causal_decoders_default_to_packed_prefix_shared_rows(tiny_gpt2, quant):
    from lora_rm.model.collate import PackedCollator

    collator, plan_epoch, lines = _layout(tiny_gpt2, quant)
    assert isinstance(collator, PackedCollator)
    assert (collator.share_prefix, collator.row_tokens) == (True, 48)  # rows of up to max_length tokens
    line = next(line for line in lines if line.startswith("layout:"))
    assert line.startswith(
        "layout: packed prefix-shared rows, length-grouped pair-count batches (packed vs plain"
    )
    assert "noise floor between plain batchings" in line
    assert sorted(i for batch in plan_epoch(0) for i in batch) == list(range(6))


@pytest.mark.parametrize(
    "options, layout",
    [
        ({"packing": "off"}, (True, None)),
        ({"share_prefix": "off"}, "plain"),
        ({"share_prefix": "off", "packing": "on"}, (False, 48)),
    ],
)
def test_layout_modes_can_be_switched_off_and_on(tiny_gpt2, options, layout):
    from lora_rm.model.collate import PreferenceCollator

    collator, _, _ = _layout(tiny_gpt2, **options)
    if layout == "plain":
        assert isinstance(collator, PreferenceCollator)
    else:
        assert (collator.share_prefix, collator.row_tokens) == layout


def test_encoders_fall_back_to_plain_rows_and_refuse_forced_packing(tiny_bert):
    from lora_rm.errors import UserError
    from lora_rm.model.collate import PreferenceCollator

    collator, _, lines = _layout(tiny_bert)
    assert isinstance(collator, PreferenceCollator)
    assert any("cannot take prefix-shared rows (4D mask; the model rejects it)" in line for line in lines)
    with pytest.raises(UserError, match="packing forced on"):
        _layout(tiny_bert, packing="on")
