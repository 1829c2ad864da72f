"""Whether a saved folder fits the model it is loaded into, checked before it is built: an adapter's tensors
against its base (another architecture, width or rank), a merged model's tensors against its config.json; then
the whole check of an adapter or merged folder, and the guards around building and scoring (a failure of the
libraries as one line, a non-finite reward as an error)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_rm.errors import UserError
from lora_rm.model.folder_checks import (
    check_adapter_config,
    check_finite_weights,
    check_head,
    check_model_config,
    check_reward_stats,
    check_run_config,
    check_tokenizer_files,
    weight_shapes,
)
from lora_rm.model.load import unwrap_model

TOKENIZER_VOCABS = ("vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def check_adapter_folder(
    folder: Path, allow_untrained_head: bool = False
) -> tuple[dict[str, Any], Path, dict]:
    """(adapter config, weights file, {tensor: shape}) of an adapter folder whose every file lora_rm reads is
    well formed, whose head was trained and saved (unless `allow_untrained_head`) and whose weights are finite."""
    config = check_adapter_config(folder)
    check_run_config(folder)
    check_reward_stats(folder)
    check_tokenizer_files(folder)
    file, shapes = weight_shapes(folder, "adapter_model")
    check_head(file, shapes, allow_untrained_head)
    check_finite_weights(file, list(shapes))  # an adapter is small: every tensor
    return config, file, shapes


def check_merged_folder(folder: Path, allow_untrained_head: bool = False) -> None:
    """A merged (or plain transformers) model folder: config.json, a tokenizer, weights that fit the config,
    a trained head (unless `allow_untrained_head`) with finite values."""
    check_model_config(folder)
    check_run_config(folder)
    check_reward_stats(folder)
    if not check_tokenizer_files(folder) and not any((folder / f).is_file() for f in TOKENIZER_VOCABS):
        raise UserError(f"{folder}: no tokenizer (tokenizer.json or tokenizer_config.json); save the tokenizer "
                        "beside the model")  # fmt: skip
    file, shapes = weight_shapes(folder, "model")
    check_finite_weights(file, check_head(file, shapes, allow_untrained_head))
    check_merged_fits(folder, file, shapes)


def _describe(config: Any) -> str:
    return f"{getattr(config, 'model_type', '?')}, hidden size {getattr(config, 'hidden_size', '?')}"


def _features(module: Any) -> tuple[int | None, int | None]:
    """(in, out) features of a layer LoRA adapts: Linear (also int8 / 4-bit) or GPT-2's Conv1D ([in, out])."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0], weight.shape[1]
    return None, None


def _lora_problem(model: Any, name: str, shape: list[int], r: int | None) -> str | None:
    """Why a LoRA tensor (`<module>.lora_A.weight` [r, in] or `.lora_B.weight` [out, r]) does not fit `model`."""
    side = ".lora_A." if ".lora_A." in name else ".lora_B."
    module_name = name.split(side)[0]
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return f"the base has no module {module_name}"
    in_f, out_f = _features(module)
    width, rank = (in_f, 0) if side == ".lora_A." else (out_f, 1)
    width_at = 1 - rank
    if len(shape) != 2 or (width is not None and shape[width_at] != width):
        return f"shape {shape} does not fit the base's {module_name} ({in_f} in, {out_f} out)"
    if r is not None and shape[rank] != r:
        return f"rank {shape[rank]}, but adapter_config.json: r is {r}"
    return None


def check_adapter_fits(base: Any, file: Path, shapes: dict[str, list[int]], config: dict[str, Any]) -> None:
    """UserError naming the tensor when the adapter's weights do not fit `base` (a loaded transformers model):
    a LoRA pair on a module the base lacks or of another width, another rank than r, a saved module (the head)
    of another shape."""
    model = unwrap_model(base)
    r = None if config.get("rank_pattern") else config.get("r")
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in name or ".lora_B." in name:
            problem = _lora_problem(model, name, shape, r)
        elif "lora_" in name:  # embedding LoRA, DoRA magnitudes: PEFT checks those itself
            continue
        else:
            try:
                param = model.get_parameter(name)
            except AttributeError:
                param = None
            problem = "the base has no such parameter" if param is None else None
            if param is not None and type(param).__name__ != "Params4bit" and list(param.shape) != shape:
                problem = f"shape {shape}, but the base's is {list(param.shape)}"
        if problem:
            raise UserError(f"{file}: {key}: {problem} ({_describe(model.config)}); the adapter was trained on "
                            "another base: pass that one (--base / base=)")  # fmt: skip


def check_merged_fits(folder: Path, file: Path, shapes: dict[str, list[int]]) -> None:
    """UserError naming the tensor when a merged model's weights do not have the shapes its config.json gives a
    one-output sequence-classification model (built on the meta device: no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(folder), num_labels=1)
        if getattr(config, "quantization_config", None):  # packed weights: transformers checks them
            return
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except (
        Exception
    ) as e:  # an unknown model_type, a field of the wrong kind: anything the config cannot build
        text = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"{folder / 'config.json'}: cannot build a model from it ({type(e).__name__}: {text})"
        ) from None
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}."
    for key, shape in shapes.items():
        want = next(
            (expected[k] for k in (key, prefix + key, key.removeprefix(prefix)) if k in expected), None
        )
        if want is not None and want != shape:
            raise UserError(f"{file}: {key}: shape {shape}, but config.json ({_describe(config)}, one reward "
                            f"output) needs {want}")  # fmt: skip


@contextlib.contextmanager
def loading(what: Path | str) -> Iterator[None]:
    """Whatever transformers, PEFT or safetensors raise while building a model from a checked folder, as one
    line naming `what` (out-of-memory errors pass: they are not the folder's fault)."""
    try:
        yield
    except UserError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{what}: cannot be loaded ({type(e).__name__}: {text[:300]})") from None


def check_rewards_finite(rewards: torch.Tensor, where: Path | str | None) -> None:
    """UserError when a reward is NaN or infinite: an error, never a number in the output."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise UserError(
            f"{where or 'the model'}: gave a non-finite reward (NaN or inf) for {len(bad)} of {len(rewards)} "
            f"texts (the first: #{bad[0]}); its weights are damaged or overflow in this precision (try fp32)"
        )
