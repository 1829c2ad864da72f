"""lora_rm.model.rewards: one reward per row, read at the token transformers' sequence classification reads."""

from __future__ import annotations

import pytest
import torch
from test_model import _model

from lora_rm.data.encode import EncodedPair
from lora_rm.model.collate import PreferenceCollator
from lora_rm.model.rewards import compute_rewards


def test_reward_is_read_where_transformers_reads_it(tiny_gpt2):
    model, tokenizer = _model(tiny_gpt2, dropout=0.0)
    model.eval()
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    short, long = [5, 6], [5, 6, 7, 8]
    batch = PreferenceCollator(tokenizer.pad_token_id)([EncodedPair(short, long)])
    assert batch.input_ids.tolist() == [[5, 6, eos, eos], [5, 6, 7, 8]]
    captured = []
    head = model.get_base_model().score
    handle = head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        rewards = compute_rewards(model, batch.input_ids, batch.attention_mask)
        builtin = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
        alone = [
            compute_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
            for s in (short, long)
        ]
    handle.remove()
    per_token = captured[0][..., 0]
    # pooled index: position 1 for the padded row, 3 for the full row: the last real token of each
    assert rewards[0] == per_token[0, 1] and rewards[1] == per_token[1, 3]
    torch.testing.assert_close(rewards, builtin, rtol=0, atol=0)
    torch.testing.assert_close(rewards, torch.cat(alone), rtol=1e-5, atol=1e-6)


def test_attended_trailing_pad_ids_are_skipped_as_transformers_does(tiny_gpt2):
    # a caller's own ids ending in EOS == pad, attended: transformers reads the token before them, so does lora_rm
    model, tokenizer = _model(tiny_gpt2, dropout=0.0)
    model.eval()
    eos = tokenizer.eos_token_id
    ids = torch.tensor([[5, 6, 7, eos, eos], [5, eos, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        rewards = compute_rewards(model, ids, mask)
        builtin = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        cut = compute_rewards(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(rewards, builtin, rtol=0, atol=0)
    torch.testing.assert_close(rewards[:1], cut, rtol=1e-5, atol=1e-6)
    # a row of pad ids only is read at its last attended token (transformers: position 0; no lora_rm
    # sequence is ever like this, see test_encode)
    with torch.no_grad():
        only_pad = compute_rewards(model, torch.tensor([[eos, eos, 5]]), torch.tensor([[1, 1, 0]]))
        first = compute_rewards(model, torch.tensor([[eos, eos]]), torch.tensor([[1, 1]]))
    torch.testing.assert_close(only_pad, first)


def test_empty_row_is_rejected(tiny_gpt2):
    model, _ = _model(tiny_gpt2)
    with pytest.raises(ValueError, match="no attended tokens"):
        compute_rewards(model, torch.tensor([[3, 4], [0, 0]]), torch.tensor([[1, 1], [0, 0]]))
