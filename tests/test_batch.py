"""PreferenceCollator tensors, and the batch plan/sharding used by the training loop."""

from __future__ import annotations

import pickle

import pytest
import torch

from lora_rm.data.batches import plan_batches, shard_batches
from lora_rm.data.encode import EncodedPair
from lora_rm.model.collate import PreferenceBatch, PreferenceCollator

PAD = 9

# Two pairs of different lengths; the second rejected side contains the pad id as a real token, so the
# mask must come from the lengths, not from searching for the pad id.
PAIRS = [
    EncodedPair(chosen=[1, 2, 3], rejected=[4, 5], margin=0.5),
    EncodedPair(chosen=[6], rejected=[7, 8, 9, 10], margin=-1.0),
]


def test_collator_pads_on_the_right_chosen_rows_first():
    batch = PreferenceCollator(PAD)(PAIRS)
    assert isinstance(batch, PreferenceBatch)
    expected_ids = torch.tensor(
        [
            [1, 2, 3, 9],  # chosen 0
            [6, 9, 9, 9],  # chosen 1
            [4, 5, 9, 9],  # rejected 0
            [7, 8, 9, 10],  # rejected 1
        ]
    )
    expected_mask = torch.tensor(
        [
            [1, 1, 1, 0],
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 1],
        ]
    )
    assert batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.long
    assert torch.equal(batch.input_ids, expected_ids)
    assert torch.equal(batch.attention_mask, expected_mask)
    assert batch.margin.dtype == torch.float32
    assert torch.equal(batch.margin, torch.tensor([0.5, -1.0]))
    assert batch.num_pairs == 2


def test_collator_uses_its_pad_id():
    batch = PreferenceCollator(0)([EncodedPair([5, 6], [7])])
    assert batch.input_ids.tolist() == [[5, 6], [7, 0]]
    assert batch.attention_mask.tolist() == [[1, 1], [1, 0]]
    assert batch.margin.tolist() == [0.0]


def test_collator_equal_lengths_needs_no_padding():
    batch = PreferenceCollator(PAD)([EncodedPair([1, 2], [3, 4]), EncodedPair([5, 6], [7, 8])])
    assert batch.input_ids.tolist() == [[1, 2], [5, 6], [3, 4], [7, 8]]
    assert batch.attention_mask.tolist() == [[1, 1]] * 4


def test_batch_to_keeps_values():
    batch = PreferenceCollator(PAD)(PAIRS).to("cpu")
    assert batch.input_ids[3].tolist() == [7, 8, 9, 10]
    assert batch.margin.tolist() == [0.5, -1.0]


def test_collator_is_picklable():
    collator = pickle.loads(pickle.dumps(PreferenceCollator(PAD)))
    assert collator.pad_token_id == PAD
    batch = collator(PAIRS)
    assert batch.input_ids[1].tolist() == [6, 9, 9, 9]
    assert batch.attention_mask[1].tolist() == [1, 0, 0, 0]


# ---------------------------------------------------------------- plan_batches


def _flat(batches):
    return [i for b in batches for i in b]


def test_plan_is_deterministic_in_seed_and_epoch():
    assert plan_batches(50, 4, seed=3, epoch=2) == plan_batches(50, 4, seed=3, epoch=2)


def test_plan_does_not_depend_on_the_global_rng():
    torch.manual_seed(0)
    a = plan_batches(50, 4, seed=3, epoch=0)
    torch.manual_seed(12345)
    torch.rand(100)
    b = plan_batches(50, 4, seed=3, epoch=0)
    assert a == b


def test_plan_differs_across_epochs_and_seeds():
    e0 = plan_batches(50, 4, seed=3, epoch=0)
    assert e0 != plan_batches(50, 4, seed=3, epoch=1)
    assert e0 != plan_batches(50, 4, seed=4, epoch=0)


def test_plan_shuffles():
    assert _flat(plan_batches(50, 4, seed=3, epoch=0)) != list(range(50))


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_plan_covers_every_index_exactly_once(epoch):
    batches = plan_batches(10, 3, seed=1, epoch=epoch)
    assert sorted(_flat(batches)) == list(range(10))
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def test_plan_exact_multiple_has_no_short_batch():
    assert [len(b) for b in plan_batches(12, 4, seed=0, epoch=0)] == [4, 4, 4]


def test_plan_without_shuffle_keeps_order():
    assert plan_batches(10, 3, seed=1, epoch=5, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_plan_batch_larger_than_data():
    assert plan_batches(3, 8, seed=0, epoch=0, shuffle=False) == [[0, 1, 2]]
    assert plan_batches(0, 8, seed=0, epoch=0) == []


# ---------------------------------------------------------------- shard_batches

BATCHES = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]


def test_shard_world_size_one_is_identity():
    assert shard_batches(BATCHES, 0, 1) == BATCHES


def test_shard_world_size_two_even_and_covering():
    shards = [shard_batches(BATCHES, rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    # round-robin, wrapped around to the start to even out the shards
    assert shards[0] == [[0, 1], [4, 5], [8]]
    assert shards[1] == [[2, 3], [6, 7], [0, 1]]
    covered = {tuple(b) for s in shards for b in s}
    assert covered == {tuple(b) for b in BATCHES}


def test_shard_even_count_needs_no_repeats():
    batches = BATCHES[:4]
    shards = [shard_batches(batches, rank, 2) for rank in range(2)]
    assert shards == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


@pytest.mark.parametrize(("n_batches", "world_size"), [(5, 2), (5, 3), (7, 4), (6, 4), (9, 8)])
def test_shard_lengths_equal_and_cover_all(n_batches, world_size):
    batches = [[i] for i in range(n_batches)]
    shards = [shard_batches(batches, rank, world_size) for rank in range(world_size)]
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1, lengths
    assert lengths.pop() == -(-n_batches // world_size)
    assert {b[0] for s in shards for b in s} == set(range(n_batches))


def test_shard_fewer_batches_than_processes_still_even():
    shards = [shard_batches([[0, 1]], rank, 4) for rank in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 1]
