"""Pairwise evaluation: loss, accuracy (ties count half) and mean reward margin."""

from __future__ import annotations

from typing import Any

import torch

from lora_rm.batch import PreferenceCollator, plan_batches
from lora_rm.encode import EncodedPair
from lora_rm.loss import PairStats, pairwise_loss
from lora_rm.model import pair_rewards


@torch.no_grad()
def evaluate(
    model: Any,
    pairs: list[EncodedPair],
    collator: PreferenceCollator,
    batch_size: int,
    accelerator: Any = None,
) -> dict[str, float | int]:
    """Loss, accuracy, ties, mean margin and pair count over `pairs`, gathered across processes.

    The loss here is the plain pairwise loss (margins applied, no centering term), so it is comparable
    across runs with different regularisation. The model is put back in training mode if it was.
    """
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    stats = PairStats()
    batches = plan_batches(len(pairs), batch_size, seed=0, epoch=0, shuffle=False)
    own = batches[rank::world]  # no padding: every pair is counted exactly once
    for idx in own:
        batch = collator([pairs[i] for i in idx]).to(device)
        r_c, r_r = pair_rewards(model, batch)
        stats.add(r_c, r_r, pairwise_loss(r_c, r_r, batch.margin))
    if world > 1:
        sums = torch.tensor(
            [stats.n_pairs, stats.loss_sum, stats.correct, stats.ties, stats.margin_sum],
            dtype=torch.float64,
            device=device,
        )
        sums = accelerator.reduce(sums, reduction="sum").tolist()
        stats = PairStats(int(sums[0]), sums[1], int(sums[2]), int(sums[3]), sums[4])
    model.train(was_training)
    return stats.summary()
