"""One training run: check data and model, then a plain PyTorch loop on `accelerate`, then save."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.batch import shard_batches
from lora_rm.checkpoint import fingerprint, load_checkpoint, resume_checkpoint
from lora_rm.config import TrainConfig, check_against_model
from lora_rm.encode import LengthReport, default_max_length, prepare_pairs
from lora_rm.errors import UserError
from lora_rm.evaluate import evaluate, write_full_eval, write_reward_stats
from lora_rm.export import merge_adapter, save_adapter
from lora_rm.fit import LoopState, fit, trim_metrics
from lora_rm.layout import choose_layout
from lora_rm.loss import loss_near_chance
from lora_rm.model import (
    SEQUENCE_FORMAT,
    add_lora,
    check_quantization,
    load_base_model,
    load_tokenizer,
    resolve_base,
)
from lora_rm.optim import build_optimizer, resolve_precision
from lora_rm.outdir import claim_output_dir, clear_previous_run

# Options a resume may change freely: they do not change what is trained, or (data paths, split) what
# they change is caught by the fingerprint of the tokenized training pairs itself.
RESUME_FREE = {
    "dataset",
    "split",
    "output_dir",
    "resume",
    "force_resume",
    "overwrite_output_dir",
    "eval_steps",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "merge",
    "max_bad_steps",
    "skip_invalid",
    "eval_dataset",
    "eval_fraction",
    "vram",  # what it changes (batch size, accumulation, checkpointing) is in the fingerprint itself
    "push_to_hub",
    "private",
}


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


def _resume_point(cfg: TrainConfig, fingerprints: dict[str, str], log: Any = print) -> Path | None:
    if not cfg.resume:
        return None
    path = resume_checkpoint(cfg.output_dir, cfg.resume, log)  # the newest intact one; damaged ones reported
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))["trainer"]["fingerprints"]
    changed = [k for k in fingerprints if saved.get(k) != fingerprints[k]]
    if changed and not cfg.force_resume:
        raise UserError(
            f"{path}: the {' and '.join(changed)} differ from the checkpoint's; "
            "resuming would not continue the same run (--force-resume to do it anyway)"
        )
    return path


def tracker(name: str) -> str:
    """The accelerate tracker for --report-to, or a UserError naming the package to install."""
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[name]
    if not any(importlib.util.find_spec(p) for p in packages):
        raise UserError(
            f"report_to: {name} is not installed (pip install {packages[0]}); metrics.jsonl is always written"
        )
    return name


def check_distributed(distributed_type: Any) -> None:
    """Refuse the accelerate back-ends this loop does not drive correctly, before anything is written.

    DeepSpeed steps the optimizer inside `accelerator.backward` unless accumulation goes through
    `accelerator.accumulate`, which this loop's pair-normalised windows do not use: every micro-batch would
    become an optimizer step. DDP (several GPUs, machines or CPU processes) and FSDP are supported.
    """
    name = getattr(distributed_type, "value", str(distributed_type))
    if name in ("DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise UserError(
            f"accelerate is set up for {name}, which lora_rm's training loop does not support; "
            "use DDP (distributed_type: MULTI_GPU) or FSDP (examples/accelerate/)"
        )


def train(cfg: TrainConfig, log: Any = print) -> TrainResult:
    """Train a LoRA reward model as `cfg` says and save it under `cfg.output_dir`.

    All input (config, data, tokenizer, model, resume checkpoint) is checked before anything but a lock file
    is written to the output directory; problems raise UserError, as do a second run into the same folder, a
    fresh run over another run's outputs (without --overwrite-output-dir) and failed writes. Raises
    TrainingStopped after saving a checkpoint when stopped by a signal or by `cfg.max_bad_steps` non-finite
    steps in a row.
    """
    with claim_output_dir(cfg, main_process=os.environ.get("RANK", "0") == "0"):
        return _train(cfg, log)


def _train(cfg: TrainConfig, log: Any = print) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    started = time.perf_counter()
    cfg = dataclasses.replace(cfg, base=resolve_base(cfg.base))  # recorded so it loads from anywhere
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mixed_precision = resolve_precision(cfg.precision, device_type)
    check_quantization(cfg.quant, device_type)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=device_type == "cpu",
        log_with=None if cfg.report_to == "none" else tracker(cfg.report_to),
        project_dir=cfg.output_dir,
    )
    log = log if accelerator.is_main_process else (lambda *_a, **_k: None)
    check_distributed(accelerator.distributed_type)
    if accelerator.num_processes > 1:
        log(f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value})")
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.base, cfg.revision, cfg.trust_remote_code)
    try:
        model_config = AutoConfig.from_pretrained(
            cfg.base, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.base}: cannot read the model config ({type(e).__name__})") from None
    check_against_model(cfg, model_config, device_type)
    max_length = cfg.max_length or default_max_length(model_config, tokenizer)
    if cfg.vram:  # micro-batch, accumulation and checkpointing that fit the card; the effective batch is kept
        from lora_rm.plan import fit_to_vram

        pairs, steps, ckpt, message = fit_to_vram(cfg, model_config, max_length)
        cfg = dataclasses.replace(
            cfg, batch_size=pairs, gradient_accumulation_steps=steps, gradient_checkpointing=ckpt
        )
        log(message)
    train_pairs, eval_pairs, reports = prepare_pairs(cfg, tokenizer, max_length, log)
    fingerprints = {
        "data": fingerprint([[p.chosen, p.rejected, p.margin] for p in train_pairs]),
        "config": fingerprint({k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}),
    }
    resume_from = _resume_point(cfg, fingerprints, log)

    quantized = cfg.quant != "none"
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
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
    trainable, total = (
        sum(p.numel() for p in model.parameters() if p.requires_grad or not only) for only in (True, False)
    )
    log(
        f"model: {cfg.base} ({cfg.quant}), {trainable:,} trainable of {total:,} parameters; "
        f"precision {'fp32' if mixed_precision == 'no' else mixed_precision}"
    )

    world = accelerator.num_processes
    collator, plan_epoch = choose_layout(cfg, model, train_pairs, tokenizer.pad_token_id, max_length, log)
    k = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or sum(
        math.ceil(len(shard_batches(plan_epoch(e), 0, world)) / k) for e in range(cfg.epochs)
    )
    optimizer, scheduler = build_optimizer(model, cfg, total_steps, device_type)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = LoopState()
    if resume_from:
        saved = load_checkpoint(
            resume_from, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler
        )
        state = LoopState.from_dict(saved["loop"])
        log(f"resumed from {resume_from} at step {state.step}")

    out = Path(cfg.output_dir)
    if accelerator.is_main_process:  # --overwrite-output-dir: the old run goes only now, all input checked
        clear_previous_run(out, cfg, log)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {
        **cfg.to_dict(),
        "max_length": max_length,
        "data_format": reports["format"],
        "sequence_format": SEQUENCE_FORMAT,  # tokenizer(text), read at its last non-pad token
        "mixed_precision": mixed_precision,
        "total_steps": total_steps,
    }
    if accelerator.is_main_process:
        (out / "config.json").write_text(json.dumps(run_config, indent=2), encoding="utf-8")
        trim_metrics(out / "metrics.jsonl", state.step)
    accelerator.init_trackers(
        "lora_rm", config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))}
    )
    log(
        f"train: {len(train_pairs)} pairs, {total_steps} steps of {cfg.batch_size} x "
        f"{cfg.gradient_accumulation_steps} x {world} pairs; writing to {out}"
    )

    eval_metrics = fit(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        train_pairs,
        eval_pairs,
        collator,
        plan_epoch,
        state,
        total_steps,
        out,
        fingerprints,
        log,
    )
    if not eval_metrics and eval_pairs:  # resumed from the final checkpoint: the loop ran no eval
        eval_metrics = evaluate(model, eval_pairs, collator, cfg.batch_size * 2, accelerator)
    if eval_metrics and loss_near_chance(eval_metrics["loss"]):
        log(
            "warning: eval loss is ~ln 2: the model gives chosen and rejected nearly equal rewards; it has not learned"
        )

    accelerator.wait_for_everyone()
    adapter_dir, merged_dir = out / "adapter", None
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        # The full evaluation (every eval pair, plain rows) gives the run's one final number: the last
        # in-loop eval ran on the training layout, where an int8 base can differ in the last digits.
        report = write_full_eval(
            unwrapped, tokenizer, eval_pairs, out / "eval", [], out / "metrics.jsonl", cfg.batch_size * 2,
            source=cfg.eval_dataset or cfg.dataset, log=log,
        )  # fmt: skip
        if report:
            eval_metrics = {k: report[k] for k in ("loss", "accuracy", "ties", "n_pairs")}
            eval_metrics["mean_margin"] = report["margin_mean"]
        save_adapter(unwrapped, tokenizer, {**run_config, "eval": eval_metrics}, adapter_dir)
        log(f"saved adapter (LoRA + reward head) to {adapter_dir}")
        if cfg.merge:
            merged_dir = out / "merged"
            started_merge = time.perf_counter()
            check = merge_adapter(adapter_dir, merged_dir, (eval_pairs or train_pairs)[:8], base=cfg.base)
            log(
                f"saved merged model to {merged_dir} in {time.perf_counter() - started_merge:.1f}s "
                f"(max reward difference vs adapter {check['merge_max_abs_diff']:.2e})"
            )
        if report:  # the reward statistics `score(normalize=True)` uses, beside each model
            for folder in (adapter_dir, merged_dir):
                if folder is not None:
                    write_reward_stats(folder, report["reward_stats"], cfg.eval_dataset or cfg.dataset)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the model card in adapter/README.md; the upload with --push-to-hub
        from lora_rm.hub import publish

        publish(out, run_config, eval_metrics, log)  # a failed upload: UserError, local output kept
    accelerator.end_training()  # after the last barrier: it also ends the process group
    return TrainResult(
        out,
        adapter_dir,
        merged_dir,
        eval_metrics,
        state.step,
        time.perf_counter() - started,
        reports,
        unwrapped.eval(),
        tokenizer,
    )
