"""Which precision a device trains and scores a model in, and how a model reads its reward (at the last token
or the first)."""

from __future__ import annotations

import os
from typing import Any

import torch

from lora_rm.errors import UserError


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


DTYPE_ENV = "LORA_RM_SCORE_DTYPE"  # the default of every scoring caller: auto, fp32, bf16 or fp16


def scoring_dtype(
    device: torch.device, dtype: torch.dtype | str | None = None, quant: str = "none"
) -> tuple[torch.dtype, str]:
    """(dtype, why) to score in: `dtype` when given (a torch dtype or auto/fp32/bf16/fp16), else $LORA_RM_SCORE_DTYPE,
    else auto: bf16 on GPUs that have it (fp16 on others) and on CPUs with AVX512-BF16/AMX, fp32 elsewhere and
    for a quantized base on the CPU (`lora_rm.model.precision.choose_precision`). Raises UserError for an unknown name."""
    if isinstance(dtype, torch.dtype):
        return dtype, "asked for"
    name = dtype or os.environ.get(DTYPE_ENV) or "auto"
    if name != "auto" and name not in DTYPES:
        raise UserError(f"dtype: one of auto, {', '.join(DTYPES)}; got {name!r}")
    if name != "auto":
        return DTYPES[name], "asked for" if dtype else f"${DTYPE_ENV}"
    precision, why = choose_precision("auto", device.type, quant)
    return DTYPES.get(precision, torch.float32), why
