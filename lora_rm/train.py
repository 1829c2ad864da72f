"""One training run: check data and model, then a plain PyTorch loop on `accelerate`, then save."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.batch import PreferenceBatch, PreferenceCollator, plan_batches, shard_batches
from lora_rm.config import TrainConfig
from lora_rm.data import check_rows, detect_format, load_rows, split_rows
from lora_rm.encode import EncodedPair, LengthReport, default_max_length, encode_pairs
from lora_rm.errors import UserError
from lora_rm.evaluate import evaluate
from lora_rm.export import merge_adapter, save_adapter
from lora_rm.loss import PairStats, loss_near_chance, pairwise_loss
from lora_rm.model import add_lora, compute_rewards, load_base_model, load_tokenizer


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its final evaluation."""

    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    eval_metrics: dict[str, Any]
    steps: int
    seconds: float
    reports: dict[str, LengthReport] = field(default_factory=dict)
    model: Any = None  # the trained PEFT model, unwrapped, in eval mode
    tokenizer: Any = None


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


def load_pairs(
    cfg: TrainConfig, tokenizer: Any, max_length: int, log: Any = print
) -> tuple[list[EncodedPair], list[EncodedPair], dict]:
    """Read, check, split and tokenize the data. Raises UserError before anything is written."""
    train_rows, own_eval_rows = load_rows(cfg.dataset, cfg.split)
    fmt = detect_format(train_rows, cfg.dataset)
    check_rows(train_rows, fmt, cfg.dataset)
    if cfg.eval_dataset or own_eval_rows:
        eval_source = cfg.eval_dataset or f"{cfg.dataset} (its own eval split)"
        eval_rows = load_rows(cfg.eval_dataset)[0] if cfg.eval_dataset else own_eval_rows
        eval_fmt = detect_format(eval_rows, eval_source)
        if eval_fmt != fmt:
            raise UserError(f"{eval_source}: eval data is {eval_fmt} but training data is {fmt}")
        check_rows(eval_rows, fmt, eval_source)
    else:
        train_rows, eval_rows = split_rows(train_rows, cfg.eval_fraction, cfg.seed)
        eval_source = f"{cfg.dataset} ({cfg.eval_fraction:.0%} held out)"
    train_pairs, train_report = encode_pairs(train_rows, fmt, tokenizer, max_length)
    eval_pairs, eval_report = encode_pairs(eval_rows, fmt, tokenizer, max_length)
    if not train_pairs:
        raise UserError(
            f"{cfg.dataset}: no training pairs left after the length policy ({train_report.summary()})"
        )
    log(f"data: {fmt} format; train: {train_report.summary()}")
    if eval_rows:
        log(f"data: eval from {eval_source}: {eval_report.summary()}")
    return train_pairs, eval_pairs, {"format": fmt, "train": train_report, "eval": eval_report}


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


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def backward_window(
    model: Any,
    batches: Iterable[PreferenceBatch],
    accelerator: Any,
    center_coefficient: float = 0.0,
    stats: PairStats | None = None,
) -> PairStats:
    """Forward and backward every micro-batch of one accumulation window; grads are left for one step.

    Each .backward() adds to the grads, so every micro-batch's summed loss is divided by the pairs in
    the whole window (over all processes): k micro-batches of b pairs give exactly the gradient of one
    batch of k*b pairs, and a short last window is not under-weighted. Returns `stats` updated.
    """
    batches = list(batches)
    stats = stats if stats is not None else PairStats()
    local_pairs = torch.tensor(sum(b.num_pairs for b in batches), device=accelerator.device)
    window_pairs = accelerator.reduce(local_pairs, "sum").item()
    world = accelerator.num_processes
    for i, batch in enumerate(batches):
        batch = batch.to(accelerator.device)
        # Only the last micro-batch syncs grads across processes.
        sync = accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            rewards = compute_rewards(model, batch.input_ids, batch.attention_mask)
            r_c, r_r = rewards[: batch.num_pairs], rewards[batch.num_pairs :]
            losses = pairwise_loss(r_c, r_r, batch.margin, center_coefficient)
            # DDP averages grads over processes; scale back so the result is a per-pair mean.
            accelerator.backward(losses.sum() * world / window_pairs)
        stats.add(r_c.detach(), r_r.detach(), losses.detach())
    return stats


def train(cfg: TrainConfig, log: Any = print) -> TrainResult:
    """Train a LoRA reward model as `cfg` says and save it under `cfg.output_dir`.

    All input (config, data, tokenizer, model) is checked before the output directory is touched;
    problems raise UserError. Returns where the adapter (and merged model) went and the final eval.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mixed_precision = resolve_precision(cfg.precision, device_type)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device_type == "cpu")
    is_main = accelerator.is_main_process
    log = log if is_main else (lambda *_a, **_k: None)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.base, cfg.revision, cfg.trust_remote_code)
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(
            cfg.base, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.base}: cannot read the model config ({type(e).__name__})") from None
    max_length = cfg.max_length or default_max_length(model_config, tokenizer)
    train_pairs, eval_pairs, reports = load_pairs(cfg, tokenizer, max_length, log)

    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    quantized = cfg.quant != "none"
    model = load_base_model(
        cfg.base,
        tokenizer.pad_token_id,
        quant=cfg.quant,
        # int8/nf4 bases keep their other weights in the compute dtype; an unquantized base stays fp32 on CPU
        dtype=compute_dtype if quantized or device_type == "cuda" else torch.float32,
        seed=cfg.seed,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        device_map={"": accelerator.local_process_index} if quantized and device_type == "cuda" else None,
    )
    model = add_lora(
        model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.gradient_checkpointing
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(
        f"model: {cfg.base} ({cfg.quant}), {trainable:,} trainable of {total:,} parameters; precision {mixed_precision}"
    )

    k, world = cfg.gradient_accumulation_steps, accelerator.num_processes
    micro_per_epoch = math.ceil(math.ceil(len(train_pairs) / cfg.batch_size) / world)
    steps_per_epoch = math.ceil(micro_per_epoch / k)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    optimizer, scheduler = build_optimizer(model, cfg, total_steps, device_type)
    model, optimizer = accelerator.prepare(model, optimizer)

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("", encoding="utf-8")
    run_config = {
        **cfg.to_dict(),
        "max_length": max_length,
        "mixed_precision": mixed_precision,
        "total_steps": total_steps,
    }
    (out / "config.json").write_text(json.dumps(run_config, indent=2), encoding="utf-8")
    log(
        f"train: {len(train_pairs)} pairs, {total_steps} steps of {cfg.batch_size} x {k} x {world} pairs; writing to {out}"
    )

    collator = PreferenceCollator(tokenizer.pad_token_id)
    step, epoch, window_stats = 0, 0, PairStats()
    bar = tqdm(total=total_steps, disable=not is_main, desc="train", dynamic_ncols=True)
    eval_metrics: dict[str, Any] = {}
    skipped = 0
    model.train()
    while step < total_steps:
        batches = shard_batches(
            plan_batches(len(train_pairs), cfg.batch_size, cfg.seed, epoch), accelerator.process_index, world
        )
        for start in range(0, len(batches), k):
            window = batches[start : start + k]
            window_batches = (collator([train_pairs[j] for j in idx]) for idx in window)
            window_stats = backward_window(
                model, window_batches, accelerator, cfg.center_rewards_coefficient, window_stats
            )
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                skipped += 1  # a non-finite gradient would poison the weights: drop this step
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.logging_steps == 0 or step == total_steps:
                summary = window_stats.summary()
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": summary["loss"],
                    "accuracy": summary["accuracy"],
                }
                record |= {
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm or 0.0),
                    "skipped_steps": skipped,
                }
                bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
                if is_main:
                    _append_jsonl(metrics_path, record)
                window_stats = PairStats()
            if eval_pairs and (step % cfg.eval_steps == 0 or step == total_steps):
                eval_metrics = evaluate(model, eval_pairs, collator, cfg.batch_size * 2, accelerator)
                if is_main:
                    _append_jsonl(
                        metrics_path, {"step": step, **{f"eval_{k_}": v for k_, v in eval_metrics.items()}}
                    )
                log(
                    f"eval @ step {step}: loss {eval_metrics['loss']:.4f}, accuracy {eval_metrics['accuracy']:.3f} "
                    f"({eval_metrics['ties']} ties), mean margin {eval_metrics['mean_margin']:.3f}"
                )
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    if eval_metrics and loss_near_chance(eval_metrics["loss"]):
        log(
            "warning: eval loss is ~ln 2: the model gives chosen and rejected nearly equal rewards; it has not learned"
        )

    accelerator.wait_for_everyone()
    adapter_dir, merged_dir = out / "adapter", None
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        save_adapter(unwrapped, tokenizer, {**run_config, "eval": eval_metrics}, adapter_dir)
        log(f"saved adapter (LoRA + reward head) to {adapter_dir}")
        if cfg.merge:
            merged_dir = out / "merged"
            check = merge_adapter(adapter_dir, merged_dir, (eval_pairs or train_pairs)[:8], base=cfg.base)
            log(
                f"saved merged model to {merged_dir} (max reward difference vs adapter {check['merge_max_abs_diff']:.2e})"
            )
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    unwrapped = accelerator.unwrap_model(model).eval()
    return TrainResult(
        out, adapter_dir, merged_dir, eval_metrics, step, seconds, reports, unwrapped, tokenizer
    )
