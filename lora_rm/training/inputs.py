"""What a run reads, checked before anything is written: config, data, tokenizer, model config, trackers,
the accelerate back-end and the resume checkpoint."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_rm.config import TrainConfig
from lora_rm.data.encode import EncodedPair, default_max_length, prepare_pairs
from lora_rm.errors import UserError, problems_message
from lora_rm.model.load import check_quantization, load_tokenizer, resolve_base
from lora_rm.model.precision import choose_precision
from lora_rm.model.saved import CONFIG_FILE
from lora_rm.training.checkpoint import complete_checkpoints, fingerprint, resume_checkpoint
from lora_rm.training.optim import auto_learning_rate

# Options a resume may change freely: they do not change what is trained, or (data paths, split) what
# they change is caught by the fingerprint of the tokenized training pairs itself.
RESUME_FREE = {
    "dataset",
    "split",
    "output_dir",
    "resume",
    "force_resume",
    "eval_steps",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "merge",
    "max_bad_steps",
    "skip_invalid",
    "eval_dataset",
    "eval_split",
    "eval_fraction",
    "vram",  # what it changes (batch size, accumulation, checkpointing) is in the fingerprint itself
    "push_to_hub",
    "private",
    "overwrite_output_dir",
}


class RunFinished(Exception):
    """--resume on a run that already ended and saved its model: nothing to do (the CLI exits 0)."""

    exit_code = 0


def resume_point(cfg: TrainConfig, fingerprints: dict[str, str], log: Any = print) -> Path | None:
    """The checkpoint to resume from, or None without --resume. Raises UserError when the data or config
    differ from the checkpoint's (unless --force-resume), and RunFinished when the same run already ended and
    resuming would start from its newest checkpoint: that may lie before the end, and resuming would redo the
    steps after it. A resume from an older checkpoint (the newest damaged, or one named) trains on."""
    if not cfg.resume:
        return None
    adapter = Path(cfg.output_dir) / "adapter"
    done = finished(adapter / CONFIG_FILE)
    if done and cfg.resume == "latest" and not complete_checkpoints(cfg.output_dir):
        # a run shorter than --save-steps ends with no checkpoint to compare with
        raise RunFinished(finished_message(cfg.output_dir, adapter))
    path = resume_checkpoint(cfg.output_dir, cfg.resume, log)  # the newest intact one; damaged ones reported
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))["trainer"]["fingerprints"]
    changed = [k for k in fingerprints if saved.get(k) != fingerprints[k]]
    if changed and not cfg.force_resume:
        raise UserError(
            f"{path}: the {' and '.join(changed)} differ from the checkpoint's; "
            "resuming would not continue the same run (--force-resume to do it anyway)"
        )
    newest = [p.resolve() for p in complete_checkpoints(cfg.output_dir)[-1:]]
    if (
        done and not changed and [path.resolve()] == newest
    ):  # from an older one (the newest damaged, or asked): train on
        raise RunFinished(finished_message(cfg.output_dir, adapter))
    return path


def finished_message(output_dir: str, adapter: Path) -> str:
    return (
        f"{output_dir}: this run already finished (model in {adapter}); nothing to resume. "
        "To train again, use another --output-dir or --overwrite-output-dir"
    )


def finished(config_file: Path) -> bool:
    """Whether the adapter's config holds the final evaluation (empty without eval data): written last."""
    try:
        return "eval" in json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


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


# Models whose learned position table starts after the pad index (RoBERTa's padding_idx + 1 offset).
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "ernie_m")
CPU_4BIT_BLOCK = 64  # bitsandbytes packs NF4 weights for its CPU kernel in blocks of 64 inputs


def model_positions(model_config: Any) -> int | None:
    """How many positions the model's position table holds, or None if it does not say."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            if getattr(model_config, "model_type", "") in _OFFSET_POSITIONS:
                value -= (getattr(model_config, "pad_token_id", None) or 0) + 1
            return value
    return None


def check_against_model(cfg: TrainConfig, model_config: Any, device_type: str) -> None:
    """Raise a UserError for options this model or device cannot run: checked before anything is written,
    where they would otherwise fail mid-run (an IndexError on the first long pair, a RuntimeError at eval)."""
    problems = []
    positions = model_positions(model_config)
    if cfg.max_length is not None and positions is not None and cfg.max_length > positions:
        problems.append(
            f"max_length: must be in [4, {positions}] for {cfg.base} (its position table), got {cfg.max_length}"
        )
    hidden = next(
        (getattr(model_config, n) for n in ("hidden_size", "n_embd", "d_model") if hasattr(model_config, n)),
        None,
    )
    if cfg.quant == "4bit" and device_type == "cpu" and isinstance(hidden, int) and hidden % CPU_4BIT_BLOCK:
        problems.append(
            f"quant: 4bit on CPU needs a hidden size that is a multiple of {CPU_4BIT_BLOCK} (bitsandbytes packs "
            f"NF4 weights for CPU in blocks of {CPU_4BIT_BLOCK}); {cfg.base} has {hidden}. Use --quant none or 8bit"
        )
    if problems:
        raise UserError(problems_message("Invalid configuration:", problems))


@dataclass
class Inputs:
    """What `check_inputs` read and checked: everything a run needs before anything is written."""

    cfg: TrainConfig  # with --vram applied
    tokenizer: Any
    max_length: int
    train_pairs: list[EncodedPair]
    eval_pairs: list[EncodedPair]
    reports: dict[str, Any]
    fingerprints: dict[str, str]
    resume_from: Path | None
    device_type: str
    mixed_precision: str
    trackers: Any


def check_inputs(cfg: TrainConfig, log: Any) -> Inputs:
    """Read and check the config, tokenizer, model config, data and resume checkpoint; raise UserError on
    any problem. Builds no Accelerator (its precision is process-wide) and writes nothing."""
    from accelerate.state import PartialState
    from accelerate.utils import set_seed
    from transformers import AutoConfig

    cfg = dataclasses.replace(cfg, base=resolve_base(cfg.base))  # recorded so it loads from anywhere
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mixed_precision, why = choose_precision(cfg.precision, device_type, cfg.quant)
    check_quantization(cfg.quant, device_type)
    trackers = None if cfg.report_to == "none" else tracker(cfg.report_to)
    processes = PartialState(cpu=device_type == "cpu")  # rank and world only; no precision yet
    check_distributed(processes.distributed_type)
    log = log if processes.is_main_process else (lambda *_a, **_k: None)
    if cfg.precision == "auto":
        log(f"precision: {'fp32' if mixed_precision == 'no' else mixed_precision} ({why})")
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.base, cfg.revision, cfg.trust_remote_code)
    try:
        model_config = AutoConfig.from_pretrained(
            cfg.base, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.base}: cannot read the model config ({type(e).__name__})") from None
    check_against_model(cfg, model_config, device_type)
    if cfg.learning_rate is None:
        lr, why = auto_learning_rate(model_config)
        cfg = dataclasses.replace(cfg, learning_rate=lr)
        log(f"learning rate: {lr:g} ({why})")
    max_length = cfg.max_length or default_max_length(model_config, tokenizer)
    if cfg.vram:  # micro-batch, accumulation and checkpointing that fit the card; the effective batch is kept
        from lora_rm.training.plan import fit_to_vram

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
    resume_from = resume_point(cfg, fingerprints, log)
    return Inputs(
        cfg, tokenizer, max_length, train_pairs, eval_pairs, reports, fingerprints, resume_from,
        device_type, mixed_precision, trackers,
    )  # fmt: skip
