"""Plan GPU memory before a run from the model config alone: weights, trainable state, activations.

The model is built on the meta device (no weights) to count its parameters by kind. Sizes are bytes, for a
CUDA GPU with bf16/fp16 autocast, SDPA attention and 2 * batch_size sequences of max_length tokens per
micro-batch: the worst case (real batches are padded to their longest sequence only).

Activations kept per token per layer (h hidden, f MLP width, a heads, T tokens, r LoRA rank), adapted from
Korthikanti et al. 2022 (34h + 5aT bytes in 16-bit; here no T x T scores with SDPA, no dropout masks):
  norms      8h            two norms run in fp32 and keep a 4-byte copy of their input
  attention  8h + 4a + 2T  SDPA keeps q, k, v, out in 16-bit (GQA heads repeated: there is a padding mask),
                           a fp32 logsumexp per head and the 16-bit additive mask made from the padding mask
  MLP        e*k*f         k f-wide tensors the nonlinearity keeps (1 for gelu/silu and for gelu_new, which
                           lora_rm computes fused (`model.fuse_gelu`), 2-7 for other python GELUs, +2 when
                           gated: act(gate) * up keeps both); e = 2 bytes with a bf16 base, 4 with an 8/4-bit
                           base (its layers return their fp32 input's dtype; PEFT upcasts norms to fp32)
  LoRA       (2+d)*in + 2r per adapted module: lora_A's 16-bit input, a 1-byte dropout mask (d = 1 when
                           lora_dropout > 0), lora_A's output
  int8 held  e*(2h + f)    bitsandbytes' int8 matmul keeps its input on ctx (attention, MLP, down-proj inputs)
Frozen 16-bit and 4-bit Linear layers keep nothing (no weight gradient, so no saved input). Outside the
layers: 6h. With non-reentrant checkpointing each layer keeps only its input (e*h) and the int8-held inputs
(on ctx, out of checkpointing's reach), and one layer is recomputed in full.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from lora_rm.config import parse_size
from lora_rm.errors import UserError

MIB, GIB = 2**20, 2**30
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context, cuBLAS/cuDNN handles: used on the card, not by tensors
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation and short-lived backward buffers, of all tensors
OPTIMIZER_STATE_BYTES = {"adamw": 8, "paged_adamw_8bit": 2}  # two moments per trainable param
# f-wide tensors each MLP nonlinearity keeps for backward (measured with saved_tensors_hooks); others keep 1,
# gelu_new too since `lora_rm.model.load.fuse_gelu` runs it as one fused op (4 otherwise)
ACTIVATION_SAVES = {"gelu_accurate": 4, "gelu_fast": 7, "gelu_python": 3, "quick_gelu": 2}
GATED_MLP_NAMES = ("gate_proj", "gate_up_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model, counted on the meta device."""

    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    activation: str
    gated_mlp: bool
    quantized: tuple[tuple[int, int], ...]  # (params, output rows) of each Linear bitsandbytes quantizes
    other_params: int  # never quantized: embeddings, norms, biases, the head (and BERT's pooler)
    head_params: int  # the reward head; PEFT also trains and saves a copy of it
    lora_targets: tuple[tuple[int, int], ...]  # (in, out) features of each module LoRA adapts
    target_modules: tuple[str, ...]

    @property
    def linear_params(self) -> int:
        return sum(n for n, _ in self.quantized)

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params


@dataclass(frozen=True)
class Estimate:
    """Peak GPU memory of one training step, by part."""

    batch_size: int
    weights: int
    trainable: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.overhead


def default_targets(model_type: str) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    if model_type not in defaults:
        raise UserError(
            f"{model_type}: PEFT has no default LoRA target modules for it; name them (--target-modules)"
        )
    return list(defaults[model_type])


def _targeted(name: str, targets: list[str]) -> bool:
    """PEFT's rule: a module is adapted when its name is a target or ends with "." + a target."""
    return targets == ["all-linear"] or any(name == t or name.endswith("." + t) for t in targets)


def model_shape(config: Any, target_modules: list[str] | None = None) -> ModelShape:
    """Count a sequence-classification model's parameters by kind, without weights (meta device).

    Raises UserError for a config transformers cannot build as AutoModelForSequenceClassification, one
    without layer/hidden/head counts, or target modules that match nothing.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    from lora_rm.model.load import HEAD_NAMES, KEEP_FULL_PRECISION

    config = copy.deepcopy(config)
    config.num_labels = 1
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
        n_layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{config.model_type}: cannot plan a sequence-classification model of it ({e})"
        ) from None
    targets = list(target_modules or default_targets(config.model_type))
    quantized, lora, other, head, seen = [], [], 0, 0, set()
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen |= {id(p) for p in params}
        in_out = None
        if isinstance(module, torch.nn.Linear):
            in_out = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2: weight stored (in, out)
            in_out = tuple(module.weight.shape)
        if name.split(".")[0] in HEAD_NAMES:
            head += sum(p.numel() for p in params)
        elif in_out and _targeted(name, targets):
            lora.append(in_out)
        if in_out and not set(name.split(".")) & set(KEEP_FULL_PRECISION):
            quantized.append((module.weight.numel(), in_out[1]))
            params = [p for p in params if p is not module.weight]
        other += sum(p.numel() for p in params)
    if not lora:
        raise UserError(f"LoRA target modules {targets} match no Linear layer of {config.model_type}")
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    return ModelShape(
        model_type=config.model_type,
        n_layers=n_layers,
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * hidden,
        heads=heads,
        activation=act if isinstance(act, str) else "gelu",
        gated_mlp=any(n.endswith(GATED_MLP_NAMES) for n, _ in model.named_modules()),
        quantized=tuple(quantized),
        other_params=other,
        head_params=head,
        lora_targets=tuple(lora),
        target_modules=tuple(targets),
    )


def int8_bytes(params: int, rows: int) -> int:
    """LLM.int8: one byte per weight and a fp32 scale per output row."""
    return params + 4 * rows


def nf4_bytes(params: int) -> int:
    """NF4 with double quantization: 4 bits per weight, an 8-bit absmax per block of 64 weights and a fp32
    scale per 256 blocks (0.127 bits per weight)."""
    blocks = math.ceil(params / 64)
    return math.ceil(params / 2) + blocks + 4 * math.ceil(blocks / 256)


def weight_bytes(shape: ModelShape, quant: str) -> int:
    """The frozen base on the GPU: a bf16 base, or quantized Linear weights and the rest upcast to fp32."""
    if quant == "none":
        return 2 * shape.total_params
    if quant == "8bit":
        linear = sum(int8_bytes(n, rows) for n, rows in shape.quantized)
    else:
        linear = sum(nf4_bytes(n) for n, _ in shape.quantized)
    return linear + 4 * shape.other_params


def lora_params(shape: ModelShape, r: int) -> int:
    return r * sum(i + o for i, o in shape.lora_targets)


def trainable_bytes(shape: ModelShape, r: int, optimizer: str = "adamw") -> int:
    """LoRA + the head copy: fp32 weight, fp32 grad and the optimizer's two moments per parameter."""
    return (lora_params(shape, r) + shape.head_params) * (8 + OPTIMIZER_STATE_BYTES[optimizer])


@dataclass(frozen=True)
class TokenBytes:
    """Activation bytes per token, in the terms of the module docstring."""

    layer: float  # everything one layer keeps (LoRA and int8-held inputs included)
    layer_input: float  # what checkpointing keeps of a layer besides the int8-held inputs
    held: float  # int8-held inputs of one layer
    outside: float  # outside the layers


def token_bytes(
    shape: ModelShape, quant: str, r: int, seq_len: int, lora_dropout: float = 0.05
) -> TokenBytes:
    h, f, e = shape.hidden, shape.intermediate, 2 if quant == "none" else 4
    k = ACTIVATION_SAVES.get(shape.activation, 1) + (2 if shape.gated_mlp else 0)
    lora = sum((2 + (lora_dropout > 0)) * i + 2 * r for i, _ in shape.lora_targets) / shape.n_layers
    held = e * (2 * h + f) if quant == "8bit" else 0
    layer = 8 * h + (8 * h + 4 * shape.heads + 2 * seq_len) + e * k * f + lora + held
    return TokenBytes(layer=layer, layer_input=e * h, held=held, outside=6 * h)


def activation_bytes(
    shape: ModelShape,
    quant: str,
    r: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    lora_dropout: float = 0.05,
) -> int:
    """Activations alive when backward starts, for `batch_size` pairs (2 * batch_size sequences)."""
    t = token_bytes(shape, quant, r, seq_len, lora_dropout)
    # checkpointing: each layer keeps its input and int8-held inputs, and one layer is recomputed in full
    per_layer, recomputed = (t.layer_input + t.held, t.layer) if checkpointing else (t.layer, 0)
    return round(2 * batch_size * seq_len * (shape.n_layers * per_layer + recomputed + t.outside))


def estimate(
    shape: ModelShape,
    quant: str,
    r: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    optimizer: str = "adamw",
    lora_dropout: float = 0.05,
) -> Estimate:
    """Peak memory of a training step. Overhead: the CUDA context, a 16-bit copy of the largest quantized
    Linear (dequantized in backward) and ALLOCATOR_SLACK of all tensors."""
    weights = weight_bytes(shape, quant)
    trainable = trainable_bytes(shape, r, optimizer)
    acts = activation_bytes(shape, quant, r, batch_size, seq_len, checkpointing, lora_dropout)
    workspace = 2 * max(n for n, _ in shape.quantized) if quant != "none" and shape.quantized else 0
    slack = ALLOCATOR_SLACK * (weights + trainable + acts + workspace)
    return Estimate(batch_size, weights, trainable, acts, CUDA_CONTEXT_BYTES + workspace + round(slack))


def largest_batch(budget: int, limit: int = 4096, **kwargs: Any) -> int:
    """The most pairs per micro-batch whose estimate fits `budget` (0 if not even one); kwargs go to estimate."""
    best = 0
    while best < limit and estimate(batch_size=best + 1, **kwargs).total <= budget:
        best += 1
    return best


def fit_to_vram(cfg: Any, model_config: Any, max_length: int | None = None) -> tuple[int, int, bool, str]:
    """(batch_size, gradient_accumulation_steps, gradient_checkpointing, message) that fit `cfg.vram`.

    Keeps the effective batch (batch_size * accumulation) and never raises the micro-batch above
    cfg.batch_size: prefers the largest micro-batch that divides the effective batch and fits without
    checkpointing (unless cfg asks for it), then with it. Raises UserError when even one pair with
    checkpointing does not fit.
    """
    from lora_rm.data.encode import default_max_length

    budget = parse_size(cfg.vram)
    seq_len = max_length or cfg.max_length or default_max_length(model_config, None)
    shape = model_shape(model_config, cfg.target_modules)
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    common = dict(shape=shape, quant=cfg.quant, r=cfg.lora_r, seq_len=seq_len, optimizer=cfg.optimizer)
    common["lora_dropout"] = cfg.lora_dropout
    for checkpointing in (True,) if cfg.gradient_checkpointing else (False, True):
        for b in (b for b in range(cfg.batch_size, 0, -1) if effective % b == 0):
            est = estimate(batch_size=b, checkpointing=checkpointing, **common)
            if est.total <= budget:
                message = (
                    f"vram {cfg.vram}: {b} pairs per micro-batch x {effective // b} accumulation steps "
                    f"(effective batch {effective} kept), gradient checkpointing {'on' if checkpointing else 'off'}; "
                    f"estimated peak {est.total / GIB:.2f} of {budget / GIB:.2f} GiB at {seq_len} tokens "
                    "(lora-rm plan shows the breakdown)"
                )
                return b, effective // b, checkpointing, message
    need = estimate(batch_size=1, checkpointing=True, **common).total
    raise UserError(
        f"vram: {cfg.base} ({cfg.quant}) needs about {need / GIB:.2f} GiB for one pair of {seq_len} tokens "
        f"even with gradient checkpointing, more than {cfg.vram} ({budget / GIB:.2f} GiB); try --quant 4bit, "
        "a shorter --max-length or a smaller --lora-r"
    )
