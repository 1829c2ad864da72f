"""lora_rm.model.attention: the plan sees exactly what the 4D mask lets each token see, the planned attention gives
masked SDPA's output (grouped-query heads included), unplanned calls are transformers' SDPA, and the switch of
a model's attention is undone; the engine falls back to masked rows when a model's attention skips the plan."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lora_rm.model.engine as engine
from lora_rm.model.attention import (
    AttentionPlan,
    layout_spans,
    plan_attention,
    planned_attention,
    prefix_shared_attention,
)
from lora_rm.model.collate import shared_prefix_mask

# [unit 0: prefix 2 | suffix 1 (2) | suffix 2 (1)] [unit 1: alone, 3] [pad]
SEGMENT = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1]])
PART = torch.tensor([[0, 0, 1, 1, 2, 0, 0, 0, 0]])


def test_spans_by_hand():
    assert layout_spans(SEGMENT, PART) == [(0, 0, 0, 0, 2), (0, 0, 1, 2, 2), (0, 0, 2, 4, 1), (0, 1, 0, 5, 3)]


def _visible(plan: AttentionPlan, positions: int) -> dict[int, set[int]]:
    """What each query position sees under the plan (pad slots, whose outputs go to `positions`, left out)."""
    seen: dict[int, set[int]] = {}
    for b in plan.batches:
        q = plan.q_index[b.q_start : b.q_start + b.count * b.queries].view(b.count, b.queries)
        k = plan.k_index[b.k_start : b.k_start + b.count * b.keys].view(b.count, b.keys)
        out = plan.slot_out[b.q_start : b.q_start + b.count * b.queries].view(b.count, b.queries)
        for s in range(b.count):
            for i in range(b.queries):
                if out[s, i] == positions:
                    continue
                assert out[s, i] == q[s, i], "a query's output goes elsewhere"
                ok = torch.arange(b.keys) <= i if b.mask is None else b.mask[s, 0, i]
                assert int(q[s, i]) not in seen, "a query is read twice"
                seen[int(q[s, i])] = set(k[s][ok].tolist())
    assert all(0 <= p < positions for p in seen)
    assert set(plan.unread.tolist()) == set(range(positions)) - set(seen)  # the padding, zeroed
    return seen


def _mask_visible(segment: torch.Tensor, part: torch.Tensor) -> dict[int, set[int]]:
    mask, width = shared_prefix_mask(segment, part), segment.shape[1]
    return {
        r * width + i: {r * width + j for j in range(width) if mask[r, 0, i, j]}
        for r in range(segment.shape[0])
        for i in range(width)
        if segment[r, i] >= 0
    }


def test_the_plan_by_hand():
    plan = plan_attention(SEGMENT, PART)
    assert _visible(plan, 9) == {
        0: {0}, 1: {0, 1},  # the prefix, causally
        2: {0, 1, 2}, 3: {0, 1, 2, 3},  # suffix 1: the prefix, then itself
        4: {0, 1, 4},  # suffix 2 never sees suffix 1
        5: {5}, 6: {5, 6}, 7: {5, 6, 7},  # the lone unit; the pad (8) is not read
    }  # fmt: skip


def _random_layout(rng: random.Random, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of units, each a prefix (possibly empty) and 0-5 suffixes of 1-9 tokens, then padding."""
    layouts = []
    for _ in range(rows):
        seg, part = [], []
        for u in range(rng.randint(1, 4)):
            prefix = rng.randint(0 if u % 2 else 1, 12)
            seg += [u] * prefix
            part += [0] * prefix
            for k in range(1, rng.randint(1 if prefix == 0 else 0, 5) + 1):
                n = rng.randint(1, 9)
                seg += [u] * n
                part += [k] * n
        layouts.append((seg, part))
    width = max(len(s) for s, _ in layouts) + rng.randint(0, 3)
    segment = torch.tensor([s + [-1] * (width - len(s)) for s, _ in layouts])
    part = torch.tensor([p + [0] * (width - len(p)) for _, p in layouts])
    return segment, part


@pytest.mark.parametrize("seed", range(20))
def test_the_plan_sees_what_the_mask_lets_see(seed):
    segment, part = _random_layout(random.Random(seed), rows=1 + seed % 3)
    assert _visible(plan_attention(segment, part), segment.numel()) == _mask_visible(segment, part)


class _Module:  # what transformers' attention functions read from the layer
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def _qkv(rows: int, width: int, heads: int, kv_heads: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, width, 16, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(rows, kv_heads, width, 16, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(rows, kv_heads, width, 16, generator=g, dtype=torch.float32).to(dtype)
    return q, k, v


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_planned_attention_gives_masked_sdpa(heads, kv_heads, dtype, device):
    """On CUDA the masked batches repeat grouped-query heads for the masked kernels: the same output."""
    segment, part = _random_layout(random.Random(7), rows=3)
    rows, width = segment.shape
    q, k, v = (t.to(device) for t in _qkv(rows, width, heads, kv_heads, dtype))
    module = _Module(heads // kv_heads)
    mask = shared_prefix_mask(segment, part).to(device)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    with planned_attention(_FakeModel(), plan_attention(segment, part).to(device)):
        got, _ = prefix_shared_attention(module, q, k, v, None, scaling=0.25)
    real = (segment >= 0).to(device)
    tol = (1e-5 if device == "cpu" else 1e-4) if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[real].float(), want[real].float(), atol=tol, rtol=tol)


def test_unplanned_calls_are_transformers_sdpa():
    segment, part = _random_layout(random.Random(3), rows=2)
    q, k, v = _qkv(*segment.shape, 4, 2)
    module, mask = _Module(2), shared_prefix_mask(segment, part)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got, _ = prefix_shared_attention(module, q, k, v, mask, scaling=0.25)  # no plan set
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    other = plan_attention(segment[:1], part[:1])  # a plan for other rows: not this call's
    with planned_attention(_FakeModel(), other):
        got, _ = prefix_shared_attention(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


class _Config:
    def __init__(self, implementation: str):
        self._attn_implementation = implementation


class _FakeModel:
    def __init__(self, implementation: str = "sdpa"):
        self.config = _Config(implementation)


def test_the_switch_is_undone_and_shared_by_threads():
    model = _FakeModel()
    plan = plan_attention(SEGMENT, PART)
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        with planned_attention(model, plan) as ok:
            assert ok
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=other_thread)
    thread.start()
    inside.wait(5)
    with planned_attention(model, plan) as ok:
        assert ok and model.config._attn_implementation == "lora_rm_prefix_shared"
    assert model.config._attn_implementation == "lora_rm_prefix_shared"  # the other thread is still inside
    release.set()
    thread.join(5)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), planned_attention(model, plan):
        raise RuntimeError("a forward that fails")
    assert model.config._attn_implementation == "sdpa"


def test_a_model_on_other_attention_keeps_it():
    model = _FakeModel("eager")
    with planned_attention(model, plan_attention(SEGMENT, PART)) as ok:
        assert not ok and model.config._attn_implementation == "eager"


# the engine's choice of layout


def _seqs():
    rng = random.Random(0)
    seqs, keys = [], []
    for g in range(5):
        prompt = [rng.randrange(5, 50) for _ in range(rng.randint(3, 20))]
        for _ in range(rng.randint(1, 6)):
            seqs.append(prompt + [rng.randrange(5, 50) for _ in range(rng.randint(1, 12))])
            keys.append(g)
    return seqs, keys


def _model(tiny_gpt2, implementation: str = "sdpa"):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        str(tiny_gpt2), num_labels=1, pad_token_id=0, attn_implementation=implementation
    ).eval()


def test_the_engine_plans_a_decoder_on_sdpa(tiny_gpt2):
    model, (seqs, keys) = _model(tiny_gpt2), _seqs()
    logs: list[str] = []
    got = engine.score_sequences(model, seqs, 0, keys=keys, max_tokens=48, log=logs.append)
    assert engine._layouts[model] == "planned" and logs == []
    plain = engine.score_sequences(model, seqs, 0, packed=False)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)


def test_eager_attention_is_never_planned(tiny_gpt2):
    """transformers' eager GPT-2 adds a bool 4D mask as 0/1 rather than masking: the layout probe sends it to
    plain rows before the plan is considered."""
    model, (seqs, keys) = _model(tiny_gpt2, "eager"), _seqs()
    logs: list[str] = []
    got = engine.score_sequences(model, seqs, 0, keys=keys, log=logs.append)
    assert engine._layouts[model] == "plain" and len(logs) == 1 and "plain rows" in logs[0]
    torch.testing.assert_close(got, engine.score_sequences(model, seqs, 0, packed=False), atol=1e-5, rtol=0)


def test_attention_that_skips_the_plan_reads_masked_rows(tiny_gpt2, monkeypatch):
    """A model on SDPA whose layers never reach the planned function would read whole rows under the
    stand-in mask: the check catches it and the engine keeps the 4D mask."""
    model, (seqs, keys) = _model(tiny_gpt2), _seqs()
    monkeypatch.setattr(
        engine,
        "plan_attention",
        lambda s, p: AttentionPlan((0, 0), [], *[torch.zeros(0, dtype=torch.long)] * 4),
    )
    logs: list[str] = []
    got = engine.score_sequences(model, seqs, 0, keys=keys, log=logs.append)
    assert engine._layouts[model] == "masked" and len(logs) == 1, logs
    assert "does not give the masked rows' rewards with planned attention" in logs[0]
    torch.testing.assert_close(got, engine.score_sequences(model, seqs, 0, packed=False), atol=1e-5, rtol=0)


def test_other_attention_that_takes_the_mask_reads_masked_rows(tiny_gpt2):
    """An attention other than SDPA that honours the 4D mask (here SDPA registered under another name) keeps
    prefix-shared rows, through the mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("test_sdpa_copy", sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_sdpa_copy", sdpa_mask)
    model, (seqs, keys) = _model(tiny_gpt2), _seqs()
    model.config._attn_implementation = "test_sdpa_copy"
    logs: list[str] = []
    got = engine.score_sequences(model, seqs, 0, keys=keys, log=logs.append)
    assert (
        engine._layouts[model] == "masked" and len(logs) == 1 and "does not run transformers' SDPA" in logs[0]
    )
    torch.testing.assert_close(got, engine.score_sequences(model, seqs, 0, packed=False), atol=1e-5, rtol=0)
