"""The pairwise (Bradley-Terry) loss and the pair statistics reported with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss `-logsigmoid(r_c - r_r - margin) + c * (r_c + r_r)^2`, shape [B], in fp32.

    Computed in fp32 whatever the forward's precision: logsigmoid of a bf16/fp16 difference loses the
    small margins that carry the gradient late in training. Returned per pair (not averaged) so the
    caller can normalise by the number of pairs in a whole accumulation window.
    The centering term (Eisenstein et al. 2023) keeps rewards near zero without changing rankings.
    """
    r_chosen, r_rejected = r_chosen.float(), r_rejected.float()
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen + r_rejected) ** 2
    return loss


@dataclass
class PairStats:
    """Running sums over evaluated pairs; `accuracy` counts a tie as half right."""

    n_pairs: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    ties: int = 0
    margin_sum: float = 0.0

    def add(self, r_chosen: torch.Tensor, r_rejected: torch.Tensor, losses: torch.Tensor) -> None:
        diff = r_chosen.float() - r_rejected.float()
        self.n_pairs += diff.numel()
        self.loss_sum += losses.float().sum().item()
        self.correct += int((diff > 0).sum().item())
        self.ties += int((diff == 0).sum().item())
        self.margin_sum += diff.sum().item()

    def summary(self) -> dict[str, float | int]:
        n = max(self.n_pairs, 1)
        return {
            "loss": self.loss_sum / n,
            "accuracy": (self.correct + 0.5 * self.ties) / n,
            "ties": self.ties,
            "mean_margin": self.margin_sum / n,
            "n_pairs": self.n_pairs,
        }


def loss_near_chance(loss: float, tolerance: float = 0.01) -> bool:
    """True when the loss sits at ln 2: the model gives chosen and rejected (almost) the same reward."""
    return abs(loss - LN2) < tolerance
