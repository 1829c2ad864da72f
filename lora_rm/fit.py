"""The training loop: `fit(run)` takes a set-up `Run` from its state to its last step.

Read `fit` top to bottom: each accumulation window is a forward, loss and backward per micro-batch
(`backward_window`), then one optimizer step (clipped, skipped when not finite), then the decisions to log,
evaluate, checkpoint or stop. Everything else in this file is a short helper one of those lines calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.batch import PreferenceBatch, pair_weights, shard_batches
from lora_rm.checkpoint import checkpoint_dir, save_checkpoint
from lora_rm.config import TrainConfig
from lora_rm.encode import EncodedPair
from lora_rm.errors import UserError
from lora_rm.evaluate import evaluate
from lora_rm.layout import Layout
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


@dataclass
class Run:
    """Everything the loop reads and changes, built by `lora_rm.train.set_up`."""

    cfg: TrainConfig
    accelerator: Any
    model: Any  # prepared by accelerate (DDP-wrapped under several processes)
    optimizer: Any
    scheduler: Any
    layout: Layout
    state: LoopState
    output_dir: Path
    train_pairs: list[EncodedPair]
    eval_pairs: list[EncodedPair]
    total_steps: int
    fingerprints: dict[str, str]  # of the data and config, saved in checkpoints to refuse a mismatched resume
    log: Any = print  # a no-op on every process but the main one

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


def fit(run: Run) -> dict[str, Any]:
    """Train from `run.state` to `run.total_steps`; returns the last evaluation ({} without eval pairs).

    Raises TrainingStopped after saving a checkpoint on Ctrl-C / SIGTERM, or after `max_bad_steps`
    non-finite steps in a row.
    """
    cfg, accelerator, model, optimizer, state = run.cfg, run.accelerator, run.model, run.optimizer, run.state
    last_eval: dict[str, Any] = {}
    model.train()
    with _stop_requests() as stop, _progress_bar(run) as bar:
        for window in accumulation_windows(run):
            # forward, loss and backward of each micro-batch: the grads add up to the window's per-pair mean
            while True:
                try:
                    state.stats = merge_stats(state.stats, backward_window(
                        model, micro_batches(run, window), accelerator,
                        cfg.center_rewards_coefficient, loss=cfg.loss,
                    ))  # fmt: skip
                    break
                except torch.cuda.OutOfMemoryError:
                    split_micro_batches(
                        run, window
                    )  # the same pairs in smaller micro-batches: the same gradient

            # one optimizer step; a non-finite loss or gradient would poison the weights: drop it, and count it
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
            if finite or accelerator.scaler is not None:
                optimizer.step()  # with fp16 the grad scaler skips inf steps itself and lowers its scale
            finite = finite and not accelerator.optimizer_step_was_skipped
            state.skipped_steps += not finite
            state.bad_streak = 0 if finite else state.bad_streak + 1
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step, state.window = state.step + 1, state.window + 1
            bar.update(1)

            last = state.step >= run.total_steps
            if state.step % cfg.logging_steps == 0 or last:
                log_training(run, grad_norm, bar)
            if run.eval_pairs and (state.step % cfg.eval_steps == 0 or last):
                last_eval = log_evaluation(run)
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
    return last_eval


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
    is (`state.epoch`, `state.window`) on, epoch after epoch. The loop moves `state.window` on."""
    state, k = run.state, run.cfg.gradient_accumulation_steps
    while True:
        epoch = run.layout.epoch_batches(state.epoch)
        batches = shard_batches(epoch, run.accelerator.process_index, run.accelerator.num_processes)
        windows = [batches[i : i + k] for i in range(0, len(batches), k)]
        yield from windows[state.window :]
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


def log_training(run: Run, grad_norm: Any, bar: Any) -> None:
    """Write the training pairs' loss and accuracy since the last line, and start counting afresh."""
    summary = run.state.stats.summary()
    record = {
        "step": run.state.step,
        "epoch": run.state.epoch,
        "loss": summary["loss"],
        "accuracy": summary["accuracy"],
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm or 0.0),
        "skipped_steps": run.state.skipped_steps,
    }
    bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
    record_metrics(run.accelerator, run.metrics_path, record)
    run.state.stats = PairStats()


def log_evaluation(run: Run) -> dict[str, Any]:
    """Evaluate on the eval pairs (all processes), write the metrics and log one line; returns them."""
    metrics = evaluate(
        run.model, run.eval_pairs, run.layout.collator, run.cfg.batch_size * 2, run.accelerator
    )
    record = {"step": run.state.step, **{f"eval_{n}": v for n, v in metrics.items()}}
    record_metrics(run.accelerator, run.metrics_path, record)
    run.log(
        f"eval @ step {run.state.step}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f} "
        f"({metrics['ties']} ties), mean margin {metrics['mean_margin']:.3f}"
    )
    return metrics


def save(run: Run) -> Path:
    """Write a resumable checkpoint of this step (main process), with every process waiting for it."""
    if run.accelerator.is_main_process:
        save_checkpoint(
            run.output_dir,
            run.state.step,
            run.accelerator.unwrap_model(run.model),
            run.optimizer,
            run.scheduler,
            {"loop": run.state.to_dict(), "fingerprints": run.fingerprints},
            run.accelerator.scaler,
            run.cfg.save_total_limit,
        )
    run.accelerator.wait_for_everyone()
    return checkpoint_dir(run.output_dir, run.state.step)


def record_metrics(accelerator: Any, path: Path, record: dict[str, Any]) -> None:
    """Append `record` to metrics.jsonl (always) and send it to the --report-to trackers (if any)."""
    if accelerator.is_main_process:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    accelerator.log(numbers, step=record["step"])  # a no-op without trackers; main process only


def stop_requested(accelerator: Any, requests: list[int]) -> bool:
    """Whether any process got Ctrl-C or SIGTERM: all stop at the same step."""
    if accelerator.num_processes == 1:
        return bool(requests)
    flag = torch.tensor(len(requests), device=accelerator.device)
    return bool(accelerator.reduce(flag, "max").item())


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


@contextlib.contextmanager
def _progress_bar(run: Run):
    from tqdm.auto import tqdm

    bar = tqdm(
        total=run.total_steps,
        initial=run.state.step,
        disable=not run.accelerator.is_main_process,
        desc="train",
        dynamic_ncols=True,
    )
    with contextlib.closing(bar):
        yield bar


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (those a resumed run has not redone); a fresh run starts empty."""
    keep = []
    if step and path.is_file():
        keep = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line and json.loads(line)["step"] <= step
        ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
