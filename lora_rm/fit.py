"""The training loop: accumulation windows, optimizer steps, logging, eval, checkpoints, stops."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.batch import PreferenceBatch, pair_weights, shard_batches
from lora_rm.checkpoint import save_checkpoint
from lora_rm.encode import EncodedPair
from lora_rm.errors import UserError
from lora_rm.evaluate import evaluate
from lora_rm.guards import guarded_step
from lora_rm.loss import PairStats, batch_losses
from lora_rm.rewards import pair_rewards


class TrainingStopped(Exception):
    """The run stopped before the end (Ctrl-C, SIGTERM, repeated non-finite steps) after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: Path, exit_code: int):
        super().__init__(message)
        self.checkpoint, self.exit_code = checkpoint, exit_code


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint so a resumed run continues exactly here."""

    step: int = 0
    epoch: int = 0
    window: int = 0  # accumulation windows done in this epoch
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss or gradient
    bad_streak: int = 0
    micro_split: int = 1  # after a CUDA out-of-memory, micro-batches are cut into this many parts
    stats: PairStats = field(default_factory=PairStats)  # training pairs since the last log line

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        return cls(**{**d, "stats": PairStats(**d["stats"])})


def _record(accelerator: Any, path: Path, record: dict[str, Any]) -> None:
    """Append `record` to metrics.jsonl (always) and send it to the --report-to trackers (if any)."""
    if accelerator.is_main_process:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    accelerator.log(numbers, step=record["step"])  # a no-op without trackers; main process only


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
    `loss` names the objective (`lora_rm.loss.batch_losses`). Returns `stats` updated.
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


@contextlib.contextmanager
def _stop_requests():
    """Turn Ctrl-C and SIGTERM into a flag the loop checks at each step boundary (main thread only)."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, _frame: requested.append(signum))
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _split(idx: list[int], parts: int) -> list[list[int]]:
    size = -(-len(idx) // parts)
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def _run_window(model, window, pairs, collator, accelerator, cfg, state: LoopState) -> None:
    """backward_window over one window, halving micro-batches on CUDA out-of-memory (same pairs, same
    effective batch, so the same gradient) until it fits."""
    while True:
        micro = [part for idx in window for part in _split(idx, state.micro_split)]
        try:
            backward_window(
                model,
                (collator([pairs[j] for j in idx]) for idx in micro),
                accelerator,
                cfg.center_rewards_coefficient,
                state.stats,
                cfg.loss,
            )
            return
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if max(map(len, micro)) == 1:
                raise UserError(
                    "out of GPU memory with 1 pair per micro-batch: lower --max-length, "
                    "use --gradient-checkpointing or --quant 4bit"
                ) from None
            state.micro_split *= 2
            print(
                f"CUDA out of memory: micro-batches now {cfg.batch_size // state.micro_split or 1} pairs, "
                f"{state.micro_split}x the accumulation (same effective batch)"
            )


def fit(
    cfg,
    accelerator,
    model,
    optimizer,
    scheduler,
    train_pairs: list[EncodedPair],
    eval_pairs: list[EncodedPair],
    collator: Callable[[list[EncodedPair]], Any],
    plan_epoch: Callable[[int], list[list[int]]],
    state: LoopState,
    total_steps: int,
    out: Path,
    fingerprints: dict[str, str],
    log: Any,
) -> dict[str, Any]:
    """The training loop, from `state` to `total_steps`. Returns the last evaluation."""
    from tqdm.auto import tqdm

    is_main, world, k = (
        accelerator.is_main_process,
        accelerator.num_processes,
        cfg.gradient_accumulation_steps,
    )
    metrics_path = out / "metrics.jsonl"

    def checkpoint() -> Path:
        path = out / f"step-{state.step:06d}"
        if is_main:
            trainer = {"loop": state.to_dict(), "fingerprints": fingerprints}
            save_checkpoint(
                out,
                state.step,
                accelerator.unwrap_model(model),
                optimizer,
                scheduler,
                trainer,
                accelerator.scaler,
                cfg.save_total_limit,
            )
        accelerator.wait_for_everyone()
        return path

    eval_metrics: dict[str, Any] = {}
    bar = tqdm(total=total_steps, initial=state.step, disable=not is_main, desc="train", dynamic_ncols=True)
    model.train()
    with _stop_requests() as stop, contextlib.closing(bar):
        while state.step < total_steps:
            batches = shard_batches(
                plan_epoch(state.epoch),
                accelerator.process_index,
                world,
            )
            windows = [batches[i : i + k] for i in range(0, len(batches), k)]
            for window in windows[state.window :]:
                bad_losses = state.stats.nonfinite
                _run_window(model, window, train_pairs, collator, accelerator, cfg, state)
                # a non-finite loss, gradient or updated weight would poison the weights: the step is dropped, and counted
                finite, grad_norm = guarded_step(
                    accelerator, model, optimizer, cfg.max_grad_norm, state.stats.nonfinite == bad_losses
                )
                state.skipped_steps += not finite
                state.bad_streak = 0 if finite else state.bad_streak + 1
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step, state.window = state.step + 1, state.window + 1
                bar.update(1)
                if state.step % cfg.logging_steps == 0 or state.step == total_steps:
                    summary = state.stats.summary()
                    record = {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": summary["loss"],
                        "accuracy": summary["accuracy"],
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm or 0.0),
                        "skipped_steps": state.skipped_steps,
                    }
                    bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
                    _record(accelerator, metrics_path, record)
                    state.stats = PairStats()
                if eval_pairs and (state.step % cfg.eval_steps == 0 or state.step == total_steps):
                    eval_metrics = evaluate(model, eval_pairs, collator, cfg.batch_size * 2, accelerator)
                    _record(
                        accelerator,
                        metrics_path,
                        {"step": state.step, **{f"eval_{n}": v for n, v in eval_metrics.items()}},
                    )
                    log(
                        f"eval @ step {state.step}: loss {eval_metrics['loss']:.4f}, accuracy {eval_metrics['accuracy']:.3f} "
                        f"({eval_metrics['ties']} ties), mean margin {eval_metrics['mean_margin']:.3f}"
                    )
                if state.bad_streak >= cfg.max_bad_steps:
                    path = checkpoint()
                    raise TrainingStopped(
                        f"stopped: {state.bad_streak} steps in a row had a non-finite loss or gradient "
                        f"(try a lower --learning-rate or --precision fp32); last good weights in {path}",
                        path,
                        3,
                    )
                stop_now = (
                    bool(accelerator.reduce(torch.tensor(len(stop), device=accelerator.device), "max").item())
                    if world > 1
                    else bool(stop)
                )
                if state.step % cfg.save_steps == 0 or stop_now:
                    path = checkpoint()
                if stop_now:
                    raise TrainingStopped(
                        f"interrupted at step {state.step}; checkpoint saved to {path}. Resume with the same "
                        f"command plus --resume",
                        path,
                        130,
                    )
                if state.step >= total_steps:
                    break
            else:
                state.epoch, state.window = state.epoch + 1, 0
    return eval_metrics


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (those a resumed run has not redone); a fresh run starts empty."""
    keep = []
    if step and path.is_file():
        keep = [
            line
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (record := _json_or_none(line)) and record.get("step", step + 1) <= step
        ]  # a torn last line (the run was killed mid-write) is dropped: its step is redone
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
