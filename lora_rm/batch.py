"""Batches of pairs: the order they come in, and the padded tensors the model sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_rm.encode import EncodedPair


@dataclass
class PreferenceBatch:
    """B pairs as 2B right-padded rows: chosen in rows [0, B), rejected in rows [B, 2B).

    Chosen and rejected go through the model in one forward, which is faster than two and keeps
    dropout and batch statistics identical for both sides.
    """

    input_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long, 1 on real tokens
    margin: torch.Tensor  # [B] float32

    @property
    def num_pairs(self) -> int:
        return self.margin.shape[0]

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.margin.to(device)
        )


class PreferenceCollator:
    """Pads pairs on the right into a PreferenceBatch.

    A class rather than a closure so DataLoader workers can pickle it (spawned workers on Windows).
    Right padding keeps GPT-2-style absolute positions identical to the unpadded sequence.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[EncodedPair]) -> PreferenceBatch:
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        return PreferenceBatch(input_ids, attention_mask, margin)


def plan_batches(
    num_pairs: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """The batches of one epoch as lists of pair indices; the last one may be smaller.

    The order depends only on (seed, epoch), never on the global RNG, so a resumed run and an
    uninterrupted one see the same batches.
    """
    if shuffle:
        order = torch.randperm(
            num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
        ).tolist()
    else:
        order = list(range(num_pairs))
    return [order[i : i + batch_size] for i in range(0, num_pairs, batch_size)]


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This process's share of the batches when training on several processes.

    Each process needs the same number of micro-batches or the collective ops hang, so the list is
    extended by wrapping around to the start (the few repeated pairs are the price of even shards).
    """
    if world_size == 1:
        return batches
    per_rank = -(-len(batches) // world_size)
    padded = [batches[i % len(batches)] for i in range(per_rank * world_size)]
    return padded[rank::world_size]
