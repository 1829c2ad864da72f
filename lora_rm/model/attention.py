"""Attention over prefix-shared rows that computes only the blocks the layout lets a token see.

A packed row [prefix | suffix 1 | suffix 2 | ... | next unit ...] read through a 4D mask makes SDPA compute every
W x W block of the row and throw most of them away: on a CPU the kernel skips no masked block. Here each
stretch of a row is one query segment that attends only to what it may see:
- a unit's shared prefix and its longest suffix (or a lone sequence): [prefix | suffix], causally, which is
  exactly what the mask lets those tokens see;
- each other suffix: its unit's prefix, all of it, then itself, causally (a mask).
Segments of like length are gathered into small padded batches (one SDPA call each, the causal ones with the
kernel's own causal skipping), and the outputs scattered back to their places in the rows. Every layer of a
forward reuses one plan, built once from the row layout (`segment`, `part`: `lora_rm.model.collate`).

`planned_attention(model, plan)` routes the model's attention here for the forwards inside it. A call without
a plan for its rows (another thread, another shape) runs transformers' SDPA with the 4D mask as before, so the
rows stay exact either way; the engine checks the planned forward against the masked one on each model first.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lora_rm.model.load import unwrap_model

NAME = "lora_rm_prefix_shared"
# What one SDPA call costs beyond its arithmetic, in (query, key) pairs of attention work: segments share a
# call (padded to the widest) while the padding costs less than another call. Measured on SmolLM2-135M, bf16,
# 2 CPU cores (docs/scoring.md).
CALL_PAIRS = 4096

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa

_plan: contextvars.ContextVar[AttentionPlan | None] = contextvars.ContextVar(
    "lora_rm_attention_plan", default=None
)
_switch_lock = threading.Lock()
_switched: dict[int, list] = {}  # id(config) -> [implementation before, planned forwards running]


@dataclass
class SegmentBatch:
    """Query segments of like length, read by one SDPA call: `count` segments of `queries` query slots and
    `keys` key slots each (padded), at `q_start`/`k_start` of the plan's gathered queries and keys."""

    count: int
    queries: int
    keys: int
    q_start: int
    k_start: int
    mask: torch.Tensor | None  # [count, 1, queries, keys] True = may attend; None: causal (queries == keys)
    _bias: dict = field(default_factory=dict, repr=False, compare=False)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as SDPA's additive mask in `dtype` (0 where a query may attend, -inf elsewhere), made once
        a forward rather than by SDPA in every layer."""
        if self.mask is None:
            return None
        if dtype not in self._bias:
            zeros = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._bias[dtype] = zeros.masked_fill_(~self.mask, float("-inf"))
        return self._bias[dtype]


@dataclass
class AttentionPlan:
    """One forward's attention: gather `q_index` and `k_index` (flat positions, rows x width), run the
    batches and put each query slot's output at `slot_out` (rows x width for a pad slot: dropped); the
    positions no query slot writes (the rows' padding) are `unread`, zeros in the output."""

    shape: tuple[int, int]  # (rows, width) of the forward the plan is for
    batches: list[SegmentBatch]
    q_index: torch.Tensor
    k_index: torch.Tensor
    slot_out: torch.Tensor
    unread: torch.Tensor

    def to(self, device: torch.device) -> AttentionPlan:
        batches = [
            SegmentBatch(
                b.count,
                b.queries,
                b.keys,
                b.q_start,
                b.k_start,
                None if b.mask is None else b.mask.to(device),
            )
            for b in self.batches
        ]
        tensors = (t.to(device) for t in (self.q_index, self.k_index, self.slot_out, self.unread))
        return AttentionPlan(self.shape, batches, *tensors)


def layout_spans(segment: torch.Tensor, part: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(row, unit, part, flat start, length) of each run of equal (unit, part) in the rows, pads left out."""
    rows, width = segment.shape
    spans = []
    for r in range(rows):
        seg, prt = segment[r].tolist(), part[r].tolist()
        start = 0
        for t in range(1, width + 1):
            if t == width or seg[t] != seg[start] or prt[t] != prt[start]:
                if seg[start] >= 0:
                    spans.append((r, seg[start], prt[start], r * width + start, t - start))
                start = t
    return spans


def plan_attention(segment: torch.Tensor, part: torch.Tensor) -> AttentionPlan:
    """The plan of rows laid out as `shared_prefix_mask(segment, part)` describes: the same visibility, with
    only the visible blocks computed (up to the padding of segments batched together).

    A unit's prefix and its longest suffix are read as one causal segment, [prefix | suffix]: causally, each of
    the suffix's tokens sees the whole prefix and its own earlier tokens, exactly what the mask allows, and the
    kernel's causal skipping computes nothing else. The unit's other suffixes see the prefix through a mask."""
    units: dict[tuple[int, int], tuple[list[int], list[list[int]]]] = {}
    for r, u, p, start, n in layout_spans(segment, part):
        prefix, suffixes = units.setdefault((r, u), ([], []))
        if p == 0:
            prefix.extend(range(start, start + n))
        else:
            suffixes.append(list(range(start, start + n)))
    causal, masked = [], []
    for prefix, suffixes in units.values():
        suffixes = sorted(suffixes, key=len, reverse=True)
        if prefix or not suffixes:
            causal.append((prefix + (suffixes[0] if suffixes else []), []))
            masked += [(own, prefix) for own in suffixes[1:]]
        else:  # no shared prefix: each suffix alone
            causal += [(own, []) for own in suffixes]
    groups = [(g, True) for g in _partition(causal, causal=True)]
    groups += [(g, False) for g in _partition(masked, causal=False)]
    batches, q_index, k_index, slot_out = [], [], [], []
    trash = segment.numel()  # where pad query slots put their outputs
    q_at = k_at = 0
    for group, is_causal in groups:
        lq = max(len(own) for own, _ in group)
        lk = max(len(seen) + len(own) for own, seen in group)
        mask = None if is_causal else torch.zeros(len(group), 1, lq, lk, dtype=torch.bool)
        i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
        for s, (own, seen) in enumerate(group):
            n, p = len(own), len(seen)
            q_index += own + [own[0]] * (lq - n)  # pad slots repeat a real query; their outputs are dropped
            k_index += seen + own + [own[0]] * (lk - p - n)
            slot_out += own + [trash] * (lq - n)
            if mask is not None:
                # the prefix whole, then the suffix causally; pad query slots see what the last real one sees
                mask[s, 0] = (j < p) | ((j - p <= torch.clamp(i, max=n - 1)) & (j < p + n))
        batches.append(SegmentBatch(len(group), lq, lk, q_at, k_at, mask))
        q_at, k_at = q_at + len(group) * lq, k_at + len(group) * lk
    unread = sorted(set(range(trash)) - set(slot_out))
    tensors = (torch.tensor(x, dtype=torch.long) for x in (q_index, k_index, slot_out, unread))
    return AttentionPlan(tuple(segment.shape), batches, *tensors)


def _partition(segments: list[tuple[list[int], list[int]]], causal: bool) -> list[list]:
    """Segments cut into SDPA calls: sorted by key length, the contiguous cut that minimises padded attention
    work plus `CALL_PAIRS` per call (dynamic programming over the sorted segments)."""
    order = sorted(segments, key=lambda s: (len(s[0]) + len(s[1]), len(s[0])), reverse=True)
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j segments
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        widest_q = 0
        for i in range(j - 1, -1, -1):  # the last call holds order[i:j]; order[i] has the longest keys
            widest_q = max(widest_q, len(order[i][0]))
            keys = len(order[i][0]) + len(order[i][1])
            work = (j - i) * widest_q * keys / (2 if causal else 1)
            cost = best[i] + CALL_PAIRS + work
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def prefix_shared_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: [B, H, T, D] query, [B, Hkv, T, D] key/value in, [B, T, H, D] out.
    Runs SDPA with the 4D mask when no plan fits the call (see the module doc)."""
    plan = _plan.get()
    unplanned = (
        plan is None
        or plan.shape != (query.shape[0], query.shape[2])
        or key.shape[2] != query.shape[2]
        or value.shape[-1] != query.shape[-1]
        or dropout
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
    )
    if unplanned:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    # token-major [rows x width, heads, dim]: a view of the model's projections, which are [B, T, H, D] in memory
    # (a copy otherwise); each batch's queries and keys gathered as whole rows of heads x dim, once a layer
    q_all, k_all, v_all = (
        t.transpose(1, 2).reshape(rows * width, t.shape[1], dim).index_select(0, i)
        for t, i in ((query, plan.q_index), (key, plan.k_index), (value, plan.k_index))
    )
    # grouped-query heads: the kernel's own broadcast on CPU and without a mask; CUDA's masked kernels want them
    # repeated (the math kernel is the one that takes both)
    native_gqa = kv_heads != heads and query.device.type == "cpu" and _SDPA_GQA
    out = query.new_empty(rows * width + 1, heads, dim)  # the last slot takes the pad slots' outputs
    out[plan.unread] = 0
    for b in plan.batches:
        q, k, v = (
            t[start : start + b.count * n].view(b.count, n, t.shape[1], dim).transpose(1, 2)
            for t, start, n in (
                (q_all, b.q_start, b.queries),
                (k_all, b.k_start, b.keys),
                (v_all, b.k_start, b.keys),
            )
        )
        gqa = kv_heads != heads and (native_gqa or (b.mask is None and _SDPA_GQA))
        if kv_heads != heads and not gqa:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        extra = {"enable_gqa": True} if gqa else {}
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=b.bias(q.dtype), scale=scaling, is_causal=b.mask is None, **extra
        )
        slots = plan.slot_out[b.q_start : b.q_start + b.count * b.queries]
        out.index_copy_(0, slots, o.transpose(1, 2).reshape(b.count * b.queries, heads, dim))
    return out[:-1].view(rows, width, heads, dim), None


def _register() -> None:
    """Make `NAME` a transformers attention implementation (on first use: the CLI starts without transformers)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, prefix_shared_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # unplanned forwards build SDPA's masks, as before


@contextlib.contextmanager
def planned_attention(model: Any, plan: AttentionPlan):
    """Forwards of `model` inside read their rows by `plan` (yields True), when the model runs transformers'
    SDPA attention; other models keep their attention and the 4D mask (yields False)."""
    config = unwrap_model(model).config
    with _switch_lock:
        entry = _switched.get(id(config))
        if entry is None and getattr(config, "_attn_implementation", None) != "sdpa":
            usable = False
        else:
            usable = True
            if entry is None:
                _register()
                entry = _switched[id(config)] = ["sdpa", 0]
                config._attn_implementation = NAME
            entry[1] += 1
    if not usable:
        yield False
        return
    token = _plan.set(plan)
    try:
        yield True
    finally:
        _plan.reset(token)
        with _switch_lock:
            entry[1] -= 1
            if entry[1] == 0:
                config._attn_implementation = entry[0]
                del _switched[id(config)]
