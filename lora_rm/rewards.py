"""Read rewards from a reward model: one scalar per row at its last attended token, for plain padded rows and
for prefix-shared / packed rows (4D mask, flat indices), and the probe that decides whether a model can take
the packed layout."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from lora_rm.batch import PackedBatch, PackedCollator, PreferenceBatch, PreferenceCollator
from lora_rm.encode import EncodedPair
from lora_rm.model import head_name, unwrap_model


@contextlib.contextmanager
def _capture_output(module: torch.nn.Module):
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


def compute_rewards(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One scalar reward per row, read where transformers' `*ForSequenceClassification` reads it: the
    rightmost token that is not the pad id. Shape [N].

    The head's per-token output is captured and pooled here rather than taken from `.logits`, so that packed
    rows can be read too, and an attention-masked row (rows are padded on the right) is pooled among its
    attended tokens; a row whose attended tokens are all pad ids is read at its last one. lora_rm's own
    sequences never end in a pad id (`lora_rm.sequences`), so this is their last token. Encoders, whose head
    already sees one pooled vector, are returned as they are.
    With a 4D `attention_mask` (packed rows), `index` gives the flat positions (into rows x tokens) to
    read, one reward each. Raises ValueError for a row with no attended token.
    """
    if index is None:
        lengths = attention_mask.sum(dim=-1)
        if bool((lengths == 0).any()):
            raise ValueError("a row has no attended tokens: empty sequences have no reward")
    with _capture_output(getattr(unwrap_model(model), head_name(model))) as captured:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    per_token = captured[-1]
    if index is not None:
        return per_token.reshape(-1)[index]
    if per_token.dim() == 3:  # [N, T, 1]: decoder head on every position
        return per_token[
            torch.arange(per_token.shape[0], device=per_token.device),
            last_read(model, input_ids, attention_mask),
            0,
        ]
    return outputs.logits[:, 0]


def last_read(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The position each row's reward is read at: its rightmost attended token that is not the pad id
    (transformers' pooling), or its rightmost attended token if all of them are pad ids. Shape [N]."""
    pad = getattr(unwrap_model(model).config, "pad_token_id", None)
    attended = attention_mask.bool()
    readable = attended & (input_ids != pad) if pad is not None else attended
    readable = torch.where(readable.any(dim=-1, keepdim=True), readable, attended)
    width = attention_mask.shape[-1]
    return width - 1 - readable.int().flip(-1).argmax(dim=-1)


def pair_rewards(model: Any, batch: PreferenceBatch | PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards) of a batch in either layout, from one forward."""
    if isinstance(batch, PackedBatch):
        index = torch.cat([batch.chosen_index, batch.rejected_index])
        rewards = compute_rewards(model, batch.input_ids, batch.attention_mask, batch.position_ids, index)
    else:
        rewards = compute_rewards(model, batch.input_ids, batch.attention_mask)
    return rewards[: batch.num_pairs], rewards[batch.num_pairs :]


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
