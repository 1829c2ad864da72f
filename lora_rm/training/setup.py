"""A run's setup: check every input, load the model, choose the layout, build the optimizer, resume."""

from __future__ import annotations

import contextlib
import gc
import json
import math
from pathlib import Path
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.data.batches import shard_batches
from lora_rm.model.load import add_lora, init_head, load_base_model
from lora_rm.training.checkpoint import load_checkpoint
from lora_rm.training.inputs import Inputs, check_inputs
from lora_rm.training.layout import choose_layout
from lora_rm.training.optim import build_optimizer
from lora_rm.training.outdir import clear_previous_run
from lora_rm.training.outputs import run_config
from lora_rm.training.run import LoopState, Run, trim_metrics
from lora_rm.util.atomic import write_text_atomic
from lora_rm.util.bounds import check_total_steps


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the block, then one full pass and on again (if it was on).

    Set-up imports transformers, PEFT and bitsandbytes and builds the model: a few hundred thousand objects
    that live as long as the run, and next to no cyclic garbage. Left on, the collector walks all of them
    each time the heap grows by a quarter (measured: docs/benchmarks.md, start-up) and frees almost
    nothing. One pass at the end moves them to the oldest generation, where the loop's collections skip them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.collect()
            gc.enable()


def set_up(cfg: TrainConfig, log: Any) -> tuple[Run, Inputs]:
    """Check every input (`check_inputs`), then build the accelerator, model, layout, optimizer and loop
    state (restored from the resume checkpoint), and start the output folder."""
    from accelerate import Accelerator

    inputs = check_inputs(cfg, log)
    cfg, mixed_precision, device_type = inputs.cfg, inputs.mixed_precision, inputs.device_type
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        cpu=device_type == "cpu",
        log_with=inputs.trackers,
        project_dir=cfg.output_dir,
    )
    log = log if accelerator.is_main_process else (lambda *_a, **_k: None)
    world = accelerator.num_processes
    if world > 1:
        log(f"processes: {world} ({accelerator.distributed_type.value})")

    quantized = cfg.quant != "none"
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    model = load_base_model(
        cfg.base,
        inputs.tokenizer.pad_token_id,
        quant=cfg.quant,
        # int8/nf4 bases keep their other weights in the compute dtype; an unquantized base stays fp32 on CPU
        dtype=compute_dtype if quantized or device_type == "cuda" else torch.float32,
        seed=cfg.seed,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        device_map={"": accelerator.local_process_index} if quantized and device_type == "cuda" else None,
    )
    init_head(model)
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

    train_pairs = inputs.train_pairs
    layout = choose_layout(cfg, model, train_pairs, inputs.tokenizer.pad_token_id, inputs.max_length, log)
    k = cfg.gradient_accumulation_steps
    if not cfg.max_steps:  # refuse before planning every epoch: that alone would not finish
        first = math.ceil(len(shard_batches(layout.epoch_batches(0), 0, world)) / k)
        check_total_steps(first * cfg.epochs, cfg.epochs)
    total_steps = cfg.max_steps or sum(
        math.ceil(len(shard_batches(layout.epoch_batches(e), 0, world)) / k) for e in range(cfg.epochs)
    )
    optimizer, scheduler = build_optimizer(model, cfg, total_steps, device_type)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = LoopState()
    if inputs.resume_from:
        saved = load_checkpoint(
            inputs.resume_from, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler
        )
        state = LoopState.from_dict(saved["loop"])
        log(f"resumed from {inputs.resume_from} at step {state.step}")

    out = Path(cfg.output_dir)
    if accelerator.is_main_process:  # --overwrite-output-dir: the old run goes only now, all input checked
        clear_previous_run(out, cfg, log)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(
        cfg, accelerator, model, optimizer, scheduler, layout, state, out, train_pairs, inputs.eval_pairs,
        total_steps, inputs.fingerprints, log,
    )  # fmt: skip
    config = run_config(run, inputs)
    if accelerator.is_main_process:
        write_text_atomic(out / "config.json", json.dumps(config, indent=2))
        trim_metrics(run.metrics_path, state.step)
    accelerator.init_trackers(
        "lora_rm", config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
    )
    log(
        f"train: {len(train_pairs)} pairs, {total_steps} steps of {cfg.batch_size} x "
        f"{cfg.gradient_accumulation_steps} x {world} pairs; writing to {out}"
    )
    return run, inputs
