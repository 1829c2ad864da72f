"""lora_rm.evaluation.metrics against small hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rm.evaluation.metrics import (
    average_ranks,
    calibration,
    length_bias,
    pairwise_summary,
    spearman,
    top1_accuracy,
)
from lora_rm.loss import pairwise_loss

LN3, LN4, LN9 = math.log(3.0), math.log(4.0), math.log(9.0)
# -log(sigmoid(x)) = log(1 + exp(-x)):
NLS = {1: 0.31326169, 0: 0.69314718, -1: 1.31326169, 3: 0.04858735}


# ---------------------------------------------------------------- pairwise_summary


def test_summary_hand_worked():
    # margins [1, 0, -1, 3]; sorted [-1, 0, 1, 3]
    s = pairwise_summary([2.0, 0.0, 1.0, 3.0], [1.0, 0.0, 2.0, 0.0])
    assert s["n_pairs"] == 4
    assert s["ties"] == 1
    assert s["accuracy"] == pytest.approx((2 + 0.5) / 4)
    assert s["loss"] == pytest.approx((NLS[1] + NLS[0] + NLS[-1] + NLS[3]) / 4, abs=1e-7)
    assert s["margin_mean"] == pytest.approx(0.75)
    # deviations 0.25, -0.75, -1.75, 2.25 -> squares sum 8.75, population variance 8.75 / 4
    assert s["margin_std"] == pytest.approx(math.sqrt(8.75 / 4))
    # linear interpolation at position q * 3 in the sorted margins
    assert s["margin_p05"] == pytest.approx(-0.85)
    assert s["margin_p25"] == pytest.approx(-0.25)
    assert s["margin_p50"] == pytest.approx(0.5)
    assert s["margin_p75"] == pytest.approx(1.5)
    assert s["margin_p95"] == pytest.approx(2.7)


def test_summary_loss_matches_pairwise_loss_and_takes_any_tensor_dtype():
    r_c = torch.tensor([0.5, -1.25, 3.0, 0.0], dtype=torch.bfloat16)
    r_r = torch.tensor([0.0, 0.75, -2.0, 0.0], dtype=torch.bfloat16)
    s = pairwise_summary(r_c, r_r)
    assert s["loss"] == pytest.approx(pairwise_loss(r_c, r_r).mean().item(), abs=1e-6)
    assert s["accuracy"] == pytest.approx((2 + 0.5) / 4)
    assert isinstance(s["n_pairs"], int) and isinstance(s["loss"], float)


def test_summary_one_pair_and_huge_margins_stay_finite():
    s = pairwise_summary([1000.0], [-1000.0])
    assert s["loss"] == pytest.approx(0.0) and s["margin_std"] == 0.0 and s["accuracy"] == 1.0
    assert pairwise_summary([-1000.0], [1000.0])["loss"] == pytest.approx(2000.0)


@pytest.mark.parametrize(
    ("r_c", "r_r", "message"),
    [
        ([], [], "no pairs"),
        ([1.0, 2.0], [1.0], "2 rewards"),
        ([1.0, float("nan")], [0.0, 0.0], "non-finite"),
        ([[1.0]], [[0.0]], "1-D"),
    ],
)
def test_summary_rejects_bad_input(r_c, r_r, message):
    with pytest.raises(ValueError, match=message):
        pairwise_summary(r_c, r_r)


# ---------------------------------------------------------------- calibration


def _nonempty(curve):
    return [b for b in curve if b["count"]]


def test_calibration_perfectly_calibrated_set_has_zero_ece():
    # 3 pairs at p = 0.75 and 1 at p = 0.25: predictions (0.75, 1) x3 (0.25, 0) x3 (0.25, 1) x1 (0.75, 0) x1
    result = calibration([LN3, LN3, LN3, 0.0], [0.0, 0.0, 0.0, LN3])
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result["n_pairs"] == 4
    low, high = _nonempty(result["curve"])
    assert (low["bin_lo"], low["bin_hi"], low["count"]) == pytest.approx((0.2, 0.3, 4))
    assert (low["mean_pred"], low["frac_pos"]) == pytest.approx((0.25, 0.25))
    assert (high["bin_lo"], high["bin_hi"], high["count"]) == pytest.approx((0.7, 0.8, 4))
    assert (high["mean_pred"], high["frac_pos"]) == pytest.approx((0.75, 0.75))


def test_calibration_overconfident_set_hand_worked_ece():
    # every pair at confidence 0.9 but only half right: 2 pairs p = 0.9, 2 pairs p = 0.1.
    # Bin [0.9, 1.0): 0.9 x4 (two label 1, two label 0) -> |0.9 - 0.5| = 0.4; bin [0.1, 0.2) likewise.
    result = calibration([LN9, LN9, 0.0, 0.0], [0.0, 0.0, LN9, LN9])
    assert result["ece"] == pytest.approx(0.4)
    low, high = _nonempty(result["curve"])
    assert (low["bin_lo"], low["count"], low["mean_pred"], low["frac_pos"]) == pytest.approx(
        (0.1, 4, 0.1, 0.5)
    )
    assert (high["bin_lo"], high["count"], high["mean_pred"], high["frac_pos"]) == pytest.approx(
        (0.9, 4, 0.9, 0.5)
    )


def test_calibration_underconfident_set_with_two_bins():
    # p = 0.8 and 0.7, both right: bin [0.5, 1): preds 0.8, 0.7 all label 1 -> |0.75 - 1| = 0.25;
    # bin [0, 0.5): preds 0.2, 0.3 all label 0 -> |0.25 - 0| = 0.25; ece = 0.5 * 0.25 + 0.5 * 0.25
    result = calibration([LN4, math.log(7 / 3)], [0.0, 0.0], bins=2)
    assert result["ece"] == pytest.approx(0.25)
    assert result["curve"] == [
        pytest.approx({"bin_lo": 0.0, "bin_hi": 0.5, "count": 2, "mean_pred": 0.25, "frac_pos": 0.0}),
        pytest.approx({"bin_lo": 0.5, "bin_hi": 1.0, "count": 2, "mean_pred": 0.75, "frac_pos": 1.0}),
    ]


def test_calibration_curve_lists_every_bin_and_counts_all_predictions():
    result = calibration([0.3, -2.0, 1.5, 0.0, 4.0], [0.0, 0.5, 0.0, 0.0, -1.0], bins=4)
    curve = result["curve"]
    assert [(b["bin_lo"], b["bin_hi"]) for b in curve] == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert sum(b["count"] for b in curve) == 10  # two predictions per pair
    for b in curve:
        assert (b["mean_pred"] is None) == (b["count"] == 0)


def test_calibration_extremes():
    assert calibration([0.0, 0.0], [0.0, 0.0])["ece"] == pytest.approx(0.0)  # always 0.5: calibrated
    assert calibration([1000.0], [0.0])["ece"] == pytest.approx(0.0)  # certain and right
    assert calibration([0.0], [1000.0])["ece"] == pytest.approx(1.0)  # certain and wrong
    with pytest.raises(ValueError, match="bins"):
        calibration([1.0], [0.0], bins=0)


# ---------------------------------------------------------------- spearman


def test_average_ranks():
    assert average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert average_ranks([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]


def test_spearman_hand_worked():
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: deviations [-1.5, 0, 0, 1.5] and [-1.5, 0.5, -0.5, 1.5]
    # -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = [-1, 1, -1, 1, 0] -> 1 - 24 / 120
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 1, 2, 2], [1, 2, 1, 2]) == pytest.approx(0.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), [30, 20, 10]) == pytest.approx(-1.0)


def test_spearman_undefined_and_bad_input():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="at least two"):
        spearman([1.0], [2.0])
    with pytest.raises(ValueError, match="x has 2 values but y has 3"):
        spearman([1, 2], [1, 2, 3])


# ---------------------------------------------------------------- length_bias


def test_length_bias_groups():
    r_c, r_r = [2.0, 0.0, 1.0, 5.0], [1.0, 1.0, 1.0, 0.0]
    len_c, len_r = [10, 20, 4, 7], [5, 8, 12, 7]
    # pair 0 chosen longer and right, pair 1 chosen longer and wrong, pair 2 chosen shorter and tied,
    # pair 3 same length (in neither group)
    result = length_bias(r_c, r_r, len_c, len_r)
    assert result["n_chosen_longer"] == 2 and result["accuracy_chosen_longer"] == pytest.approx(0.5)
    assert result["n_chosen_shorter"] == 1 and result["accuracy_chosen_shorter"] == pytest.approx(0.5)
    assert result["n_same_length"] == 1
    # pooled rewards [2, 0, 1, 5, 1, 1, 1, 0] -> ranks [7, 1.5, 4.5, 8, 4.5, 4.5, 4.5, 1.5]
    # pooled lengths [10, 20, 4, 7, 5, 8, 12, 7] -> ranks [6, 8, 1, 3.5, 2, 5, 7, 3.5]
    # sum of products of deviations -7.25, sums of squares 36.5 and 41.5
    assert result["reward_length_spearman"] == pytest.approx(-7.25 / math.sqrt(36.5 * 41.5))


def test_length_bias_empty_groups_give_none():
    result = length_bias([1.0, 2.0], [0.0, 0.0], [5, 5], [5, 5])
    assert result["accuracy_chosen_longer"] is None and result["n_chosen_longer"] == 0
    assert result["accuracy_chosen_shorter"] is None and result["n_chosen_shorter"] == 0
    assert result["n_same_length"] == 2
    assert math.isnan(result["reward_length_spearman"])  # all lengths equal
    only_longer = length_bias([1.0, 0.0], [0.0, 1.0], [9, 9], [3, 3])
    assert only_longer["accuracy_chosen_longer"] == pytest.approx(0.5)
    assert only_longer["accuracy_chosen_shorter"] is None


def test_length_bias_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="lengths"):
        length_bias([1.0, 2.0], [0.0, 0.0], [5], [5, 6])


# ---------------------------------------------------------------- top1_accuracy


def test_top1_accuracy_with_ties():
    assert top1_accuracy([[3, 1, 2]]) == 1.0
    assert top1_accuracy([[1, 3, 2]]) == 0.0
    assert top1_accuracy([[3, 3, 1]]) == pytest.approx(0.5)
    assert top1_accuracy([[2, 2, 2]]) == pytest.approx(1 / 3)
    assert top1_accuracy([[5]]) == 1.0
    lists = [[3, 1, 2], [1, 3, 2], [3, 3, 1], torch.tensor([2.0, 2.0, 2.0])]
    assert top1_accuracy(lists) == pytest.approx((1 + 0 + 0.5 + 1 / 3) / 4)


def test_top1_accuracy_rejects_empty():
    with pytest.raises(ValueError, match="no lists"):
        top1_accuracy([])
    with pytest.raises(ValueError, match=r"rewards_per_prompt\[1\] is empty"):
        top1_accuracy([[1.0], []])
