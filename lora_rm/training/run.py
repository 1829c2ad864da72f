"""A run's state and what it writes: the `Run` the loop works on, the `LoopState` a checkpoint saves, and the
loop's side effects (metrics lines, evaluations, checkpoints, stop requests, the progress bar)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.data.encode import EncodedPair
from lora_rm.evaluation.evaluate import evaluate
from lora_rm.loss import PairStats, loss_near_chance
from lora_rm.model.load import unwrap_model
from lora_rm.training.checkpoint import checkpoint_dir, save_checkpoint
from lora_rm.training.layout import Layout
from lora_rm.training.optim import auto_learning_rate
from lora_rm.util.atomic import write_text_atomic


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
    """Everything the loop reads and changes, built by `lora_rm.training.setup.set_up`."""

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


def log_training(run: Run, grad_norm: Any, bar: Any) -> None:
    """Write the training pairs' loss and accuracy since the last line, and start counting afresh."""
    summary = run.state.stats.summary()
    record = {
        "step": run.state.step,
        "epoch": run.state.epoch,
        "loss": summary["loss"],
        "accuracy": summary["accuracy"],
        "mean_margin": summary["mean_margin"],
        "mean_abs_margin": summary["mean_abs_margin"],
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm or 0.0),
        "skipped_steps": run.state.skipped_steps,
    }
    bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
    if bar.disable:  # no bar (a log file, not a terminal): one plain line per --logging-steps instead
        run.log(
            f"step {run.state.step}/{run.total_steps}: loss {summary['loss']:.4f}, "
            f"accuracy {summary['accuracy']:.3f}, lr {record['lr']:.3g}"
        )
    record_metrics(run.accelerator, run.metrics_path, record)
    run.state.stats = PairStats()


def learning_check_step(run: Run, min_steps: int = 3) -> int | None:
    """The step after which `warn_if_not_learning` looks: a tenth of the run, at least `min_steps`; None
    when that is the run's end (the final evaluation says it then) or the run was resumed."""
    step = max(min_steps, math.ceil(run.total_steps / 10))
    return step if step < run.total_steps and run.state.step == 0 else None


def warn_if_not_learning(run: Run, stats: PairStats) -> None:
    """Log one warning, with the change to make, when the training pairs so far (`stats`) have a loss
    within a hair of ln 2 and margins near 0 (their mean size: wide margins of both signs average to 0) *and*
    the learning rate is below `--learning-rate auto`'s: the model gives chosen and rejected the same reward,
    and at that rate the rest of the run would most likely end the same way (the most reported reward-model
    failure). At auto's rate or above nothing is said yet: on hard data a run that ends well looks exactly
    like this for its first steps, at 1e-4 and at 1e-3 alike (docs/benchmarks.md); the final evaluation says
    it then."""
    summary = stats.summary()
    if not (loss_near_chance(summary["loss"], 0.005) and summary["mean_abs_margin"] < 0.05):
        return
    lr = run.cfg.learning_rate
    auto_lr, _ = auto_learning_rate(getattr(unwrap_model(run.model), "config", None))
    if lr >= auto_lr:
        return
    run.log(
        f"warning: after {run.state.step} of {run.total_steps} steps the training loss is {summary['loss']:.4f} "
        f"(ln 2 = 0.6931) and the mean |margin| {summary['mean_abs_margin']:.4f}: the model is not learning. "
        f"Stop and rerun with a higher learning rate: --learning-rate auto ({auto_lr:g} for this base; "
        f"now {lr:g})"
    )


def log_evaluation(run: Run) -> dict[str, Any]:
    """Evaluate on the eval pairs (all processes), write the metrics and log one line; returns them."""
    metrics = evaluate(
        run.model, run.eval_pairs, run.layout.collator, run.cfg.batch_size * 2, run.accelerator
    )
    record = {"step": run.state.step, **{f"eval_{n}": v for n, v in metrics.items()}}
    record_metrics(run.accelerator, run.metrics_path, record)
    log_line(
        run,
        f"eval @ step {run.state.step}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f} "
        f"({metrics['ties']} ties), mean margin {metrics['mean_margin']:.3f}",
    )
    return metrics


def log_line(run: Run, line: str) -> None:
    """`run.log(line)` with the training bar cleared first and drawn again after: the eval bar that just
    closed leaves the cursor at the end of the bar's line, where the line's first character would go."""
    from tqdm import tqdm

    with tqdm.external_write_mode():
        run.log(line)


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
def stop_requests():
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
def progress_bar(run: Run):
    from tqdm.auto import tqdm

    # a bar redraws itself with carriage returns: in a terminal only; a log file gets plain lines
    bar = tqdm(
        total=run.total_steps,
        initial=run.state.step,
        disable=not (run.accelerator.is_main_process and sys.stderr.isatty()),
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
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (record := _json_or_none(line)) and record.get("step", step + 1) <= step
        ]  # a torn last line (the run was killed mid-write) is dropped: its step is redone
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
