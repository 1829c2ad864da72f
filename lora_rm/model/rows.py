"""Prefix-shared rows: many token-id sequences laid out as the scoring engine reads them.

Sequences are grouped (by a key such as their prompt, or by the tokens they start with), each group becomes one
or more units [shared prefix | suffix 1 | suffix 2 | ...], units are packed into rows of a token budget, and
rows into batches; `build_rows` gives a batch's tensors, with the `segment`/`part` layout of training's 4D mask
(`lora_rm.model.collate.shared_prefix_mask`). Pure bookkeeping: no model is read here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from lora_rm.data.sequences import common_prefix_len
from lora_rm.model.collate import shared_prefix_mask


@dataclass
class Unit:
    """Distinct sequences read in one stretch of a row: their shared prefix once, then each one's suffix."""

    prefix: int  # tokens every member starts with
    members: list[int]  # indices into the distinct sequences

    def tokens(self, seqs: Sequence[Sequence[int]]) -> int:
        """The unit's length in a row: the prefix once, then each member's suffix."""
        return self.prefix + sum(len(seqs[i]) - self.prefix for i in self.members)


def group_by_key(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices grouped by equal key (a prompt), groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def group_by_prefix(seqs: Sequence[Sequence[int]]) -> list[list[int]]:
    """Groups of sequences that start alike, found without prompts (full texts): sequences in token order, a
    neighbour joining the group when the tokens it saves (the shared prefix) outweigh what the shorter shared
    prefix costs the other members (k members with prefix p, joined at p' < p: it saves p', costs
    (k - 1)(p - p'); the first member's own tokens are read either way)."""
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    groups: list[list[int]] = []
    prefix = 0
    for i in order:
        if groups:
            shared = min(prefix, common_prefix_len(seqs[groups[-1][-1]], seqs[i]))
            if shared > (len(groups[-1]) - 1) * (prefix - shared):
                groups[-1].append(i)
                prefix = shared
                continue
        groups.append([i])
        prefix = len(seqs[i])
    return groups


def make_units(seqs: Sequence[Sequence[int]], groups: list[list[int]], row_tokens: int) -> list[Unit]:
    """Each group as one unit, or several when its members do not fit `row_tokens` together."""
    units = []
    for group in groups:
        current: list[int] = []
        for i in group:
            if current and unit_tokens(seqs, current + [i]) > row_tokens:
                units.append(Unit(shared_prefix(seqs, current), current))
                current = []
            current.append(i)
        units.append(Unit(shared_prefix(seqs, current), current))
    return units


def shared_prefix(seqs: Sequence[Sequence[int]], members: list[int]) -> int:
    first = seqs[members[0]]
    return min([len(first)] + [common_prefix_len(first, seqs[i]) for i in members[1:]])


def unit_tokens(seqs: Sequence[Sequence[int]], members: list[int]) -> int:
    """The length a unit of `members` would have (`Unit.tokens`, before the unit is made)."""
    return Unit(shared_prefix(seqs, members), members).tokens(seqs)


def row_width(seqs: Sequence[Sequence[int]], row: list[Unit]) -> int:
    """Tokens of a packed row, its padding left out."""
    return sum(u.tokens(seqs) for u in row)


def pack_rows(seqs: Sequence[Sequence[int]], units: list[Unit], row_tokens: int) -> list[list[Unit]]:
    """Units packed into rows of at most `row_tokens` tokens (first fit, longest first)."""
    rows: list[list[Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=lambda u: -u.tokens(seqs)):
        cost = unit.tokens(seqs)
        row = next((r for r, left in enumerate(room) if left >= cost), None)
        if row is None:
            rows.append([])
            room.append(row_tokens)
            row = len(rows) - 1
        rows[row].append(unit)
        room[row] -= cost
    return rows


@dataclass
class Rows:
    """Packed rows for one forward: the reward of member `members[k]` is the head's output at flat position
    `index[k]` (its last token); `segment` and `part` lay out the units (`shared_prefix_mask`)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    index: torch.Tensor
    members: list[int]
    segment: torch.Tensor
    part: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """The 4D mask [R, 1, W, W] of the layout (W x W per row: planned attention does without it)."""
        return shared_prefix_mask(self.segment, self.part)


def build_rows(seqs: Sequence[Sequence[int]], rows: list[list[Unit]], pad_token_id: int) -> Rows:
    """The tensors of packed rows (`Rows`)."""
    width = max(row_width(seqs, row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids, part = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    index, members = [], []
    for r, row in enumerate(rows):
        offset = 0
        for s, unit in enumerate(row):
            p = unit.prefix
            ids, parts, pos = list(seqs[unit.members[0]][:p]), [0] * p, list(range(p))
            for k, i in enumerate(unit.members, start=1):
                suffix = list(seqs[i][p:])
                ids, parts, pos = (
                    ids + suffix,
                    parts + [k] * len(suffix),
                    pos + list(range(p, p + len(suffix))),
                )
                index.append(r * width + offset + len(ids) - 1 if suffix else r * width + offset + p - 1)
                members.append(i)
            span = slice(offset, offset + len(ids))
            input_ids[r, span], position_ids[r, span] = torch.tensor(ids), torch.tensor(pos)
            part[r, span], segment[r, span] = torch.tensor(parts), s
            offset += len(ids)
    return Rows(input_ids, position_ids, torch.tensor(index), members, segment, part)


def cut_batches(widths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Rows (by index), longest first, cut into batches of at most `max_tokens` padded tokens (rows x the
    widest row); a row over the budget forms a batch alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(widths)), key=lambda i: -widths[i]):
        if batches and (len(batches[-1]) + 1) * widths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
