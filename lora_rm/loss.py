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
    abs_margin_sum: float = 0.0  # how far apart chosen and rejected are scored, whichever is ahead
    nonfinite: int = 0  # pairs whose loss was NaN or infinite (their step is dropped)

    def add(self, r_chosen: torch.Tensor, r_rejected: torch.Tensor, losses: torch.Tensor) -> None:
        diff = r_chosen.float() - r_rejected.float()
        self.n_pairs += diff.numel()
        self.loss_sum += losses.float().sum().item()
        self.correct += int((diff > 0).sum().item())
        self.ties += int((diff == 0).sum().item())
        self.margin_sum += diff.sum().item()
        self.abs_margin_sum += diff.abs().sum().item()
        self.nonfinite += int((~torch.isfinite(losses.detach().float())).sum().item())

    def summary(self) -> dict[str, float | int]:
        n = max(self.n_pairs, 1)
        return {
            "loss": self.loss_sum / n,
            "accuracy": (self.correct + 0.5 * self.ties) / n,
            "ties": self.ties,
            "mean_margin": self.margin_sum / n,
            "mean_abs_margin": self.abs_margin_sum / n,
            "n_pairs": self.n_pairs,
        }


def loss_near_chance(loss: float, tolerance: float = 0.01) -> bool:
    """True when the loss sits at ln 2. Not proof of equal rewards on its own: wide margins of both signs give
    it too (a model that learned a hard task a little), so callers also ask that the margins be near 0."""
    return abs(loss - LN2) < tolerance


# Ranked lists of K responses, best first. Both listwise objectives equal `pairwise_loss` at K = 2.


def all_pairs_loss(rewards: torch.Tensor) -> torch.Tensor:
    """InstructGPT's loss for one ranking `rewards` [K] (best first): the mean over its K-choose-2 pairs
    (i < j) of `-logsigmoid(r_i - r_j)`, so the ranking counts once whatever K is. Scalar, fp32."""
    r = rewards.float()
    i, j = torch.triu_indices(r.numel(), r.numel(), offset=1, device=r.device)
    return -F.logsigmoid(r[i] - r[j]).mean()


def plackett_luce_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of the order of `rewards` [K] (best first):
    `sum_i -log softmax(r_i, ..., r_K)[0]`, i.e. each item in turn is picked among those left. Scalar, fp32."""
    return plackett_luce_terms(rewards).sum()


def plackett_luce_terms(rewards: torch.Tensor) -> torch.Tensor:
    """The K-1 terms `logsumexp(r_i..r_K) - r_i` of `plackett_luce_loss`, one per choice (the last is 0)."""
    r = rewards.float()
    tail_lse = torch.logcumsumexp(r.flip(0), dim=0).flip(0)  # logsumexp of r[i:] for each i
    return (tail_lse - r)[:-1]


def chain_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-pair Plackett-Luce terms, shape [B], for rankings laid out as chains of adjacent pairs.

    A ranking of K responses arrives as the pairs (1, 2), (2, 3), ..., (K-1, K) in order, all with the
    same `group` id: its rewards are the chosen sides followed by the last rejected side, and pair i gets
    the term of choice i. A pair whose group is negative (or unique in the batch) is a ranking of two,
    whose term is the pairwise loss. A chain cut across batches is treated as the sub-ranking present.
    """
    out = torch.empty(r_chosen.shape, dtype=torch.float32, device=r_chosen.device)
    for g in torch.unique(group).tolist():
        idx = torch.nonzero(group == g).flatten()
        if g < 0:
            out[idx] = pairwise_loss(r_chosen[idx], r_rejected[idx])
        else:
            out[idx] = plackett_luce_terms(torch.cat([r_chosen[idx], r_rejected[idx[-1:]]]))
    return out


def batch_losses(
    kind: str,
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    group: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair training losses [B] for the objective `kind`; the caller weights and normalises them.

    "plackett_luce" reads rankings from chains of pairs (see `chain_losses`; margins do not apply);
    every other kind is `pairwise_loss`: "all_pairs" differs only in the pair weights it is given.
    """
    if kind == "plackett_luce" and group is not None:
        losses = chain_losses(r_chosen, r_rejected, group)
        if center_coefficient:
            losses = losses + center_coefficient * (r_chosen.float() + r_rejected.float()) ** 2
        return losses
    return pairwise_loss(r_chosen, r_rejected, margin, center_coefficient)
