"""One training run: check data and model, then a plain PyTorch loop on `accelerate`, then save."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.atomic import write_text_atomic
from lora_rm.batch import shard_batches
from lora_rm.bounds import check_total_steps
from lora_rm.checkpoint import load_checkpoint
from lora_rm.config import TrainConfig
from lora_rm.encode import LengthReport
from lora_rm.evaluate import summary, write_full_eval, write_reward_stats
from lora_rm.export import merge_adapter, save_adapter
from lora_rm.fit import fit
from lora_rm.inputs import Inputs, check_inputs
from lora_rm.layout import choose_layout
from lora_rm.model import add_lora, init_head, load_base_model
from lora_rm.optim import build_optimizer
from lora_rm.outdir import claim_output_dir, clear_previous_run
from lora_rm.quiet import quiet_by_default
from lora_rm.run import LoopState, Run, record_metrics, trim_metrics
from lora_rm.saved import CONFIG_FILE, SEQUENCE_FORMAT


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


def train(cfg: TrainConfig, log: Any = print) -> TrainResult:
    """Train a LoRA reward model as `cfg` says and save it under `cfg.output_dir`.

    All input (config, data, tokenizer, model, resume checkpoint) is checked before anything but a lock file
    is written to the output directory; problems raise UserError, as do a second run into the same folder, a
    fresh run over another run's outputs (without --overwrite-output-dir) and failed writes. Raises
    TrainingStopped after saving a checkpoint when stopped by a signal or by `cfg.max_bad_steps` non-finite
    steps in a row, and RunFinished for --resume on a run that already ended. Expected third-party warnings
    are dropped (`lora_rm.quiet.quiet_by_default`; LORA_RM_VERBOSE=1 keeps them).
    """
    from accelerate.state import AcceleratorState

    quiet_by_default()
    started = time.perf_counter()
    try:
        with claim_output_dir(cfg, main_process=os.environ.get("RANK", "0") == "0"):
            with collector_paused():
                run, inputs = set_up(cfg, log)
            fit(run)
            return save_outputs(run, inputs, started)
    finally:
        # accelerate keeps the mixed precision process-wide: without this a second train() in the same
        # process with another --precision would raise
        AcceleratorState._reset_state()


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


def final_evaluation(run: Run, inputs: Inputs, trained: Any, adapter_dir: Path) -> tuple[dict[str, Any], str]:
    """The run's one final evaluation (every eval pair, plain rows) into OUTPUT_DIR/eval, logged and appended
    to metrics.jsonl as the last step's eval record. It reads the saved adapter as its users load it
    (`RewardModel.from_pretrained`: bf16 or fp16 on a GPU, fp32 on the CPU; not the int8 or NF4 training
    model), so that the card and lora_rm_config.json publish what `lora-rm eval` gives them; when that copy
    does not fit in memory beside the training model, the training model, said so. Returns the report ({}
    without eval pairs) and which model it read."""
    from lora_rm.score import RewardModel

    cfg, accelerator = run.cfg, run.accelerator

    def evaluate(model: Any) -> dict[str, Any]:
        return write_full_eval(
            model, inputs.tokenizer, run.eval_pairs, run.output_dir / "eval", [], run.metrics_path, cfg.batch_size * 2,
            max_tokens=cfg.max_tokens_per_batch,
            source=cfg.eval_dataset or cfg.dataset, log=run.log,
            record_eval=lambda record: record_metrics(accelerator, run.metrics_path, {"step": run.state.step, **record}),
        )  # fmt: skip

    try:
        loaded = RewardModel.from_pretrained(adapter_dir, device=accelerator.device).model
        dtype = str(next(loaded.parameters()).dtype).removeprefix("torch.")
        return evaluate(loaded), f"the saved adapter as RewardModel.from_pretrained loads it ({dtype})"
    except torch.cuda.OutOfMemoryError:
        pass  # out of the except block first: its traceback holds the copy's memory
    finally:
        loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the copy's memory, before the merge loads another
    run.log(
        "warning: the saved model does not fit in memory beside the training model; the final evaluation "
        "reads the training model, and `lora-rm eval` on the saved model may give slightly other figures"
    )
    return evaluate(trained), "the training model (the saved model did not fit beside it)"


def run_config(run: Run, inputs: Inputs) -> dict[str, Any]:
    """The resolved config saved beside the outputs (config.json, the adapter's lora_rm_config.json)."""
    return {
        **run.cfg.to_dict(),
        "max_length": inputs.max_length,
        "data_format": inputs.reports["format"],
        "sequence_format": SEQUENCE_FORMAT,  # tokenizer(text), read at its last non-pad token
        "mixed_precision": inputs.mixed_precision,
        "total_steps": run.total_steps,
    }


def save_outputs(run: Run, inputs: Inputs, started: float) -> TrainResult:
    """Save the adapter (and with --merge the merged model), the full evaluation and the model card."""
    cfg, accelerator, log, out = run.cfg, run.accelerator, run.log, run.output_dir
    config = run_config(run, inputs)
    accelerator.wait_for_everyone()
    adapter_dir, merged_dir = out / "adapter", None
    unwrapped = accelerator.unwrap_model(run.model)
    eval_metrics: dict[str, Any] = {}  # the main process's; the others return none
    if accelerator.is_main_process:
        save_adapter(unwrapped, inputs.tokenizer, config, adapter_dir)
        log(f"saved adapter (LoRA + reward head) to {adapter_dir}")
        report, config["eval_model"] = final_evaluation(run, inputs, unwrapped, adapter_dir)
        if report:
            eval_metrics = summary(report)
        config["eval"] = eval_metrics
        write_text_atomic(adapter_dir / CONFIG_FILE, json.dumps(config, indent=2, default=str))
        if not cfg.merge and (out / "merged").exists():  # an earlier leg's, merged from another adapter
            shutil.rmtree(out / "merged")
            log(f"deleted {out / 'merged'}: it was merged from an earlier adapter and --merge is off")
        if cfg.merge:
            merged_dir = out / "merged"
            started_merge = time.perf_counter()
            some_pairs = (run.eval_pairs or run.train_pairs)[:8]
            check = merge_adapter(adapter_dir, merged_dir, some_pairs, base=cfg.base)
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

        publish(out, config, eval_metrics, log)  # a failed upload: UserError, local output kept
    accelerator.end_training()  # after the last barrier: it also ends the process group
    return TrainResult(
        out,
        adapter_dir,
        merged_dir,
        eval_metrics,
        run.state.step,
        time.perf_counter() - started,
        inputs.reports,
        unwrapped.eval(),
        inputs.tokenizer,
    )
