"""Checks of a saved model folder before a model is built from it: every file lora_rm reads (JSON shape and
types, weight headers and shapes, the tokenizer), the reward statistics, and a reward head that was trained and
saved. Each problem is one UserError naming the file and the field; a damaged folder gives no traceback and
no reward."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_rm.errors import UserError
from lora_rm.model.load import HEAD_NAMES

MAX_JSON_BYTES = 2**28  # a tokenizer.json of a large vocabulary is tens of MB; configs are kilobytes
MAX_HEADER_BYTES = 10**8  # safetensors' own limit on a header
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
DTYPE_BYTES |= {"U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
UNTRAINED_HINT = (
    "its rewards would come from a random head. Pass a folder a reward-model training saved (RUN/adapter or "
    "RUN/merged), or --allow-untrained-head (allow_untrained_head=True) to score with a random head on purpose"
)


def read_json_object(path: Path, required: bool = True) -> dict[str, Any] | None:
    """The JSON object in `path` (None when it is absent and not `required`); UserError for a file that is
    too big, unreadable, not JSON or not an object."""
    if not path.is_file():
        if required:
            raise UserError(f"{path}: missing")
        return None
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UserError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB; not a config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def check_fields(
    data: dict[str, Any], path: Path, rules: dict[str, tuple[Callable[[Any], bool], str]]
) -> None:
    """UserError naming `path` and the field for the first present field whose value breaks its rule."""
    for name, (ok, expected) in rules.items():
        if name in data and not ok(data[name]):
            shown = repr(data[name])
            raise UserError(f"{path}: {name}: expected {expected}, got {shown[:80]}")


def check_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json of a PEFT adapter folder, its fields of the types PEFT needs."""
    path = folder / "adapter_config.json"
    data = read_json_object(path)
    rules = {
        "base_model_name_or_path": (lambda v: v is None or (isinstance(v, str) and v.strip()), "a model name or path"),
        "peft_type": (lambda v: isinstance(v, str), "a PEFT type such as LORA"),
        "task_type": (lambda v: v is None or isinstance(v, str), "a task type such as SEQ_CLS"),
        "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive number"),
        "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "target_modules": (lambda v: v is None or isinstance(v, str) or _names(v), "a list of module names"),
        "modules_to_save": (lambda v: v is None or _names(v), "a list of module names"),
        "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
        "rank_pattern": (lambda v: isinstance(v, dict), "an object"),
        "alpha_pattern": (lambda v: isinstance(v, dict), "an object"),
    }  # fmt: skip
    check_fields(data, path, rules)
    if "peft_type" not in data:
        raise UserError(f"{path}: peft_type: missing; not a PEFT adapter config")
    return data


def check_run_config(folder: Path) -> dict[str, Any]:
    """lora_rm_config.json ({} when absent: a model from another tool), with the fields scoring reads."""
    path = folder / "lora_rm_config.json"
    data = read_json_object(path, required=False) or {}
    rules = {
        "max_length": (lambda v: v is None or (_is_int(v) and v >= 4), "an integer >= 4"),
        "data_format": (lambda v: v is None or isinstance(v, str), "a data format name"),
        "base": (lambda v: v is None or isinstance(v, str), "a model name or path"),
    }
    check_fields(data, path, rules)
    return data


def check_reward_stats(folder: Path) -> dict[str, Any] | None:
    """reward_stats.json (None when absent): a finite mean and a finite std > 0, as normalising divides by it."""
    path = folder / "reward_stats.json"
    data = read_json_object(path, required=False)
    if data is None:
        return None
    for name in ("mean", "std"):
        if name not in data:
            raise UserError(f"{path}: {name}: missing")
    check_fields(
        data,
        path,
        {
            "mean": (_is_number, "a finite number"),
            "std": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        },
    )
    return data


def check_model_config(folder: Path) -> dict[str, Any]:
    """config.json of a transformers model folder: an object naming its model_type."""
    path = folder / "config.json"
    data = read_json_object(path)
    if not isinstance(data.get("model_type"), str):
        raise UserError(f"{path}: model_type: expected an architecture name (gpt2, llama, bert, ...), got "
                        f"{data.get('model_type')!r}")  # fmt: skip
    return data


def check_tokenizer_files(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer; UserError when its tokenizer.json or tokenizer_config.json is damaged."""
    present = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    for path in present:
        read_json_object(path)
    return bool(present)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a .safetensors header, every entry checked against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                raise UserError(
                    f"{path}: not a safetensors file (header length {n} in a file of {size} bytes)"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not an object)")
    data_bytes = size - 8 - n
    shapes = {}
    for name, entry in header.items():
        if name != "__metadata__":
            shapes[name] = _entry_shape(path, name, entry, data_bytes)
    return shapes


def _entry_shape(path: Path, name: str, entry: Any, data_bytes: int) -> list[int]:
    ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
    if not ok:
        raise UserError(f"{path}: {name}: not a tensor entry (dtype, shape, data_offsets)")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise UserError(f"{path}: {name}: data_offsets {offsets} lie outside the file's {data_bytes} data bytes "
                        "(truncated or damaged)")  # fmt: skip
    itemsize = DTYPE_BYTES.get(entry["dtype"])
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise UserError(f"{path}: {name}: {end - begin} bytes for a {entry['dtype']} tensor of shape {shape}")
    return shape


def pickle_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of a PyTorch .bin state dict, read with weights_only (no code runs)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in the legacy (not zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or unsupported-global errors: the file is not a plain state dict
        raise UserError(f"{path}: not a readable PyTorch weights file ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return {k: list(v.shape) for k, v in state.items()}


def weight_shapes(folder: Path, stem: str) -> tuple[Path, dict[str, list[int]]]:
    """(file, {tensor name: shape}) of `stem`.safetensors or `stem`.bin in `folder`, or of their shards
    listed in `stem`.safetensors.index.json; UserError when none is there or one is damaged."""
    for suffix, read in ((".safetensors", safetensors_shapes), (".bin", pickle_shapes)):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path, read(path)
        index = folder / f"{stem}{suffix}.index.json"
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index}: weight_map: expected an object of tensor name: file name")
            shapes = {}
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or not (folder / shard).is_file():
                    raise UserError(f"{index}: weight_map: shard {shard!r} is not a file in {folder}")
                shapes |= read(folder / shard)
            return index, shapes
    raise UserError(f"{folder}: no weights ({stem}.safetensors or {stem}.bin)")


def head_keys(shapes: dict[str, list[int]]) -> list[str]:
    """The tensors of a reward head (`score` or `classifier` in the name)."""
    return [k for k in shapes if any(part in HEAD_NAMES for part in k.split("."))]


def check_head(file: Path, shapes: dict[str, list[int]], allow_untrained: bool) -> list[str]:
    """The head's tensor names; UserError when the weights hold no head and `allow_untrained` is off."""
    keys = head_keys(shapes)
    if not keys and not allow_untrained:
        raise UserError(f"{file}: no reward head (score or classifier weights) was trained and saved, so "
                        f"{UNTRAINED_HINT}")  # fmt: skip
    return keys


def check_finite_weights(file: Path, keys: list[str]) -> None:
    """UserError naming the first tensor of `keys` in a .safetensors `file` with a NaN or infinite value."""
    if file.suffix != ".safetensors":
        return
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        for key in keys:
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"{file}: {key}: holds NaN or infinite values; every reward would be garbage")
