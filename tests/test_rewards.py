"""lora_rm.rewards: one reward per row, read at the last attended token."""

from __future__ import annotations

import pytest
import torch
from test_model import _model

from lora_rm.batch import PreferenceCollator
from lora_rm.encode import EncodedPair
from lora_rm.rewards import compute_rewards


def test_reward_is_read_at_the_last_real_token_when_pad_is_eos(tiny_gpt2):
    model, tokenizer = _model(tiny_gpt2, dropout=0.0)
    model.eval()
    eos = tokenizer.eos_token_id
    short, long = [5, 6, eos], [5, 6, 7, 8, eos]
    batch = PreferenceCollator(tokenizer.pad_token_id)([EncodedPair(short, long)])
    assert batch.input_ids.tolist() == [[5, 6, eos, eos, eos], [5, 6, 7, 8, eos]]
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
    # pooled index: position 2 (the EOS) for the padded row, 4 for the full row
    assert rewards[0] == per_token[0, 2] and rewards[1] == per_token[1, 4]
    torch.testing.assert_close(rewards, torch.cat(alone), rtol=1e-5, atol=1e-6)
    # transformers' own pooling searches for the rightmost non-pad id and so never reads an EOS == pad
    assert builtin[1] == per_token[1, 3]
    assert not torch.allclose(builtin, rewards)


def test_empty_row_is_rejected(tiny_gpt2):
    model, _ = _model(tiny_gpt2)
    with pytest.raises(ValueError, match="no attended tokens"):
        compute_rewards(model, torch.tensor([[3, 4], [0, 0]]), torch.tensor([[1, 1], [0, 0]]))
