"""What a finished run writes: the adapter, the merged model, the final evaluation, the run's
config and the card."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_rm.data.encode import LengthReport
from lora_rm.evaluation.evaluate import summary, write_full_eval, write_reward_stats
from lora_rm.model.saved import CONFIG_FILE, SEQUENCE_FORMAT, merge_adapter, save_adapter
from lora_rm.training.inputs import Inputs
from lora_rm.training.run import Run, record_metrics
from lora_rm.util.atomic import write_text_atomic


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


def final_evaluation(run: Run, inputs: Inputs, trained: Any, adapter_dir: Path) -> tuple[dict[str, Any], str]:
    """The run's one final evaluation (every eval pair, plain rows) into OUTPUT_DIR/eval, logged and appended
    to metrics.jsonl as the last step's eval record. It reads the saved adapter as its users load it
    (`RewardModel.from_pretrained`: bf16 or fp16 on a GPU, fp32 on the CPU; not the int8 or NF4 training
    model), so that the card and lora_rm_config.json publish what `lora-rm eval` gives them; when that copy
    does not fit in memory beside the training model, the training model, said so. Returns the report ({}
    without eval pairs) and which model it read."""
    from lora_rm.evaluation.reward_model import RewardModel

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
        from lora_rm.training.hub import publish

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
