"""Write the trained reward model: the adapter folder, and optionally a merged standalone model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_rm.atomic import staged
from lora_rm.batch import PreferenceCollator
from lora_rm.encode import EncodedPair
from lora_rm.rewards import compute_rewards
from lora_rm.saved import CONFIG_FILE, load_reward_model

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
