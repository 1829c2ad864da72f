"""A saved reward model folder: what lora_rm records in it, and loading an adapter folder back onto its base.

Adapter folders from lora_rm or from other tools (TRL's RewardTrainer, any PEFT sequence-classification
adapter) load the same way; folders lora_rm saved under an older sequence rule are refused. Writing them:
`save_adapter` and `merge_adapter`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from lora_rm.data.encode import EncodedPair
from lora_rm.errors import UserError
from lora_rm.model.collate import PreferenceCollator
from lora_rm.model.folder_checks import check_model_config, read_json_object
from lora_rm.model.folder_fit import check_adapter_fits, check_adapter_folder, loading
from lora_rm.model.load import fuse_gelu, head_name, load_base_model, load_tokenizer
from lora_rm.model.rewards import compute_rewards
from lora_rm.util.atomic import staged

CONFIG_FILE = "lora_rm_config.json"  # the resolved run config, saved beside every adapter and merged model


# Version of the sequence rule in `lora_rm.data.sequences`. 2: the text as `tokenizer(text)` gives it, read at its last
# non-pad token, as transformers reads it. Models saved before (no version) had an EOS appended and were read
# there, a token transformers, pipeline and TRL skip whenever pad == EOS.
SEQUENCE_FORMAT = 2


def check_sequence_format(folder: str | Path) -> None:
    """Refuse a model folder that lora_rm saved under an older sequence rule: every reader would misread it.

    Folders without lora_rm's config (a model trained by TRL's RewardTrainer or any plain transformers
    reward model) pass: they are read exactly as transformers reads them.
    """
    saved = read_json_object(Path(folder) / CONFIG_FILE, required=False)
    if saved is None:
        return
    if saved.get("sequence_format") != SEQUENCE_FORMAT:
        raise UserError(
            f"{folder}: saved by an older lora_rm that read the reward at an EOS it appended, a token that "
            "transformers, pipeline and TRL skip when pad == EOS, so its rewards would be misread everywhere. "
            "Retrain it with this version (the same command), or score it with lora_rm 0.1"
        )


def load_reward_model(
    adapter_dir: str | Path,
    base: Any = None,
    quant: str = "none",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    allow_untrained_head: bool = False,
) -> tuple[Any, Any]:
    """Load a trained adapter (LoRA + reward head) onto a base; return (model, tokenizer) ready to score.

    `base` is a hub id, a local path, an already loaded `AutoModelForSequenceClassification`, or None
    to use the base recorded in the adapter. The model is returned in eval mode.
    Raises UserError, naming the file and field, when the folder holds no adapter, a file in it is damaged,
    its weights do not fit the base, it saved no reward head (unless `allow_untrained_head`), or the base
    cannot be loaded.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter folder")
    config, weights, shapes = check_adapter_folder(adapter_dir, allow_untrained_head)
    check_sequence_format(adapter_dir)
    recorded = config.get("base_model_name_or_path")
    # lora_rm saves the tokenizer with the adapter; TRL's RewardTrainer usually does; else it is the base's
    has_tokenizer = any((adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer:
        with loading(f"{adapter_dir} (its tokenizer)"):
            tokenizer = load_tokenizer(str(adapter_dir))
    elif isinstance(base, (str, Path)) or (base is None and recorded):
        with loading(f"{base or recorded} (its tokenizer)"):
            tokenizer = load_tokenizer(str(base or recorded))
    elif base is not None:
        tokenizer = load_tokenizer(base.config.name_or_path)
    else:
        raise UserError(f"{adapter_dir}: no tokenizer in the folder and no base recorded; pass base=")
    if base is None or isinstance(base, (str, Path)):
        if not (base or recorded):
            raise UserError(f"{adapter_dir}: adapter_config.json records no base model; pass --base / base=")
        name = str(base or recorded)
        if Path(name).expanduser().is_dir():  # a local base: its config.json is read too
            check_model_config(Path(name).expanduser())
        with loading(f"{name} (the base model)"):
            base = load_base_model(name, tokenizer.pad_token_id, quant=quant, dtype=dtype)
    else:
        head_name(base)
        base.config.pad_token_id = tokenizer.pad_token_id
        fuse_gelu(base)  # the activation training used: same rewards to the last bit
    check_adapter_fits(base, weights, shapes, config)
    with warnings.catch_warnings(), loading(weights):
        # An adapter trained on an int8 GPT-2 (Linear) meets Conv1D here; PEFT flips fan_in_fan_out, as it should.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    if device is not None and not getattr(model, "is_quantized", False):
        model.to(device)
    return model.eval(), tokenizer


__all__ = ["CONFIG_FILE", "merge_adapter", "save_adapter"]


def save_adapter(model: Any, tokenizer: Any, run_config: dict[str, Any], out_dir: str | Path) -> Path:
    """Save LoRA weights + reward head (safetensors), the tokenizer and the resolved config to `out_dir`."""
    out_dir = Path(out_dir)
    with staged(out_dir) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / CONFIG_FILE).write_text(json.dumps(run_config, indent=2, default=str), encoding="utf-8")
    return out_dir


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, check_pairs: list[EncodedPair], base: str | None = None
) -> dict[str, float]:
    """Fold the adapter into a full-precision copy of its base and save a standalone model.

    Never merges into an int8 base: rounding the merged weights back to int8 adds an error of the order
    of the LoRA update itself. The base is reloaded in its checkpoint's dtype (fp32 for GPT-2), the
    rewards of `check_pairs` are computed before and after merging, and the largest difference is
    returned (and checked: a merged model that disagrees with its adapter raises RuntimeError).
    """
    model, tokenizer = load_reward_model(
        adapter_dir, base=base, quant="none", dtype=_checkpoint_dtype_of(adapter_dir, base)
    )
    collator = PreferenceCollator(tokenizer.pad_token_id)
    batch = collator(check_pairs) if check_pairs else None
    with torch.no_grad():
        before = compute_rewards(model, batch.input_ids, batch.attention_mask) if batch else None
        merged = model.merge_and_unload()
        after = compute_rewards(merged, batch.input_ids, batch.attention_mask) if batch else None
    max_diff = float((before - after).abs().max()) if batch else 0.0
    scale = float(before.abs().max()) + 1.0 if batch else 1.0
    tolerance = (1e-4 if merged.dtype == torch.float32 else 2e-2) * scale
    if max_diff > tolerance:
        raise RuntimeError(
            f"merged model disagrees with its adapter: max reward difference {max_diff:.3g} > {tolerance:.3g}"
        )
    with staged(Path(out_dir)) as staging:
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        shutil.copy(Path(adapter_dir) / CONFIG_FILE, staging / CONFIG_FILE)
    return {"merge_max_abs_diff": max_diff, "merge_check_pairs": len(check_pairs)}


def _checkpoint_dtype_of(adapter_dir: str | Path, base: str | None) -> torch.dtype:
    """The dtype the base was saved in (the adapter's recorded base unless `base`): fp16/bf16, else fp32."""
    from transformers import AutoConfig

    if base is None:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
        base = config["base_model_name_or_path"]
    dtype = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
