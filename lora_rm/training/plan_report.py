"""`lora-rm plan`: read a model config and print lora_rm.training.plan's memory estimate as a table."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from lora_rm.args import options_parser
from lora_rm.config import parse_size
from lora_rm.errors import UserError
from lora_rm.training.plan import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    GIB,
    OPTIMIZER_STATE_BYTES,
    ModelShape,
    estimate,
    largest_batch,
    lora_params,
    model_shape,
    token_bytes,
)

WEIGHT_FORMATS = {
    "8bit": "int8 + a fp32 scale per row",
    "4bit": "NF4 (double-quantized)",
    "none": "bf16",
}


def _pairs(n: int) -> str:
    return f"{n} pair{'' if n == 1 else 's'}"


def _m(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_plan(
    name: str,
    shape: ModelShape,
    quant: str,
    r: int,
    seq_len: int,
    batch_sizes: list[int],
    checkpointing: bool = False,
    vram: str | None = None,
    optimizer: str = "adamw",
    lora_dropout: float = 0.05,
) -> str:
    """The estimate as text: the model, what each part holds, a row per micro-batch size and, with `vram`,
    the largest micro-batch that fits with and without gradient checkpointing."""
    common = dict(
        shape=shape, quant=quant, r=r, seq_len=seq_len, optimizer=optimizer, lora_dropout=lora_dropout
    )
    base = estimate(batch_size=1, checkpointing=checkpointing, **common)
    lora = lora_params(shape, r)
    per_token = token_bytes(shape, quant, r, seq_len, lora_dropout)
    others = "others (embeddings, norms, biases, head) in " + ("bf16" if quant == "none" else "fp32")
    state = 8 + OPTIMIZER_STATE_BYTES[optimizer]
    lines = [
        f"{name}: {shape.model_type}, {_m(shape.total_params)} parameters, {shape.n_layers} layers, "
        f"hidden {shape.hidden}, MLP {shape.intermediate} ({shape.activation}{', gated' if shape.gated_mlp else ''})",
        f"{quant} base, LoRA r={r} on {', '.join(shape.target_modules)}: {lora:,} LoRA + {shape.head_params:,} "
        f"head = {lora + shape.head_params:,} trainable parameters; {optimizer}; {seq_len} tokens per sequence",
        "",
        f"  weights      {base.weights / GIB:6.2f} GiB  {_m(shape.linear_params)} Linear params in "
        f"{WEIGHT_FORMATS[quant]}, {_m(shape.other_params)} {others}",
        f"  trainable    {base.trainable / GIB:6.2f} GiB  {state} bytes per trainable param: fp32 weight, "
        f"fp32 grad, two optimizer moments",
        f"  activations  {per_token.layer / 1024:6.1f} KiB per token per layer; with checkpointing "
        f"{(per_token.layer_input + per_token.held) / 1024:.1f} KiB per token per layer"
        + (" (int8 inputs included)" if per_token.held else "")
        + " + one layer recomputed",
        f"  overhead     {CUDA_CONTEXT_BYTES / GIB:6.2f} GiB  CUDA context, plus"
        + (" a 16-bit copy of the largest Linear and" if quant != "none" else "")
        + f" {ALLOCATOR_SLACK:.0%} of all tensors for allocator slack",
        "",
    ]
    budget = parse_size(vram) if vram else None
    mode = "on" if checkpointing else "off"
    header = f"  {'pairs':>5}  {'tokens':>7}  {'activations':>11}  {'overhead':>8}  {'peak':>6}"
    lines.append(header + (f"  fits {vram}" if vram else "") + f"   (GiB; gradient checkpointing {mode})")
    for b in batch_sizes:
        est = estimate(batch_size=b, checkpointing=checkpointing, **common)
        row = (
            f"  {b:>5}  {2 * b * seq_len:>7}  {est.activations / GIB:>11.2f}  {est.overhead / GIB:>8.2f}"
            f"  {est.total / GIB:>6.2f}"
        )
        lines.append(row + (f"  {'yes' if est.total <= budget else 'no':>{5 + len(vram)}}" if budget else ""))
    lines.append("")
    if budget:
        off, on = (largest_batch(budget, checkpointing=c, **common) for c in (False, True))
        lines.append(
            f"largest micro-batch within {vram} ({budget / GIB:.2f} GiB): {_pairs(off)} without gradient "
            f"checkpointing, {_pairs(on)} with it"
            + (
                ""
                if on
                else f"; one pair needs {estimate(batch_size=1, checkpointing=True, **common).total / GIB:.2f} GiB"
            )
        )
    lines.append(
        f"Worst case: every sequence padded to {seq_len} tokens. An estimate from arithmetic, not a measurement."
    )
    return "\n".join(lines)


# The TrainConfig options an estimate reads; their flags are TrainConfig's own (lora_rm.args).
PLAN_OPTIONS = (
    "base", "max_length", "quant", "lora_r", "lora_dropout", "target_modules", "gradient_checkpointing",
    "optimizer", "vram", "revision", "trust_remote_code",
)  # fmt: skip


def plan_parser() -> argparse.ArgumentParser:
    parser = options_parser(
        PLAN_OPTIONS,
        field_defaults=True,
        prog="lora-rm plan",
        description="Estimate the peak GPU memory of training from the model config alone (no weights are read).",
    )
    parser.add_argument(
        "--batch-sizes",
        "--batch_sizes",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="pairs per micro-batch, one row each",
    )
    return parser


def plan_command(argv: list[str]) -> int:
    """`lora-rm plan ...`: print the estimate; UserError for bad flags or an unreadable config."""
    from transformers import AutoConfig

    from lora_rm.data.encode import default_max_length
    from lora_rm.model.load import hub_load_error
    from lora_rm.util.offline import is_local, require_hub

    args = plan_parser().parse_args(argv)
    problems = [
        f"--{n.replace('_', '-')}: must be > 0"
        for n in ("max_length", "lora_r")
        if (getattr(args, n) or 1) <= 0
    ]
    problems += ["--batch-sizes: must all be > 0"] if min(args.batch_sizes) <= 0 else []
    problems += [] if 0 <= args.lora_dropout < 1 else ["--lora-dropout: must be in [0, 1)"]
    problems += [] if args.base else ["--base: required (a hub id or a local model folder)"]
    if args.vram:
        parse_size(args.vram)
    if problems:
        raise UserError("; ".join(problems))
    require_hub(args.base, "model config")  # seconds, not a minute of retries, when the hub is out of reach
    from_hub = not is_local(args.base)
    if from_hub:
        print(f"{args.base}: reading config.json from the Hugging Face Hub ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        config: Any = AutoConfig.from_pretrained(
            args.base, revision=args.revision, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise hub_load_error(args.base, e, "model config") from None
    if from_hub:
        print(f"{args.base}: config read in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    shape = model_shape(config, args.target_modules)
    seq_len = args.max_length or default_max_length(config, None)
    print(
        format_plan(
            args.base,
            shape,
            args.quant,
            args.lora_r,
            seq_len,
            args.batch_sizes,
            args.gradient_checkpointing,
            args.vram,
            args.optimizer,
            args.lora_dropout,
        )  # fmt: skip
    )
    return 0
