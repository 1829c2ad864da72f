"""lora_rm.optim: the mixed precision `--precision` resolves to on each device, and the optimizer and schedule."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.optim import build_optimizer, resolve_precision


@pytest.mark.parametrize("precision, expected", [("fp32", "no"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_explicit_precisions_on_a_gpu(precision, expected):
    assert resolve_precision(precision, "cuda") == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, fast_bf16, expected):
    """Both answers on every machine: the CPU probes are replaced, whatever this CPU has."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_prefers_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "cuda") == expected


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)  # the frozen base
    return model


def test_adamw_over_the_trainable_parameters_only():
    cfg = TrainConfig(base="b", dataset="d.jsonl", learning_rate=1e-3, weight_decay=0.01)
    model = _model()
    optimizer, _ = build_optimizer(model, cfg, total_steps=10, device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model[1].parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_warmup_then_linear_decay_to_zero():
    cfg = TrainConfig(base="b", dataset="d.jsonl", learning_rate=1.0, lr_scheduler="linear", warmup_ratio=0.2)
    optimizer, scheduler = build_optimizer(_model(), cfg, total_steps=10, device_type="cpu")
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    warmup = math.ceil(0.2 * 10)
    assert lrs[: warmup + 1] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[-1] == pytest.approx(1.0 / 8) and scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_paged_8bit_adamw_needs_cuda():
    cfg = TrainConfig(base="b", dataset="d.jsonl", optimizer="paged_adamw_8bit")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        build_optimizer(_model(), cfg, total_steps=10, device_type="cpu")
