"""TRL `RewardConfig` / transformers `TrainingArguments` / TRL `ModelConfig` names that are not one field under
another name (those are the fields' `aliases`, `args.ALIASES`): each is translated into lora_rm's option, or
refused with the option to use instead named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_rm.errors import UserError

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": "auto"}
OPTIMS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "paged_adamw_8bit": "paged_adamw_8bit"}

# name: (takes no value on the command line, help); the translation is `_translate`'s
TRL_NAMES = {
    "per_device_eval_batch_size": (False, "refused: evaluation uses --batch-size"),
    "eval_strategy": (False, "steps only: evaluate every --eval-steps; no: use --eval-fraction 0"),
    "warmup_steps": (False, "below 1: --warmup-ratio (as transformers reads it); whole steps: refused"),
    "dtype": (False, "bfloat16/float16/float32/auto: --precision bf16/fp16/fp32/auto"),
    "torch_dtype": (False, "same as --dtype (its older name)"),
    "dataset_test_split": (False, "same as --eval-split"),
    "resume_from_checkpoint": (True, "same as --resume (PATH, or alone / true: the latest checkpoint)"),
    "hub_model_id": (False, "the repo a --push_to_hub switch uploads to (default: the output folder's name)"),
    "optim": (False, "adamw_torch(_fused) or paged_adamw_8bit: --optimizer adamw or paged_adamw_8bit"),
    "disable_dropout": (True, "TRL's default, true: --lora-dropout 0 (the base's dropout is always off)"),
    "use_peft": (True, "true only: lora-rm always trains a LoRA adapter"),
}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def as_switch(name: str, value: Any) -> bool:
    """A switch's value: true/false as YAML gives it, or as text from the command line."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None


def _translate(name: str, value: Any) -> dict[str, Any]:
    """lora_rm's options for one TRL name and value; ValueError saying what to use instead when there are none."""
    if name == "per_device_eval_batch_size":
        raise ValueError("lora-rm evaluates in micro-batches of --batch-size pairs; drop this option")
    if name == "eval_strategy":
        strategy = "no" if value is False else str(value).strip().lower()  # YAML reads a bare no as false
        if strategy == "steps":
            return {}
        if strategy == "no":
            raise ValueError(
                "lora-rm evaluates the pairs it holds out; hold none out with --eval-fraction 0 "
                "(a dataset's own test split, or --eval-dataset, is still evaluated)"
            )
        raise ValueError(
            f"{value!r}: lora-rm evaluates every --eval-steps N optimizer steps (and at the end)"
        )
    if name == "warmup_steps":
        steps = _number(value)
        if 0 <= steps < 1:  # transformers reads a warmup_steps below 1 as a fraction of the run
            return {"warmup_ratio": steps}
        raise ValueError(
            f"{value!r}: lora-rm warms up for a fraction of the optimizer steps: --warmup-ratio "
            "(the run's step count is printed as 'train: ... N steps')"
        )
    if name in ("dtype", "torch_dtype"):
        dtype = str(value).strip().lower().removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"{value!r} is not one of {', '.join(DTYPES)} (lora-rm's --precision)")
        return {"precision": DTYPES[dtype]}
    if name == "dataset_test_split":
        return {"eval_split": str(value)}
    if name == "resume_from_checkpoint":
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in TRUE or text in FALSE:
            return {"resume": "latest"} if as_switch(name, value) else {}
        return {"resume": str(value)}
    if name == "optim":
        optim = str(value).strip().lower()
        if optim not in OPTIMS:
            raise ValueError(
                f"{value!r}: lora-rm's --optimizer is adamw (TrainingArguments' adamw_torch) or paged_adamw_8bit"
            )
        return {"optimizer": OPTIMS[optim]}
    if name == "disable_dropout":
        if as_switch(name, value):
            return {"lora_dropout": 0.0}  # TRL sets every dropout, LoRA's too, to 0
        raise ValueError(
            "false: lora-rm always turns the base model's dropout off (it would give chosen and rejected "
            "different noise); LoRA's own dropout is --lora-dropout"
        )
    if name == "use_peft":
        if as_switch(name, value):
            return {}
        raise ValueError(
            "false: lora-rm always trains a LoRA adapter; full fine-tuning is TRL's RewardTrainer"
        )
    return {name: value}  # hub_model_id: paired with push_to_hub in `resolve_push`


def translate_trl_names(options: dict[str, Any], where: str) -> dict[str, Any]:
    """`options` with each name of `TRL_NAMES` replaced by lora_rm's options. A dtype gives way to a bf16 or
    fp16 switch (TRL's mixed precision; lora-rm loads the base in it). UserError naming `where`, the name and
    the option to use instead, for a value lora-rm has no equivalent of."""
    out = {k: v for k, v in options.items() if k not in TRL_NAMES}
    dtype: dict[str, Any] = {}
    for key, value in options.items():
        if key not in TRL_NAMES:
            continue
        try:
            translated = _translate(key, value)
        except ValueError as e:
            raise UserError(f"{where}: {key}: {e}") from None
        for field, new in translated.items():
            if field in out and out[field] != new:
                raise UserError(
                    f"{where}: {key} sets {field} to {new!r}, but it is also given as {out[field]!r}"
                )
        (dtype if key in ("dtype", "torch_dtype") else out).update(translated)
    if dtype and not any(options.get(s) not in (None, False, "false") for s in ("bf16", "fp16", "precision")):
        out.update(dtype)
    return out


def resolve_push(options: dict[str, Any], default_output_dir: str) -> dict[str, Any]:
    """TrainingArguments' `push_to_hub` switch with its `hub_model_id` as lora-rm's `push_to_hub: REPO_ID`.

    As in transformers, the repo defaults to the output folder's name, and `hub_model_id` without the switch
    uploads nothing. A `push_to_hub` that is a repo id is kept (and `hub_model_id` must agree or be absent).
    """
    options = dict(options)
    repo = options.pop("hub_model_id", None)
    push = options.get("push_to_hub")
    if push is None:
        return options
    text = str(push).strip().lower()
    if not isinstance(push, bool) and text not in TRUE and text not in FALSE:
        if repo is not None and repo != push:
            raise UserError(f"push_to_hub {push!r} and hub_model_id {repo!r} name two repos; give one")
        return options
    if not as_switch("push_to_hub", push):
        options.pop("push_to_hub")
        return options
    output_dir = options.get("output_dir") or default_output_dir
    options["push_to_hub"] = repo if repo is not None else Path(output_dir).absolute().name
    return options
