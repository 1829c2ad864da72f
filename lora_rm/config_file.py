"""Options from a YAML or JSON file, and the names TRL and transformers users type for them (`num_train_epochs`,
`per_device_train_batch_size`, `bf16: true`, ...) mapped to TrainConfig's fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_rm.bounds import MAX_CONFIG_BYTES, check_file_size
from lora_rm.config import config_fields
from lora_rm.errors import UserError
from lora_rm.trl_names import TRL_NAMES, translate_trl_names

# The names TRL, transformers' TrainingArguments and PEFT users type, as aliases of TrainConfig fields, on the
# command line and in config files. Fields whose names already match (output_dir, learning_rate, logging_steps,
# save_steps, gradient_checkpointing, lora_r, max_length, ...) need none.
ALIASES = {
    "model_name_or_path": "base",
    "dataset_name": "dataset",
    "dataset_train_split": "split",
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "lora_target_modules": "target_modules",
    "lr_scheduler_type": "lr_scheduler",
}
# TrainingArguments' boolean switches that stand for one value of a field: `bf16: true` is `precision: bf16`.
# ModelConfig's load_in_8bit / load_in_4bit are `quant`'s values. Names that need more than a rename:
# `lora_rm.trl_names`.
FLAG_ALIASES = {
    "bf16": ("precision", "bf16"),
    "fp16": ("precision", "fp16"),
    "load_in_8bit": ("quant", "8bit"),
    "load_in_4bit": ("quant", "4bit"),
}


def resolve_aliases(options: dict[str, Any], where: str) -> dict[str, Any]:
    """`options` with every alias replaced by its field (`num_train_epochs` -> `epochs`, `bf16: true` ->
    `precision: bf16`; a false switch is dropped). UserError naming `where` when an alias and its field, or
    two aliases, give one field different values."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in translate_trl_names(options, where).items():
        name = ALIASES.get(key, key)
        if key in FLAG_ALIASES:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {key}: expected true or false, got {value!r}")
            if not value:
                continue
            name, value = FLAG_ALIASES[key]
        if name in out and out[name] != value:
            raise UserError(
                f"{where}: {given[name]} and {key} both set {name} ({out[name]!r} vs {value!r}); give one"
            )
        out[name], given[name] = value, key
    return out


def _loader(path: Path) -> Any:
    """yaml.SafeLoader that refuses aliases (`*name`): options need none, and a few hundred bytes of nested
    aliases expand to billions of values (a "billion laughs" file), in memory and in any message that shows them."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise UserError(
                    f"{path}:{event.start_mark.line + 1}: YAML aliases (*{str(event.anchor)[:40]}) are not "
                    "supported in config files; write the value out"
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of TrainConfig fields (dashes or underscores; the TRL and
    TrainingArguments names of `ALIASES` and `FLAG_ALIASES` too)."""
    path = Path(path)
    try:
        if path.is_file():
            check_file_size(path, MAX_CONFIG_BYTES, "config file")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    import yaml

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_loader(path))
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"{path}: not valid {kind}: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in config_fields()} | set(ALIASES) | set(FLAG_ALIASES) | set(TRL_NAMES)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown option(s): {', '.join(unknown)}")
    return resolve_aliases(data, str(path))
