"""Collation: the padded tensors the model sees for a batch of pairs, as plain rows, prefix-shared rows
(4D mask and position ids) or packed rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_rm.data.encode import EncodedPair
from lora_rm.data.sequences import common_prefix_len


@dataclass
class PreferenceBatch:
    """B pairs as 2B right-padded rows: chosen in rows [0, B), rejected in rows [B, 2B).

    Chosen and rejected go through the model in one forward, which is faster than two and keeps
    dropout and batch statistics identical for both sides.
    """

    input_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long, 1 on real tokens
    margin: torch.Tensor  # [B] float32
    weight: torch.Tensor | None = None  # [B] float32, a pair's share of the loss (ranked lists); None: 1
    group: torch.Tensor | None = None  # [B] long, the ranked list a pair comes from; -1: none

    @property
    def num_pairs(self) -> int:
        return self.margin.shape[0]

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.margin.to(device),
            *_move(device, self.weight, self.group),
        )


def _move(device: torch.device | str, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t if t is None else t.to(device) for t in tensors]


def _weights_and_groups(pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    group = torch.tensor([-1 if p.group is None else p.group for p in pairs], dtype=torch.long)
    return weight, group


def pad_sequences(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of single sequences padded on the right, as the collators pad pairs."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


class PreferenceCollator:
    """Pads pairs on the right into a PreferenceBatch.

    A class rather than a closure so DataLoader workers can pickle it (spawned workers on Windows).
    Right padding keeps GPT-2-style absolute positions identical to the unpadded sequence.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[EncodedPair]) -> PreferenceBatch:
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        input_ids, attention_mask = pad_sequences(seqs, self.pad_token_id)
        margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        return PreferenceBatch(input_ids, attention_mask, margin, *_weights_and_groups(pairs))


@dataclass
class PackedBatch:
    """Pairs laid out for causal decoders: each pair as [shared prefix | chosen suffix | rejected suffix]
    (or [chosen] [rejected] without sharing), one or several pairs per row.

    The 4D mask lets a token see earlier tokens of its own pair only, and keeps the rejected suffix from
    seeing the chosen suffix; position ids restart the rejected suffix where the prefix ends. So every
    reward equals the one from a separate forward, at a fraction of the tokens.
    """

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, 1, T, T] bool, True = may attend
    position_ids: torch.Tensor  # [R, T]
    chosen_index: torch.Tensor  # [B] flat index into R*T of each chosen side's last token
    rejected_index: torch.Tensor  # [B]
    margin: torch.Tensor  # [B]
    weight: torch.Tensor | None = None  # [B], as in PreferenceBatch
    group: torch.Tensor | None = None  # [B]

    @property
    def num_pairs(self) -> int:
        return self.margin.shape[0]

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = [t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids)]
        index = [t.to(device) for t in (self.chosen_index, self.rejected_index, self.margin)]
        return PackedBatch(*moved, *index, *_move(device, self.weight, self.group))


class PackedCollator:
    """Builds PackedBatch rows. `row_tokens` packs several pairs per row up to that many tokens
    (padding-free packing); None keeps one pair per row. Picklable for spawned workers."""

    def __init__(self, pad_token_id: int, share_prefix: bool = True, row_tokens: int | None = None):
        self.pad_token_id, self.share_prefix, self.row_tokens = pad_token_id, share_prefix, row_tokens

    def _segments(self, pair: EncodedPair) -> tuple[list[int], list[int], list[int], int, int]:
        """(ids, part, positions, chosen_end, rejected_end) of one pair; part 0 prefix, 1 chosen, 2 rejected."""
        c, r = pair.chosen, pair.rejected
        p = common_prefix_len(c, r) if self.share_prefix else 0
        sc, sr = c[p:], r[p:]
        ids = c[:p] + sc + sr
        part = [0] * p + [1] * len(sc) + [2] * len(sr)
        positions = list(range(p + len(sc))) + list(range(p, p + len(sr)))
        chosen_end = p + len(sc) - 1
        rejected_end = p + len(sc) + len(sr) - 1 if sr else p - 1
        return ids, part, positions, chosen_end, rejected_end

    def __call__(self, pairs: list[EncodedPair]) -> PackedBatch:
        rows: list[list[tuple]] = [[]]
        for pair in pairs:
            seg = self._segments(pair)
            used = sum(len(s[0]) for s in rows[-1])
            if rows[-1] and (self.row_tokens is None or used + len(seg[0]) > self.row_tokens):
                rows.append([])
            rows[-1].append(seg)
        width = max(sum(len(s[0]) for s in row) for row in rows)
        n_rows = len(rows)
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)
        segment = torch.full((n_rows, width), -1, dtype=torch.long)
        part = torch.zeros((n_rows, width), dtype=torch.long)
        chosen_index, rejected_index = [], []
        for r, row in enumerate(rows):
            offset = 0
            for s, (ids, parts, positions, c_end, r_end) in enumerate(row):
                span = slice(offset, offset + len(ids))
                input_ids[r, span] = torch.tensor(ids)
                position_ids[r, span] = torch.tensor(positions)
                part[r, span] = torch.tensor(parts)
                segment[r, span] = s
                chosen_index.append(r * width + offset + c_end)
                rejected_index.append(r * width + offset + r_end)
                offset += len(ids)
        margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        return PackedBatch(
            input_ids,
            shared_prefix_mask(segment, part),
            position_ids,
            torch.tensor(chosen_index),
            torch.tensor(rejected_index),
            margin,
            *_weights_and_groups(pairs),
        )


def shared_prefix_mask(segment: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The 4D attention mask [R, 1, T, T] (True = may attend) of packed rows.

    `segment` [R, T] numbers the units of a row (-1: padding); `part` [R, T] is 0 on a unit's shared prefix
    and k > 0 on its k-th suffix. A token sees the earlier tokens of its own unit's prefix and of its own
    suffix, never another suffix (a pair's rejected side never sees its chosen side), so each suffix reads
    exactly as the separate sequence prefix + suffix."""
    width = segment.shape[1]
    i = torch.arange(width)
    causal = i[None, :] <= i[:, None]
    same = segment[:, :, None] == segment[:, None, :]
    visible = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
    mask = causal & same & visible & (segment[:, :, None] >= 0)
    mask |= torch.eye(width, dtype=torch.bool)  # pads attend to themselves: no empty softmax rows
    return mask[:, None]


def pair_weights(batch: PreferenceBatch | PackedBatch) -> torch.Tensor:
    """Each pair's share of the loss: `batch.weight`, or ones when the batch carries none."""
    return batch.weight if batch.weight is not None else torch.ones_like(batch.margin)
