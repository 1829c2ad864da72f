"""One training run: `train(cfg)` sets the run up (`lora_rm.training.setup`), runs the loop `fit(run)` that
takes a set-up `Run` from its state to its last step, and saves the outputs (`lora_rm.training.outputs`).

Read `fit` top to bottom: each accumulation window is a forward, loss and backward per micro-batch
(`backward_window`), then one optimizer step (clipped, skipped when not finite), then the decisions to log,
evaluate, checkpoint or stop. Everything else in this file is a short helper one of those lines calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.data.batches import shard_batches
from lora_rm.errors import UserError
from lora_rm.loss import PairStats, batch_losses
from lora_rm.model.collate import PreferenceBatch, pair_weights
from lora_rm.model.rewards import pair_rewards
from lora_rm.training.outdir import claim_output_dir
from lora_rm.training.outputs import TrainResult, save_outputs
from lora_rm.training.run import (
    Run,
    learning_check_step,
    log_evaluation,
    log_training,
    progress_bar,
    save,
    stop_requested,
    stop_requests,
    warn_if_not_learning,
)
from lora_rm.training.setup import collector_paused, set_up
from lora_rm.util.quiet import quiet_by_default


def train(cfg: TrainConfig, log: Any = print) -> TrainResult:
    """Train a LoRA reward model as `cfg` says and save it under `cfg.output_dir`.

    All input (config, data, tokenizer, model, resume checkpoint) is checked before anything but a lock file
    is written to the output directory; problems raise UserError, as do a second run into the same folder, a
    fresh run over another run's outputs (without --overwrite-output-dir) and failed writes. Raises
    TrainingStopped after saving a checkpoint when stopped by a signal or by `cfg.max_bad_steps` non-finite
    steps in a row, and RunFinished for --resume on a run that already ended. Expected third-party warnings
    are dropped (`lora_rm.util.quiet.quiet_by_default`; LORA_RM_VERBOSE=1 keeps them).
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


class TrainingStopped(Exception):
    """The run stopped before the end (Ctrl-C, SIGTERM, repeated non-finite steps) after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code


def fit(run: Run) -> None:
    """Train from `run.state` to `run.total_steps`, evaluating every `eval_steps` on the way.

    The final evaluation is not here: `train.save_outputs` runs the full one, on every eval pair, once.

    Raises TrainingStopped after saving a checkpoint on Ctrl-C / SIGTERM, or after `max_bad_steps`
    non-finite steps in a row.
    """
    cfg, accelerator, model, optimizer, state = run.cfg, run.accelerator, run.model, run.optimizer, run.state
    check_at, early = learning_check_step(run), PairStats()  # "not learning" is said after a tenth of the run
    model.train()
    with stop_requests() as stop, progress_bar(run) as bar:
        for window in accumulation_windows(run):
            # forward, loss and backward of each micro-batch: the grads add up to the window's per-pair mean
            while True:
                try:
                    window_stats = backward_window(
                        model, micro_batches(run, window), accelerator,
                        cfg.center_rewards_coefficient, loss=cfg.loss,
                    )  # fmt: skip
                    break
                except torch.cuda.OutOfMemoryError:  # the same pairs in smaller micro-batches: same gradient
                    split_micro_batches(run, window)
            state.stats = merge_stats(state.stats, window_stats)
            if check_at is not None and state.step < check_at:
                early = merge_stats(early, window_stats)

            # one optimizer step (clipped); a non-finite loss, gradient or updated weight would poison the
            # weights: the step is dropped (the weights stay as they were), and counted
            finite, grad_norm = guarded_step(
                accelerator, model, optimizer, cfg.max_grad_norm, window_stats.nonfinite == 0
            )
            state.skipped_steps += not finite
            state.bad_streak = 0 if finite else state.bad_streak + 1
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step, state.window = state.step + 1, state.window + 1
            bar.update(1)

            last = state.step >= run.total_steps
            if state.step == check_at:
                warn_if_not_learning(run, early)
            if state.step % cfg.logging_steps == 0 or last:
                log_training(run, grad_norm, bar)
            if run.eval_pairs and state.step % cfg.eval_steps == 0 and not last:  # the last: save_outputs'
                log_evaluation(run)
            if state.bad_streak >= cfg.max_bad_steps:
                path = save(run)
                raise TrainingStopped(
                    f"stopped: {state.bad_streak} steps in a row had a non-finite loss or gradient (try a "
                    f"lower --learning-rate or --precision fp32); last good weights in {path}",
                    path,
                    3,
                )
            stop_now = stop_requested(accelerator, stop)
            if state.step % cfg.save_steps == 0 or stop_now:
                path = save(run)
            if stop_now:
                raise TrainingStopped(
                    f"interrupted at step {state.step}; checkpoint saved to {path}. Resume with the same "
                    "command plus --resume",
                    path,
                    130,
                )
            if last:
                break


def backward_window(
    model: Any,
    batches: Iterable[PreferenceBatch],
    accelerator: Any,
    center_coefficient: float = 0.0,
    stats: PairStats | None = None,
    loss: str = "pairwise",
) -> PairStats:
    """Forward and backward every micro-batch of one accumulation window; grads are left for one step.

    Each .backward() adds to the grads, so every micro-batch's summed loss is divided by the pairs in
    the whole window (over all processes): k micro-batches of b pairs give exactly the gradient of one
    batch of k*b pairs, and a short last window is not under-weighted. Pairs of ranked lists carry
    weights (1/pairs of their list): the sum is then divided by the weights, so each list counts once.
    `loss` names the objective (`lora_rm.loss.batch_losses`). Returns `stats` (or new stats) updated.
    """
    batches = list(batches)
    stats = stats if stats is not None else PairStats()
    local_pairs = torch.tensor(sum(float(pair_weights(b).sum()) for b in batches), device=accelerator.device)
    window_pairs = accelerator.reduce(local_pairs, "sum").item()
    world = accelerator.num_processes
    for i, batch in enumerate(batches):
        batch = batch.to(accelerator.device)
        # Only the last micro-batch syncs grads across processes.
        sync = accelerator.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
        with sync:
            r_c, r_r = pair_rewards(model, batch)
            losses = batch_losses(loss, r_c, r_r, batch.margin, batch.group, center_coefficient)
            # DDP averages grads over processes; scale back so the result is a per-pair mean.
            accelerator.backward((losses * pair_weights(batch)).sum() * world / window_pairs)
        stats.add(r_c.detach(), r_r.detach(), losses.detach())
    return stats


def accumulation_windows(run: Run) -> Iterator[list[list[int]]]:
    """This process's accumulation windows (lists of micro-batches of pair indices), from where the run
    is (`state.epoch`, `state.window`) on, epoch after epoch, until `total_steps`. The loop moves
    `state.step` and `state.window` on; a run resumed at its last step gets no window."""
    state, k = run.state, run.cfg.gradient_accumulation_steps
    while state.step < run.total_steps:
        epoch = run.layout.epoch_batches(state.epoch)
        batches = shard_batches(epoch, run.accelerator.process_index, run.accelerator.num_processes)
        windows = [batches[i : i + k] for i in range(0, len(batches), k)]
        for window in windows[state.window :]:
            if state.step >= run.total_steps:
                return
            yield window
        state.epoch, state.window = state.epoch + 1, 0


def micro_batches(run: Run, window: list[list[int]]) -> Iterator[Any]:
    """The collated micro-batches of `window`, each cut into `state.micro_split` parts (after an OOM)."""
    for idx in window:
        size = -(-len(idx) // run.state.micro_split)
        for start in range(0, len(idx), size):
            yield run.layout.collator([run.train_pairs[j] for j in idx[start : start + size]])


def split_micro_batches(run: Run, window: list[list[int]]) -> None:
    """After a CUDA out-of-memory: drop the window's grads and cut micro-batches in two (one process only).

    Under several processes the others would be waiting in the gradient all-reduce while this one retried,
    and the run would hang; so there it is a UserError that says what to lower instead.
    """
    run.model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    advice = "lower --batch-size or --max-length, or use --gradient-checkpointing or --quant 4bit"
    if run.accelerator.num_processes > 1:
        raise UserError(
            f"out of GPU memory on process {run.accelerator.process_index} of {run.accelerator.num_processes}: "
            f"micro-batches are split automatically on one process only; {advice}"
        )
    if max(map(len, window)) <= run.state.micro_split:  # already one pair per micro-batch
        raise UserError(f"out of GPU memory with 1 pair per micro-batch: {advice}")
    run.state.micro_split *= 2
    run.log(
        f"CUDA out of memory: micro-batches now {run.cfg.batch_size // run.state.micro_split or 1} pairs, "
        f"{run.state.micro_split}x the accumulation (same effective batch)"
    )


def merge_stats(a: PairStats, b: PairStats) -> PairStats:
    """The statistics of the pairs of `a` and of `b`."""
    return PairStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(a)})


def guarded_step(accelerator: Any, model: Any, optimizer: Any, max_grad_norm: float, loss_finite: bool):
    """Clip, then step unless the loss or gradient is non-finite, then undo a step that left a weight non-finite.

    Every process takes the same decision (the gradient norm is synced; loss and weights are reduced).
    Returns (stepped, grad_norm): `stepped` False means the weights are as before the step.
    """
    loss_ok = _all_processes(accelerator, loss_finite)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    grad_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
    params = [p for p in model.parameters() if p.requires_grad]
    if not (loss_ok and grad_ok) and accelerator.scaler is None:
        return False, grad_norm
    if not loss_ok and grad_ok:  # with fp16 the scaler would take this step: its gradient is finite
        return False, grad_norm
    before = [p.detach().clone() for p in params]
    optimizer.step()  # with fp16 the grad scaler skips inf steps itself and lowers its scale
    if accelerator.optimizer_step_was_skipped:
        return False, grad_norm
    weights_ok = _all_processes(accelerator, all(bool(torch.isfinite(p).all()) for p in params))
    if not weights_ok:
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(old)
    return loss_ok and grad_ok and weights_ok, grad_norm


def _all_processes(accelerator: Any, ok: bool) -> bool:
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(0 if ok else 1, device=accelerator.device)
    return accelerator.reduce(flag, "max").item() == 0
