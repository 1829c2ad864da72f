"""Batches of pairs: the order they come in, and the padded tensors the model sees."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_rm.encode import EncodedPair
from lora_rm.sequences import common_prefix_len


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


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator every epoch plan draws its order from: a function of (seed, epoch) alone, never of the
    global RNG, so a resumed run and an uninterrupted one see the same batches."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def plan_batches(
    num_pairs: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> list[list[int]]:
    """The batches of one epoch as lists of pair indices; the last one may be smaller.

    The order depends only on (seed, epoch), never on the global RNG, so a resumed run and an
    uninterrupted one see the same batches.
    """
    if shuffle:
        order = torch.randperm(num_pairs, generator=epoch_generator(seed, epoch)).tolist()
    else:
        order = list(range(num_pairs))
    return [order[i : i + batch_size] for i in range(0, num_pairs, batch_size)]


def plan_group_batches(groups: list[int | None], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of one epoch that never split a ranked list: consecutive pairs with the same group id
    (None: a pair on its own) stay together, in order, in one batch of at most `batch_size` pairs (a
    longer list gets a batch to itself). Lists are shuffled from (seed, epoch) like `plan_batches`."""
    units: list[list[int]] = []
    for i, g in enumerate(groups):
        if units and g is not None and groups[units[-1][-1]] == g:
            units[-1].append(i)
        else:
            units.append([i])
    order = torch.randperm(len(units), generator=epoch_generator(seed, epoch))
    batches: list[list[int]] = []
    for u in order.tolist():
        if batches and len(batches[-1]) + len(units[u]) <= batch_size:
            batches[-1].extend(units[u])
        else:
            batches.append(list(units[u]))
    return batches


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


def pair_cost(pair: EncodedPair, share_prefix: bool) -> int:
    """Tokens one pair occupies: [prefix | chosen suffix | rejected suffix] when the prefix is shared,
    else two rows padded to the longer side."""
    if share_prefix:
        return len(pair.chosen) + len(pair.rejected) - common_prefix_len(pair.chosen, pair.rejected)
    return 2 * max(len(pair.chosen), len(pair.rejected))


def plan_grouped_batches(
    costs: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    max_tokens: int | None = None,
    packed: bool = False,
    mega_batch: int = 50,
) -> list[list[int]]:
    """Length-grouped batches of one epoch: little padding, order still random.

    Pairs are shuffled from (seed, epoch), cut into mega-batches of `mega_batch` batches, sorted by cost
    inside each, and cut into batches of `batch_size` pairs or, with `max_tokens`, of as many pairs as fit
    the budget (padded tokens, or the sum of costs when `packed`). The batch order is shuffled again, so
    long and short batches alternate at random. A pair over the budget alone forms its own batch.
    """
    generator = epoch_generator(seed, epoch)
    order = torch.randperm(len(costs), generator=generator).tolist()
    batches: list[list[int]] = []
    span = mega_batch * batch_size
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: costs[i])
        current: list[int] = []
        for i in chunk:
            if current and not _fits(current + [i], costs, batch_size, max_tokens, packed):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _fits(idx: list[int], costs: list[int], batch_size: int, max_tokens: int | None, packed: bool) -> bool:
    if max_tokens is None:
        return len(idx) <= batch_size
    used = sum(costs[i] for i in idx) if packed else len(idx) * max(costs[i] for i in idx)
    return used <= max_tokens


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
