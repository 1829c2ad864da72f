"""Training configuration: one dataclass and its checks (flags, config files and the TRL names: `lora_rm.args`)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from lora_rm.errors import UserError, problems_message

QUANT_CHOICES = ("8bit", "4bit", "none")
PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32")
SCHEDULER_CHOICES = ("cosine", "linear", "constant")
OPTIMIZER_CHOICES = ("adamw", "paged_adamw_8bit")
LOSS_CHOICES = ("auto", "pairwise", "all_pairs", "plackett_luce")
# Runs that cannot finish. A million optimizer steps is days of the smallest model at ~10 steps/s on one GPU and
# months of a 7B one (reward models train for thousands); every epoch plans its batch order up front.
MAX_STEPS, MAX_EPOCHS = 10**6, 10**4


# Fields whose value may be `auto` (any case): None, chosen once the model is known.
AUTO_FIELDS = ("learning_rate",)


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A field whose metadata is what transformers' HfArgumentParser passes to argparse: the help, and any of
    choices, nargs, const, metavar and aliases (other spellings of the flag)."""
    return field(default=default, metadata={"help": help, **kw})


def _also(name: str) -> list[str]:
    """The flags of a TRL / TrainingArguments / PEFT name for a field, in both spellings (`lora_rm.args`)."""
    return ["--" + name, "--" + name.replace("_", "-")]


@dataclass
class TrainConfig:
    """Everything that decides a training run. Defaults suit a 6-8 GB GPU and GPT-2-to-1B bases.

    Every field is also a CLI flag (`lora_rm` -> `--lora-r`), and can come from a YAML/JSON file.
    """

    base: str = _opt(
        None,
        "base model: hub id or local path (any AutoModelForSequenceClassification arch)",
        aliases=_also("model_name_or_path"),
    )
    dataset: str = _opt(
        None,
        "preference data: hub id or local .jsonl/.json/.csv/.parquet file",
        aliases=_also("dataset_name"),
    )
    output_dir: str = _opt("runs/rm", "where adapter/, merged/, metrics.jsonl and the config go")
    eval_dataset: str | None = _opt(
        None, "separate eval data (same formats); else the dataset's own test split"
    )
    eval_fraction: float = _opt(
        0.05, "fraction held out for eval when there is no eval split (0 disables eval)"
    )
    split: str = _opt("train", "dataset split to train on", aliases=_also("dataset_train_split"))
    eval_split: str | None = _opt(
        None, "the dataset's split to evaluate on (default: its test, validation or eval split, if any)"
    )
    max_length: int | None = _opt(None, "tokens per sequence; default the model's limit, at most 1024")
    quant: str = _opt("8bit", "base weights: 8bit (LLM.int8), 4bit (NF4) or none", choices=QUANT_CHOICES)
    lora_r: int = _opt(16, "LoRA rank: higher is more capacity and memory")
    lora_alpha: int = _opt(32, "LoRA scaling numerator (update is scaled by alpha/r)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    target_modules: list[str] | None = _opt(
        None,
        "modules to adapt; default PEFT's choice for the architecture",
        metavar="NAME",
        aliases=_also("lora_target_modules"),
    )
    batch_size: int = _opt(
        4, "pairs per micro-batch (each pair is two sequences)", aliases=_also("per_device_train_batch_size")
    )
    max_tokens_per_batch: int | None = _opt(
        None, "cut micro-batches by a token budget instead of --batch-size"
    )
    group_by_length: bool = _opt(
        True, "batch pairs of similar length together (random order kept): less padding"
    )
    share_prefix: str = _opt(
        "auto",
        "one row per pair, [prompt | chosen | rejected], on causal decoders",
        choices=("auto", "on", "off"),
    )
    packing: str = _opt(
        "auto",
        "several pairs per row, no padding between them (causal decoders; auto: on with prefix sharing)",
        choices=("auto", "on", "off"),
    )
    gradient_accumulation_steps: int = _opt(4, "micro-batches per optimizer step")
    learning_rate: float | None = _opt(
        None,
        "peak learning rate; auto (the default): 2e-3 for causal decoders and 1e-3 for encoders up to 576 wide, "
        "scaled down by the width above that (a 7B decoder, 4096 wide: 2.8e-4); logged and saved with the model",
    )
    head_learning_rate: float | None = _opt(
        None, "peak learning rate of the reward head (default: --learning-rate)"
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    lr_scheduler: str = _opt(
        "cosine", "decay after warmup", choices=SCHEDULER_CHOICES, aliases=_also("lr_scheduler_type")
    )
    warmup_ratio: float = _opt(0.05, "fraction of optimizer steps spent warming up")
    epochs: int = _opt(
        1,
        "passes over the training pairs (ignored when --max-steps is set)",
        aliases=_also("num_train_epochs"),
    )
    max_steps: int | None = _opt(None, "optimizer steps to run; overrides --epochs")
    eval_steps: int = _opt(100, "evaluate every N optimizer steps (and at the end)")
    logging_steps: int = _opt(10, "append training metrics every N optimizer steps")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    center_rewards_coefficient: float = _opt(
        0.0, "weight of the (r_c + r_r)^2 penalty keeping rewards centred"
    )
    loss: str = _opt(
        "auto",
        "objective: pairwise; all_pairs (each ranked list counts once); plackett_luce (listwise); "
        "auto: pairwise for pairs, all_pairs for ranked lists",
        choices=LOSS_CHOICES,
    )
    optimizer: str = _opt(
        "adamw", "adamw, or paged_adamw_8bit (bitsandbytes, CUDA only)", choices=OPTIMIZER_CHOICES
    )
    precision: str = _opt(
        "auto",
        "auto: bf16 where the device runs it fast, else fp16 on GPU, else fp32",
        choices=PRECISION_CHOICES,
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward: less memory, ~30% slower")
    report_to: str = _opt(
        "none",
        "also log metrics to tensorboard or wandb (metrics.jsonl is always written)",
        choices=("none", "tensorboard", "wandb"),
    )
    seed: int = _opt(42, "seed for the score head init, data split, batch order and dropout")
    merge: bool = _opt(False, "also write merged/: a standalone model with the adapter folded in")
    save_steps: int = _opt(100, "write a resumable checkpoint (step-000100/) every N optimizer steps")
    save_total_limit: int | None = _opt(2, "keep only the newest N checkpoints")
    resume: str | None = _opt(
        None,
        "resume from the latest complete checkpoint in --output-dir, or from PATH",
        nargs="?",
        const="latest",
    )
    force_resume: bool = _opt(False, "resume even if the data or config differ from the checkpoint's")
    overwrite_output_dir: bool = _opt(
        False, "start a fresh run in an --output-dir that holds another run, deleting that run's outputs"
    )
    max_bad_steps: int = _opt(5, "stop (with a checkpoint) after this many non-finite steps in a row")
    skip_invalid: bool = _opt(False, "skip bad rows (counted) instead of stopping with the list of problems")
    length_policy: str = _opt(
        "truncate", "over-long pairs: truncate (prompt from the left) or error", choices=("truncate", "error")
    )
    trust_remote_code: bool = _opt(
        False, "allow model code from the hub (off: only transformers' own code runs)"
    )
    revision: str | None = _opt(None, "hub revision (branch, tag or commit) of the base model")
    vram: str | None = _opt(
        None,
        "GPU memory to fit (8GB, 7.5GiB): sets batch size, accumulation and checkpointing (lora-rm plan)",
    )
    push_to_hub: str | None = _opt(
        None,
        "after saving, upload adapter/ (and merged/) to this hub repo id; alone, to --hub-model-id or the "
        "output folder's name (TrainingArguments' switch)",
        nargs="?",
        const=True,
        metavar="REPO",
    )
    private: bool = _opt(False, "create the --push-to-hub repo as private")

    def __post_init__(self) -> None:
        problems = self._coerce_types()
        if problems:  # range checks on values of the wrong type would only add noise
            raise UserError(problems_message("Invalid configuration:", problems))
        if not self.base:
            problems.append("base: required (a hub id like gpt2 or a local model folder)")
        if not self.dataset:
            problems.append("dataset: required (a hub id or a local .jsonl/.json/.csv/.parquet file)")
        for name in dataclasses.fields(self):
            choices = name.metadata.get("choices")
            if choices and getattr(self, name.name) not in choices:
                problems.append(
                    f"{name.name}: {getattr(self, name.name)!r} is not one of {', '.join(choices)}"
                )
        positive = [
            "lora_r",
            "lora_alpha",
            "batch_size",
            "gradient_accumulation_steps",
            "epochs",
            "eval_steps",
            "logging_steps",
            "save_steps",
            "max_bad_steps",
        ]
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch <= 0:
            problems.append(f"max_tokens_per_batch: must be > 0, got {self.max_tokens_per_batch}")
        problems += [f"{n}: must be > 0, got {getattr(self, n)}" for n in positive if getattr(self, n) <= 0]
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            problems.append(f"save_total_limit: must be > 0, got {self.save_total_limit}")
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"max_steps: must be > 0, got {self.max_steps}")
        if self.max_length is not None and self.max_length < 4:
            problems.append(f"max_length: must be at least 4, got {self.max_length}")
        if self.eval_dataset and self.eval_split:
            problems.append(
                "eval_split: names a split of --dataset; with --eval-dataset give one or the other"
            )
        if self.epochs > MAX_EPOCHS:
            problems.append(
                f"epochs: {self.epochs} is more than {MAX_EPOCHS:,} passes over the data; use --max-steps"
            )
        if (self.max_steps or 0) > MAX_STEPS:
            problems.append(
                f"max_steps: {self.max_steps} is more than {MAX_STEPS:,} optimizer steps, past any run"
            )
        problems += self._number_problems()
        problems += size_problems("vram", self.vram) + repo_id_problems(self.push_to_hub)
        if problems:
            raise UserError(problems_message("Invalid configuration:", problems))

    def _number_problems(self) -> list[str]:
        """Finiteness and range of the float options, and the seed's range (numpy and torch take 32 bits)."""
        nonfinite = [
            n for n in _FLOAT_FIELDS if getattr(self, n) is not None and not math.isfinite(getattr(self, n))
        ]
        # an Adam step moves each weight by about the learning rate: above 1 no run learns anything
        checks = {
            n: (getattr(self, n) is None or 0 < getattr(self, n) <= 1, "must be in (0, 1]") for n in _RATES
        }
        checks |= {
            "weight_decay": (self.weight_decay >= 0, "must be >= 0"),
            "max_grad_norm": (self.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
            "center_rewards_coefficient": (self.center_rewards_coefficient >= 0, "must be >= 0"),
            "seed": (0 <= self.seed < 2**32, "must be in [0, 2**32)"),
        }
        checks |= {n: (0.0 <= getattr(self, n) < 1.0, "must be in [0, 1)") for n in _FRACTIONS}
        problems = [f"{n}: must be a finite number, got {getattr(self, n)}" for n in nonfinite]
        return problems + [
            f"{n}: {rule}, got {getattr(self, n)}"
            for n, (ok, rule) in checks.items()
            if not ok and n not in nonfinite
        ]

    def _coerce_types(self) -> list[str]:
        """Convert numbers given as text (YAML reads `1e-4` as a string) and list every value of the wrong type."""
        problems = []
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if isinstance(value, str) and value.strip().lower() == "auto" and f.name in AUTO_FIELDS:
                value = None  # chosen later, when the model is known
                setattr(self, f.name, value)
            if value is None:
                continue
            kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            try:
                setattr(self, f.name, _coerce(value, kind))
            except (TypeError, ValueError, OverflowError):
                problems.append(
                    f"{f.name}: expected {_KIND_NAMES.get(kind, 'a list of names')}, got {value!r}"
                )
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FRACTIONS = ("eval_fraction", "warmup_ratio", "lora_dropout")
_RATES = ("learning_rate", "head_learning_rate")  # None: auto, or the same as learning_rate
_FLOAT_FIELDS = (*_RATES, "weight_decay", "max_grad_norm", "center_rewards_coefficient", *_FRACTIONS)

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _coerce(value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, bool):  # True is an int to Python, never a number to a user
        raise TypeError
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return int(value) if isinstance(value, (int, str)) else _fail()
    if kind is float:
        return float(value) if isinstance(value, (int, float, str)) else _fail()
    if kind is str:
        return value if isinstance(value, str) else _fail()
    if isinstance(value, str):  # list[str] given as one name
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return _fail()


def _fail() -> Any:
    raise TypeError


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


# Checks of single option values, here so that config imports nothing else of the package.

MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
MEMORY_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, what: str = "vram") -> int:
    """Bytes in "8GB" (10^9), "7.5GiB" (2^30), "8000MB", "512MiB"... Raises UserError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)\s*", str(text), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise UserError(
            f"{what}: {text!r} is not a memory size; write it like 8GB, 7.5GiB or 8000MB "
            "(GB = 10^9 bytes, GiB = 2^30: a card sold as 8 GB has 8 GiB)"
        )
    return int(float(match[1]) * MEMORY_UNITS[match[2].lower()])


def size_problems(what: str, text: str | None) -> list[str]:
    """The problem with a size option, for TrainConfig's list of problems ([] when fine or unset)."""
    try:
        if text is not None:
            parse_size(text, what)
    except UserError as e:
        return [str(e)]
    return []


def repo_id_problems(repo_id: str | None) -> list[str]:
    """The problem with a --push-to-hub repo id ([] when fine or unset), checked before training starts."""
    if repo_id is None:
        return []
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return [
            f"push_to_hub: {repo_id!r} is not a hub repo id like name or owner/name ({str(e).split('. Use')[0]})"
        ]
    return []
