"""Each epoch's batches of pairs as lists of pair indices, from (seed, epoch) alone: shuffled, ranked lists kept
whole, length-grouped under a token budget, and shared out among processes."""

from __future__ import annotations

import torch

from lora_rm.data.encode import EncodedPair
from lora_rm.data.sequences import common_prefix_len


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


def plan_ranked_list_batches(
    groups: list[int | None], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
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


def plan_length_grouped_batches(
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
