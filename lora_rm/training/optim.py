"""The optimizer of a run: `--learning-rate auto`, the parameter groups (head and LoRA) and the schedule. The
precision for a device is `lora_rm.model.precision`'s."""

from __future__ import annotations

import math
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.model.load import HEAD_NAMES
from lora_rm.model.precision import reads_last_token

AUTO_LR_DECODER, AUTO_LR_OTHER, AUTO_LR_WIDTH = 2e-3, 1e-3, 576


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
