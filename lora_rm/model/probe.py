"""The layout probe: whether a model gives plain rows' rewards from prefix-shared, packed rows, measured
against its own batch-to-batch noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_rm.data.encode import EncodedPair
from lora_rm.model.collate import PackedCollator, PreferenceCollator
from lora_rm.model.rewards import pair_rewards

# Packed rows pass the probe when they differ from plain rows by at most this many times the model's own
# batch-to-batch noise: a model that takes the 4D mask stays near the floor, one that ignores it lands far
# above (measurements: docs/performance.md, the layout probe).
NOISE_MULTIPLE = 3.0


# ... plus this share of the reward scale, for numerics that do not change with the batch (fp32: ~1e-7)
SCALE_EPSILON = 2e-3


@dataclass(frozen=True)
class LayoutProbe:
    """What `probe_packed_layout` measured on a few real pairs (eval mode, no grad)."""

    packed_diff: float  # max |packed - plain| over the probe's rewards; inf if the model rejects the layout
    noise_floor: float  # max |plain - plain| between two batchings (order, composition, padding) of the pairs
    scale: float  # max |plain reward|

    @property
    def exact(self) -> bool:
        return within_noise(self.packed_diff, self.noise_floor, self.scale)


def within_noise(packed_diff: float, noise_floor: float, scale: float) -> bool:
    """Whether packed rows give plain rows' rewards up to the model's own batch-to-batch noise.

    LLM.int8 picks its outlier columns from each batch's activations, so the same pair scores slightly
    differently in any two batchings; a fixed tolerance reads that noise as "ignores the 4D
    mask". The bar is `NOISE_MULTIPLE` x the measured floor plus `SCALE_EPSILON` x the reward scale.
    """
    return packed_diff <= NOISE_MULTIPLE * noise_floor + SCALE_EPSILON * (scale + 1e-3)


@torch.no_grad()
def probe_packed_layout(model: Any, pairs: list[EncodedPair], pad_token_id: int) -> LayoutProbe:
    """Score `pairs` as plain padded rows, as plain rows in another batching (reversed order, two batches),
    and as prefix-shared packed rows (4D mask + position ids), in eval mode.

    The second batching measures the noise floor the packed rows are judged against. A model that raises
    on the packed layout gets `packed_diff = inf`.
    """
    was_training = model.training
    model.eval()
    try:
        plain = torch.cat(pair_rewards(model, PreferenceCollator(pad_token_id)(pairs))).float()
        n, half = len(pairs), -(-len(pairs) // 2)
        order = list(reversed(range(n)))
        chosen, rejected = [], []
        for part in (order[:half], order[half:]):
            if part:
                c, r = pair_rewards(model, PreferenceCollator(pad_token_id)([pairs[i] for i in part]))
                chosen.append(c.float())
                rejected.append(r.float())
        back = torch.argsort(torch.tensor(order))
        other = torch.cat([torch.cat(chosen)[back], torch.cat(rejected)[back]])
        try:
            packed_collator = PackedCollator(pad_token_id, share_prefix=True, row_tokens=10**9)
            packed = torch.cat(pair_rewards(model, packed_collator(pairs))).float()
            packed_diff = float((packed - plain).abs().max())
        except Exception:  # a model that cannot take the layout at all
            packed_diff = float("inf")
    finally:
        model.train(was_training)
    return LayoutProbe(packed_diff, float((other - plain).abs().max()), float(plain.abs().max()))


def packed_layout_works(model: Any, pairs: list[EncodedPair], pad_token_id: int) -> bool:
    """Whether `model` gives plain rows' rewards from prefix-shared, packed rows, up to its own
    batch-to-batch noise (`probe_packed_layout`, `within_noise`). False for encoders (bidirectional
    attention) and for models that ignore or reject a 4D mask."""
    return probe_packed_layout(model, pairs, pad_token_id).exact
