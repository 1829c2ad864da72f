"""Numerics of a run: the mixed precision for a device, and the optimizer with its schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError


def resolve_precision(precision: str, device_type: str) -> str:
    """accelerate's mixed_precision for `precision`: 'bf16', 'fp16' or 'no'.

    auto: bf16 on GPUs that have it and on CPUs with AVX512-BF16/AMX (elsewhere bf16 matmuls are
    emulated and far slower than fp32), fp16 with a grad scaler on older GPUs, fp32 otherwise.
    """
    if precision == "fp32":
        return "no"
    if precision != "auto":
        if precision == "fp16" and device_type == "cpu":
            raise UserError("precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu = getattr(torch, "cpu", None)
    fast_bf16 = any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bf16" if device_type == "cpu" and fast_bf16 else "no"


def build_optimizer(model: Any, cfg: TrainConfig, total_steps: int, device_type: str) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "paged_adamw_8bit":
        if device_type != "cuda":
            raise UserError("optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw")
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler
