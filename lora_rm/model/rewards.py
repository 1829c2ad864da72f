"""Read rewards from a reward model: one scalar per row at its last attended token, for plain padded rows and
for prefix-shared / packed rows (4D mask, flat indices). Whether a model can take the packed layout is
`lora_rm.model.probe`'s question."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from lora_rm.model.collate import PackedBatch, PreferenceBatch
from lora_rm.model.load import head_name, unwrap_model


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
    sequences never end in a pad id (`lora_rm.data.sequences`), so this is their last token. Encoders, whose head
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
