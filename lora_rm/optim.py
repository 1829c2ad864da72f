"""Numerics of a run: the mixed precision for a device, and the optimizer with its schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.model import HEAD_NAMES


def resolve_precision(precision: str, device_type: str, quant: str = "none") -> str:
    """accelerate's mixed_precision for `precision`: 'bf16', 'fp16' or 'no' (`choose_precision`)."""
    return choose_precision(precision, device_type, quant)[0]


def choose_precision(precision: str, device_type: str, quant: str = "none") -> tuple[str, str]:
    """(accelerate's mixed_precision, why) for `precision` on `device_type` with a `quant` base.

    auto picks the fastest for the machine: bf16 on GPUs that have it, fp16 with a grad scaler on older
    GPUs; on CPU, fp32 for an 8-bit or 4-bit base (bitsandbytes' CPU kernels dequantize to fp32, and bf16
    autocast around them is slower per step: docs/performance.md), bf16 for an unquantized
    base on CPUs with AVX512-BF16/AMX (elsewhere bf16 matmuls are emulated and far slower than fp32), else
    fp32. Explicit precisions are kept; fp16 on CPU is a UserError.
    """
    if precision == "fp32":
        return "no", "asked for"
    if precision != "auto":
        if precision == "fp16" and device_type == "cpu":
            raise UserError("precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
        return precision, "asked for"
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU has bf16"
        return "fp16", "auto: the GPU lacks bf16; fp16 with a grad scaler"
    if device_type != "cpu":
        return "no", f"auto: {device_type}"
    if quant != "none":
        return "no", (
            f"auto: on CPU the {quant} base runs fastest in fp32 (bitsandbytes' CPU kernels work in fp32; bf16 "
            f"autocast around them is several times slower); {quant} saves memory here, not time"
        )
    cpu = getattr(torch, "cpu", None)
    fast_bf16 = any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    if fast_bf16:
        return "bf16", "auto: this CPU has AVX512-BF16/AMX"
    return "no", "auto: this CPU lacks AVX512-BF16/AMX, where bf16 is emulated and slower than fp32"


AUTO_LR_DECODER, AUTO_LR_OTHER, AUTO_LR_WIDTH = 2e-3, 1e-3, 576


def reads_last_token(model_config: Any) -> bool:
    """Whether the base is a causal decoder (GPT-2, Llama, Qwen, ...), whose sequence-classification model
    reads the reward at the last token, rather than an encoder (BERT, DeBERTa, ...), which reads it through the
    first token: a model type transformers has causal-LM classes for and no masked-LM class."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(model_config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def auto_learning_rate(model_config: Any) -> tuple[float, str]:
    """`--learning-rate auto`: (rate, why) for a base with this transformers config.

    For bases up to 576 wide, 2e-3 for causal decoders and 1e-3 for other bases (encoders), the rates measured
    best or within 1 point of the best of 1e-5..3e-3 for LoRA reward models on a decoder and an encoder
    (`benchmarks/defaults.py`; the figures are in docs/benchmarks.md, "Do the defaults learn?"). Wider bases get
    that rate x 576 / width, the field's practice of lower rates for wider models (QLoRA: 2e-4 at 7B/13B, 1e-4
    at 33B/65B; for a decoder this gives 2.8e-4 at 4096, 2.2e-4 at 5120, 1.4e-4 at 8192), which a CPU cannot
    measure.
    """
    if reads_last_token(model_config):
        rate, kind = AUTO_LR_DECODER, "a causal decoder"
    else:
        rate, kind = AUTO_LR_OTHER, "a base other than a causal decoder"
    width = getattr(model_config, "hidden_size", None)
    if not isinstance(width, int) or width <= AUTO_LR_WIDTH:
        return rate, f"auto: {rate:g} for {kind} up to {AUTO_LR_WIDTH} wide"
    lr = float(f"{rate * AUTO_LR_WIDTH / width:.2g}")
    return lr, f"auto: {rate:g} for {kind}, x {AUTO_LR_WIDTH} / {width}, the base's width"


def param_groups(model: Any, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: the reward head (`score`/`classifier`, PEFT's trained
    copy included) at `head_lr`, everything else (the LoRA adapters) at `lr`; one group when `head_lr` is None."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    in_head = [any(part in HEAD_NAMES for part in name.split(".")) for name, _ in trainable]
    groups = [
        {"params": [p for (_, p), head in zip(trainable, in_head) if not head], "lr": lr},
        {"params": [p for (_, p), head in zip(trainable, in_head) if head], "lr": head_lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: Any, cfg: TrainConfig, total_steps: int, device_type: str) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = param_groups(model, cfg.learning_rate, cfg.head_learning_rate)
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
