"""pairwise_loss and PairStats against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rm.loss import (
    LN2,
    PairStats,
    all_pairs_loss,
    batch_losses,
    chain_losses,
    loss_near_chance,
    pairwise_loss,
    plackett_luce_loss,
    plackett_luce_terms,
)

# -log(sigmoid(x)) = log(1 + exp(-x)), worked out by hand:
NLS_1 = 0.31326169  # x = 1
NLS_0 = 0.69314718  # x = 0 (ln 2)
NLS_HALF = 0.47407698  # x = 0.5
NLS_MINUS_1 = 1.31326169  # x = -1


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_hand_worked_values():
    loss = pairwise_loss(t(1.0, 0.0), t(0.0, 0.0))
    torch.testing.assert_close(loss, t(NLS_1, NLS_0), rtol=0, atol=1e-6)


def test_result_is_per_pair_not_averaged():
    loss = pairwise_loss(t(1.0, 0.0, -1.0), t(0.0, 0.0, 0.0))
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, t(NLS_1, NLS_0, NLS_MINUS_1), rtol=0, atol=1e-6)


def test_only_the_difference_matters():
    loss = pairwise_loss(t(11.0, -4.0), t(10.0, -4.0))
    torch.testing.assert_close(loss, t(NLS_1, NLS_0), rtol=0, atol=1e-5)


def test_margin_is_subtracted_from_the_difference():
    # diff - margin = [1 - 0.5, 0 - (-1)] = [0.5, 1]
    loss = pairwise_loss(t(1.0, 0.0), t(0.0, 0.0), margin=t(0.5, -1.0))
    torch.testing.assert_close(loss, t(NLS_HALF, NLS_1), rtol=0, atol=1e-6)


def test_zero_margin_equals_no_margin():
    r_c, r_r = t(0.3, -1.2, 2.0), t(0.1, 0.4, 2.5)
    torch.testing.assert_close(pairwise_loss(r_c, r_r, margin=t(0.0, 0.0, 0.0)), pairwise_loss(r_c, r_r))


def test_center_coefficient_adds_squared_sum():
    # diffs [1, -1]; (r_c + r_r)^2 = [1, 25]; 0.01 * that = [0.01, 0.25]
    loss = pairwise_loss(t(1.0, 2.0), t(0.0, 3.0), center_coefficient=0.01)
    torch.testing.assert_close(loss, t(NLS_1 + 0.01, NLS_MINUS_1 + 0.25), rtol=0, atol=1e-6)


def test_center_coefficient_zero_adds_nothing():
    loss = pairwise_loss(t(1.0, 2.0), t(0.0, 3.0), center_coefficient=0.0)
    torch.testing.assert_close(loss, t(NLS_1, NLS_MINUS_1), rtol=0, atol=1e-6)


def test_margin_and_center_together():
    # diff - margin = [1 - 1, -1 - (-2)] = [0, 1]; 0.1 * (r_c + r_r)^2 = 0.1 * [1, 25]
    loss = pairwise_loss(t(1.0, 2.0), t(0.0, 3.0), margin=t(1.0, -2.0), center_coefficient=0.1)
    torch.testing.assert_close(loss, t(NLS_0 + 0.1, NLS_1 + 2.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_is_float32_for_half_inputs(dtype):
    loss = pairwise_loss(t(1.0, 0.0, dtype=dtype), t(0.0, 0.0, dtype=dtype), margin=t(0.5, -1.0, dtype=dtype))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, t(NLS_HALF, NLS_1), rtol=0, atol=1e-6)


def test_small_bf16_difference_is_not_rounded_away():
    # 100.0 and 100.5 are exact in bf16; their difference, 0.5, must reach logsigmoid intact.
    loss = pairwise_loss(t(100.5, dtype=torch.bfloat16), t(100.0, dtype=torch.bfloat16))
    torch.testing.assert_close(loss, t(NLS_HALF), rtol=0, atol=1e-6)


def test_numerically_stable_for_large_differences():
    loss = pairwise_loss(t(-100.0, 100.0), t(0.0, 0.0))
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(100.0, abs=1e-4)
    assert 0.0 <= loss[1].item() < 1e-30


def test_gradient_at_equal_rewards():
    r_c = t(0.0, 2.0).requires_grad_()
    r_r = t(0.0, 2.0).requires_grad_()
    pairwise_loss(r_c, r_r).sum().backward()
    # d/d r_c of -logsigmoid(r_c - r_r) at 0 is -sigmoid(0) = -0.5, and +0.5 for r_r
    torch.testing.assert_close(r_c.grad, t(-0.5, -0.5))
    torch.testing.assert_close(r_r.grad, t(0.5, 0.5))


def test_gradient_flows_back_to_bf16_inputs():
    r_c = t(1.0, dtype=torch.bfloat16).requires_grad_()
    r_r = t(0.0, dtype=torch.bfloat16).requires_grad_()
    pairwise_loss(r_c, r_r).sum().backward()
    assert r_c.grad.dtype == torch.bfloat16
    # -sigmoid(-1) = -0.26894142
    assert r_c.grad.float().item() == pytest.approx(-0.26894142, abs=2e-3)
    assert r_r.grad.float().item() == pytest.approx(0.26894142, abs=2e-3)


def test_ln2_constant():
    assert pytest.approx(0.69314718, abs=1e-8) == LN2


# ---------------------------------------------------------------- PairStats


def test_pair_stats_ties_count_half_and_are_reported():
    stats = PairStats()
    # diffs [1, 0, -1, 0]: one right, one wrong, two ties
    stats.add(t(1.0, 0.0, 0.0, 2.0), t(0.0, 0.0, 1.0, 2.0), t(0.1, 0.2, 0.3, 0.4))
    s = stats.summary()
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["ties"] == 2
    assert s["n_pairs"] == 4
    assert s["loss"] == pytest.approx(0.25)
    assert s["mean_margin"] == pytest.approx(0.0)


def test_pair_stats_accumulates_over_batches():
    stats = PairStats()
    stats.add(t(3.0, 1.0), t(1.0, 0.0), t(1.0, 2.0))  # diffs [2, 1]
    stats.add(
        t(
            0.0,
        ),
        t(
            4.0,
        ),
        t(
            6.0,
        ),
    )  # diff [-4]
    s = stats.summary()
    assert s["n_pairs"] == 3
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["ties"] == 0
    assert s["loss"] == pytest.approx(3.0)
    assert s["mean_margin"] == pytest.approx(-1 / 3)


def test_pair_stats_all_ties_is_chance():
    stats = PairStats()
    stats.add(t(0.5, 0.5, 0.5), t(0.5, 0.5, 0.5), t(LN2, LN2, LN2))
    s = stats.summary()
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["ties"] == 3


def test_pair_stats_compares_bf16_rewards_in_float():
    stats = PairStats()
    stats.add(t(1.0, 1.0, dtype=torch.bfloat16), t(0.5, 2.0, dtype=torch.bfloat16), t(0.0, 0.0))
    s = stats.summary()
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["mean_margin"] == pytest.approx((0.5 - 1.0) / 2)


def test_empty_pair_stats_summary_does_not_divide_by_zero():
    s = PairStats().summary()
    assert s["n_pairs"] == 0
    assert s["loss"] == 0.0
    assert s["accuracy"] == 0.0


# ---------------------------------------------------------------- loss_near_chance


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (0.69314718, True),
        (0.6931, True),
        (0.70, True),
        (0.686, True),
        (0.71, False),
        (0.60, False),
        (0.05, False),
        (1.5, False),
    ],
)
def test_loss_near_chance(loss, expected):
    assert loss_near_chance(loss) is expected


def test_loss_near_chance_tolerance():
    assert loss_near_chance(math.log(2) + 0.05, tolerance=0.1)
    assert not loss_near_chance(math.log(2) + 0.05, tolerance=0.01)


# Ranked lists, best first. For r = [2, 1, 0]:
#   Plackett-Luce: [log(e^2 + e^1 + e^0) - 2] + [log(e^1 + e^0) - 1] = 0.40760596 + 0.31326169 = 0.72086765
#   all pairs: mean of -logsigmoid over (2-1, 2-0, 1-0) = (0.31326169 + 0.12692801 + 0.31326169) / 3 = 0.25115046
PL_TERMS_210 = (0.40760596, 0.31326169)
ALL_PAIRS_210 = 0.25115046


def test_plackett_luce_hand_worked():
    r = t(2.0, 1.0, 0.0)
    torch.testing.assert_close(plackett_luce_terms(r), t(*PL_TERMS_210), rtol=0, atol=1e-6)
    assert plackett_luce_loss(r).item() == pytest.approx(sum(PL_TERMS_210), abs=1e-6)
    # the reversed order is far less likely: [log(1 + e + e^2) - 0] + [log(e + e^2) - 1] = 3.72086765
    assert plackett_luce_loss(t(0.0, 1.0, 2.0)).item() == pytest.approx(3.72086765, abs=1e-6)


def test_all_pairs_hand_worked():
    assert all_pairs_loss(t(2.0, 1.0, 0.0)).item() == pytest.approx(ALL_PAIRS_210, abs=1e-6)


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (0.0, 0.0), (-1.0, 0.0), (3.5, -2.25)])
def test_listwise_losses_reduce_to_pairwise_at_two(a, b):
    pair = pairwise_loss(t(a), t(b)).item()
    assert plackett_luce_loss(t(a, b)).item() == pytest.approx(pair, abs=1e-6)
    assert all_pairs_loss(t(a, b)).item() == pytest.approx(pair, abs=1e-6)


def test_chain_losses_read_each_list_back_from_its_adjacent_pairs():
    # list 7: rewards [2, 1, 0] as pairs (2, 1), (1, 0); a plain pair (group -1); list 3: [0.5, 1.5]
    r_c, r_r, group = t(2.0, 1.0, 1.0, 0.5), t(1.0, 0.0, 0.0, 1.5), torch.tensor([7, 7, -1, 3])
    expected = t(*PL_TERMS_210, NLS_1, pairwise_loss(t(0.5), t(1.5)).item())
    torch.testing.assert_close(chain_losses(r_c, r_r, group), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        batch_losses("plackett_luce", r_c, r_r, group=group), expected, rtol=0, atol=1e-6
    )
    # every other objective is the pairwise loss per pair (all_pairs differs in the weights only)
    torch.testing.assert_close(batch_losses("all_pairs", r_c, r_r, group=group), pairwise_loss(r_c, r_r))


def test_chain_losses_have_the_plackett_luce_gradient():
    ranked = torch.tensor([0.3, -0.2, 0.9, 0.1], requires_grad=True)
    plackett_luce_loss(ranked).backward()
    expected = ranked.grad.clone()
    ranked.grad = None
    r_c, r_r = ranked[:-1], ranked[1:]  # the chain of pairs (0, 1), (1, 2), (2, 3)
    chain_losses(r_c, r_r, torch.tensor([0, 0, 0])).sum().backward()
    torch.testing.assert_close(ranked.grad, expected)
