"""The scoring engine: rewards of many token-id sequences, read in the row layout training proves exact.

Sequences that share a prompt are read in one row, [shared prefix | suffix 1 | suffix 2 | ...], with the 4D mask
and position ids of training (`lora_rm.model.collate.shared_prefix_mask`), so the prompt of a GRPO group or of a pair
is read once; short units are packed several to a row, and a batch holds as many rows as a token budget allows
(the rows: `lora_rm.model.rows`).
Each distinct sequence is read once and rewards come back in the caller's order. On models that run transformers'
SDPA, the rows' attention is planned (`lora_rm.model.attention`): the same visibility as the mask, computing only
what each token sees, one unpadded row a forward; `row_layout` checks it against the mask once per model.

Models the layout probe does not pass (`lora_rm.model.probe.probe_packed_layout`: encoders, models that ignore a 4D
mask, int8 noise beyond its floor) read plain right-padded rows, longest first, under the same token budget.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from lora_rm.data.encode import EncodedPair
from lora_rm.data.sequences import common_prefix_len
from lora_rm.model.attention import plan_attention, planned_attention
from lora_rm.model.collate import pad_sequences
from lora_rm.model.precision import reads_last_token
from lora_rm.model.probe import probe_packed_layout, within_noise
from lora_rm.model.rewards import compute_rewards
from lora_rm.model.rows import (
    Rows,
    build_rows,
    cut_batches,
    group_by_key,
    group_by_prefix,
    make_units,
    pack_rows,
    row_width,
)

DEFAULT_MAX_TOKENS = 16384  # tokens per forward (rows x width), padding included
# Tokens per packed row; a longer unit sits alone in its row. Measured on SmolLM2-135M, bf16, 2 CPU cores
# (docs/scoring.md): rows of 256-512 tokens were slower on GRPO groups (a group split over rows reads its prompt
# again, which costs more than the attention it saves), 768 and 1024 were level within the machine's noise.
DEFAULT_ROW_TOKENS = 1024
# Tokens per planned forward (one row; `lora_rm.model.attention`), at most the token budget. Measured on the same
# model and machine (docs/scoring.md): 2,048-4,096 were fastest, 8,192 and 16,384 slower by 30-70% (activations
# that no longer fit the CPU's caches); the attention cost does not grow with the row, so nothing is lost.
PLANNED_ROW_TOKENS = 4096

_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> row_layout's verdict


def row_layout(
    model: Any, seqs: Sequence[Sequence[int]], groups: list[list[int]], pad_token_id: int, log: Callable
) -> str:
    """How `model` reads these sequences exactly, decided once per model (decoders only) and logged when it is
    not the fastest: "planned" (prefix-shared rows, only the visible attention blocks computed:
    `lora_rm.model.attention`), "masked" (the same rows through the 4D mask) or "plain" (one padded row each).

    The rows must pass training's layout probe on pairs of these sequences; the planned attention must then
    give the masked rows' rewards, within the same noise bar, on a few of the groups."""
    if model in _layouts:
        return _layouts[model]
    if not reads_last_token(model.config):
        log("scoring: plain rows (an encoder reads the whole row; prefix-shared rows need a causal decoder)")
        _layouts[model] = "plain"
        return "plain"
    pairs = [EncodedPair(list(seqs[g[0]]), list(seqs[g[1]])) for g in groups if len(g) > 1]
    pairs += [EncodedPair(list(seqs[a[0]]), list(seqs[b[0]])) for a, b in zip(groups[::2], groups[1::2])]
    pairs = sorted(
        pairs, key=lambda p: (common_prefix_len(p.chosen, p.rejected) == 0, len(p.chosen) + len(p.rejected))
    )
    with _in_fp32(model):
        probe = probe_packed_layout(model, pairs[:4], pad_token_id)
        planned_diff = _planned_diff(model, seqs, groups, pad_token_id) if probe.exact else None
    if not probe.exact:
        log(
            f"scoring: plain rows ({type(model).__name__} does not give plain rows' rewards from prefix-shared "
            f"rows: max |diff| {probe.packed_diff:.1e}, noise floor {probe.noise_floor:.1e})"
        )
        layout = "plain"
    elif planned_diff is None:
        log(f"scoring: masked rows ({type(model).__name__} does not run transformers' SDPA attention)")
        layout = "masked"
    elif not within_noise(planned_diff, probe.noise_floor, probe.scale):
        log(
            f"scoring: masked rows ({type(model).__name__} does not give the masked rows' rewards with planned "
            f"attention: max |diff| {planned_diff:.1e}, noise floor {probe.noise_floor:.1e})"
        )
        layout = "masked"
    else:
        layout = "planned"
    _layouts[model] = layout
    return layout


def _planned_diff(
    model: Any, seqs: Sequence[Sequence[int]], groups: list[list[int]], pad_token_id: int
) -> float | None:
    """max |planned - masked| of the rewards of a few groups (the 4 shortest shared ones, up to 4 members each,
    and the 2 shortest alone) packed into rows together; None when the model's attention cannot be planned.
    Whether the attention follows the plan is a property of the model, so short groups tell it as well as long
    ones, at a fraction of the cost of the first call (the masked rows are read in fp32)."""

    def cost(g: list[int]) -> int:
        return sum(len(seqs[i]) for i in g)

    shared = sorted((g[:4] for g in groups if len(g) > 1), key=cost)[:4]
    alone = sorted((g[:1] for g in groups if len(g) == 1), key=cost)[:2]
    picked = [i for g in shared + alone for i in g]
    sub = [seqs[i] for i in picked]
    at = iter(range(len(picked)))
    sub_groups = [[next(at) for _ in g] for g in shared + alone]
    row_tokens = 2 * max(len(s) for s in sub)
    rows = build_rows(sub, pack_rows(sub, make_units(sub, sub_groups, row_tokens), row_tokens), pad_token_id)
    device = next(model.parameters()).device
    ids, pos, index = (t.to(device) for t in (rows.input_ids, rows.position_ids, rows.index))
    masked = compute_rewards(model, ids, rows.mask.to(device), pos, index)
    got = _planned_rewards(model, rows, ids, pos, index)  # as scoring runs it
    return None if got is None else float((got.float() - masked.float()).abs().max())


@contextlib.contextmanager
def _in_fp32(model: Any):
    """The model's bf16/fp16 weights and buffers in fp32 for the duration, then back, bit for bit.

    Whether a model takes the 4D mask is a property of its architecture; probed in half precision, the
    rounding of two kernels (about one bf16 step of the reward, with no batch-to-batch noise to measure it
    against) reads as a layout that is not exact. Quantized weights are left as they are (their noise floor is
    the probe's own)."""
    tensors = [*model.parameters(), *model.buffers()]
    quantized = any(t.dtype in (torch.int8, torch.uint8) for t in model.parameters())
    half = [] if quantized else [t for t in tensors if t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in half]
    for t in half:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in zip(half, dtypes):
            t.data = t.data.to(dtype)


@torch.no_grad()
def score_sequences(
    model: Any,
    seqs: Sequence[Sequence[int]],
    pad_token_id: int,
    keys: Sequence[Hashable] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    row_tokens: int = DEFAULT_ROW_TOKENS,
    packed: bool | None = None,
    progress: Callable[[int], Any] | None = None,
    log: Callable[[str], Any] = print,
) -> torch.Tensor:
    """Raw rewards [N] (float32, CPU) of token-id sequences, in their order, each read as
    `AutoModelForSequenceClassification` reads it alone (right-padded, at its last non-pad token).

    `keys` (e.g. the prompt of each sequence) groups sequences whose shared prefix is read once; without keys,
    sequences that start alike are found by their tokens. `packed` None asks the layout probe (once per model),
    False forces plain rows. `max_tokens` bounds rows x width of every forward, `row_tokens` a packed row.
    `progress` is called with the count of sequences done after each batch. Raises ValueError for an empty
    sequence. The model is put back in training mode if it was.
    """
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an empty sequence has no reward")
    distinct: dict[tuple[int, ...], int] = {}
    where = [distinct.setdefault(tuple(s), len(distinct)) for s in seqs]
    decoder = reads_last_token(model.config)
    uniq = [_strip_pads(s, pad_token_id) if decoder else list(s) for s in distinct]
    out = torch.empty(len(uniq), dtype=torch.float32)
    if not uniq:
        return out
    was_training = model.training
    if was_training:
        model.eval()
    try:
        groups = group_by_prefix(uniq) if keys is None else _key_groups(keys, where)
        if packed is None:
            layout = row_layout(model, uniq, groups, pad_token_id, log) if len(uniq) > 1 else "plain"
        else:
            layout = "planned" if packed else "plain"
        counts = Counter(where)
        if layout == "plain":
            batches = _read_plain(model, uniq, pad_token_id, max_tokens)
        else:
            batches = _read_packed(
                model, uniq, groups, pad_token_id, max_tokens, row_tokens, layout == "planned"
            )
        for members, rewards in batches:
            out[members] = rewards
            if progress is not None:
                progress(sum(counts[i] for i in set(members)))
    finally:
        if was_training:
            model.train()
    return out[where]


def _strip_pads(seq: tuple[int, ...], pad_token_id: int) -> list[int]:
    """Without trailing pad ids (transformers never reads them; a causal model's earlier tokens do not see
    them), keeping one token."""
    n = len(seq)
    while n > 1 and seq[n - 1] == pad_token_id:
        n -= 1
    return list(seq[:n])


def _key_groups(keys: Sequence[Hashable], where: list[int]) -> list[list[int]]:
    first: dict[int, Hashable] = {}
    for k, i in zip(keys, where):
        first.setdefault(i, k)
    return group_by_key([first[i] for i in range(len(first))])


def _read_packed(model, seqs, groups, pad_token_id, max_tokens, row_tokens, planned):
    """Masked rows of up to `row_tokens`, several a forward; planned, one row a forward of up to
    `PLANNED_ROW_TOKENS` within `max_tokens` (its attention costs what each segment sees, not the row's width,
    and a single row has no padding)."""
    if planned:
        row_tokens = min(max_tokens, PLANNED_ROW_TOKENS)
    row_tokens = max(row_tokens, max(len(s) for s in seqs))
    rows = pack_rows(seqs, make_units(seqs, groups, row_tokens), row_tokens)
    widths = [row_width(seqs, row) for row in rows]
    device = next(model.parameters()).device
    for batch in cut_batches(widths, row_tokens if planned else max_tokens):
        built = build_rows(seqs, [rows[r] for r in batch], pad_token_id)
        ids, pos, index = (t.to(device) for t in (built.input_ids, built.position_ids, built.index))
        rewards = _planned_rewards(model, built, ids, pos, index) if planned else None
        if rewards is None:
            rewards = compute_rewards(model, ids, built.mask.to(device), pos, index)
        yield built.members, rewards.float().cpu()


def _planned_rewards(model, rows: Rows, ids, pos, index) -> torch.Tensor | None:
    """The rewards of `rows` read with planned attention and the stand-in mask; None when the model's
    attention cannot be planned (the caller reads the 4D mask instead)."""
    with planned_attention(model, plan_attention(rows.segment, rows.part).to(ids.device)) as planned:
        return compute_rewards(model, ids, _stand_in_mask(ids), pos, index) if planned else None


def _stand_in_mask(ids: torch.Tensor) -> torch.Tensor:
    """The 4D mask a planned forward passes: all-True [R, 1, 1, 1], which transformers hands to the attention
    as it is. The plan decides what each token sees; without one, transformers would build a mask of its own
    from the position ids (W x W, wrong for suffixes that do not restart their positions). A model whose
    attention skips the plan would read whole rows with it, so `_planned_diff` tests the forward in this form."""
    return torch.ones(ids.shape[0], 1, 1, 1, dtype=torch.bool, device=ids.device)


def _read_plain(model, seqs, pad_token_id, max_tokens):
    device = next(model.parameters()).device
    for batch in cut_batches([len(s) for s in seqs], max_tokens):
        ids, mask = pad_sequences([seqs[i] for i in batch], pad_token_id)
        yield batch, compute_rewards(model, ids.to(device), mask.to(device)).float().cpu()


class Throughput:
    """Sequences and tokens read and the seconds it took, for the log line of a scoring command."""

    def __init__(self, seqs: Sequence[Sequence[int]]):
        self.n, self.tokens, self.started = len(seqs), sum(len(s) for s in seqs), time.perf_counter()

    def line(self, what: str = "scored") -> str:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return (
            f"{what} {self.n} sequence{'s' * (self.n != 1)} ({self.tokens} tokens) in {seconds:.1f}s: "
            f"{self.n / seconds:.1f} sequences/s, {self.tokens / seconds:.0f} tokens/s"
        )
