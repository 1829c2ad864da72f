"""Load a base model as a one-output reward model (tokenizer, quantization, fused GELU) and add LoRA; loading a
saved folder back is `lora_rm.model.saved`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lora_rm.errors import UserError
from lora_rm.util.offline import hub_offline, require_hub, unreachable_message

HEAD_NAMES = ("score", "classifier")  # decoders name their head `score`, encoders `classifier`
# Kept out of int8: a quantized head breaks PEFT's trainable copy of it ("'Parameter' has no attribute 'CB'"),
# and BERT's pooler / DistilBERT's pre_classifier feed the head directly.
KEEP_FULL_PRECISION = [*HEAD_NAMES, "pooler", "pre_classifier"]


def resolve_base(name: str) -> str:
    """A local base folder as an absolute path (so that an adapter recording it loads from any working
    directory); a hub id unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def hub_load_error(name: str, e: Exception, what: str) -> UserError:
    """The UserError for a model, tokenizer or config that `name` (a local folder or hub id) did not give."""
    kind, text = type(e).__name__, str(e)
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        if not Path(name).expanduser().exists():
            return UserError(f"{name}: no such local folder")
        return UserError(f"{name}: no {what} in this folder ({kind}: {text.splitlines()[0] if text else ''})")
    if hub_offline() or any(k in kind for k in ("Connection", "Timeout", "Offline")):
        return UserError(unreachable_message(name, what, kind))
    if (
        "RepositoryNotFound" in kind
        or "not a valid model identifier" in text
        or "does not appear to have" in text
    ):
        return UserError(f"{name}: no {what} found (not a local folder with one, not a hub model id)")
    return UserError(f"{name}: cannot load the {what} ({kind}: {text.splitlines()[0] if text else ''})")


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer with a pad token: many decoders (GPT-2, Llama) ship without one.

    The fallback pad is EOS, as TRL and most reward-model code set it, and it is saved with the model, so every
    caller pads and pools the same way: the reward is read at the last token that is not the pad id (so a
    trailing EOS is never read; `lora_rm.data.sequences` builds no sequence ending in one). Padding is on the right.
    """
    from transformers import AutoTokenizer

    require_hub(name, "tokenizer")  # seconds, not a minute of retries, when the hub is out of reach
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise hub_load_error(name, e, "tokenizer") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise UserError(f"{name}: tokenizer has no pad, EOS or UNK token to pad with")
    tokenizer.padding_side = "right"
    return tokenizer


MIN_CAPABILITY = {"8bit": (7, 5), "4bit": (6, 0)}  # LLM.int8 needs Turing+, NF4 Pascal+


def check_quantization(quant: str, device_type: str) -> None:
    """Raise a UserError that explains the fallback when this machine cannot run `quant`."""
    if quant == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a RuntimeError from a library that cannot find its binary
        raise UserError(
            f"quant {quant} needs bitsandbytes, which cannot load here ({type(e).__name__}: {e}). "
            "Install it (pip install bitsandbytes) or train with --quant none."
        ) from None
    if device_type == "cuda":
        have = torch.cuda.get_device_capability()
        need = MIN_CAPABILITY[quant]
        if have < need:
            fallback = (
                "--quant 4bit" if quant == "8bit" and have >= MIN_CAPABILITY["4bit"] else "--quant none"
            )
            raise UserError(
                f"quant {quant} needs a GPU of compute capability {need[0]}.{need[1]} or newer; this one is "
                f"{have[0]}.{have[1]} ({torch.cuda.get_device_name()}). Use {fallback}."
            )


def quantization_config(quant: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    # LLM.int8 casts every matmul input to fp16 by design; bitsandbytes logs that once per call.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=KEEP_FULL_PRECISION,
        )
    return None


def load_base_model(
    name: str,
    pad_token_id: int,
    quant: str = "none",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: Any = None,
) -> Any:
    """`AutoModelForSequenceClassification` with one output (the reward), optionally quantized.

    The score head is new and randomly initialised, so `seed` is applied right before loading to make
    runs repeatable. Raises UserError for an unknown model or an unreachable hub.
    """
    from transformers import AutoModelForSequenceClassification

    name = resolve_base(name)  # PEFT records model.name_or_path as the adapter's base: make it absolute
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name,
            num_labels=1,
            pad_token_id=pad_token_id,
            quantization_config=quantization_config(quant, dtype),
            dtype=dtype,
            revision=revision,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
        )
    except (OSError, ValueError) as e:
        raise hub_load_error(name, e, "model") from None
    model.config.pad_token_id = pad_token_id
    fp32_head(model)  # fails now, with a clear message, for a model without a known head
    fuse_gelu(model)
    return model


class Fp32Linear(torch.nn.Linear):
    """A linear reward head that computes in fp32 whatever the autocast or the weights' dtype.

    Rewards are compared by their differences: in bf16 (8 significant bits) two rewards near 3 that differ
    by less than 0.016 come out equal, so evaluations counted hundreds of ties and `compare` called close
    answers even. Same parameters and state-dict names as `nn.Linear`; saved models are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.float(), self.weight.float(), bias)


def init_head(model: torch.nn.Module) -> None:
    """Draw the new linear reward head again with std 1 / (width + 1) and a zero bias, as OpenRLHF does.

    transformers draws it with the base's `initializer_range` (0.02), which on a decoder's large last hidden
    state gives wide random margins before any training, a random ranking that Adam, moving each weight ~lr a
    step, takes many steps to unlearn (measured: docs/benchmarks.md, "Do the defaults learn?"). Training only;
    a saved or loaded model's head is never touched.
    """
    head = getattr(unwrap_model(model), head_name(model))
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / (head.in_features + 1))
            if head.bias is not None:
                head.bias.zero_()


def fp32_head(model: torch.nn.Module) -> str:
    """Make the model's linear reward head an `Fp32Linear` (other head kinds are left as they are); returns
    the head's name. Raises UserError for a model without a known head."""
    name = head_name(model)
    head = getattr(unwrap_model(model), name)
    if type(head) is torch.nn.Linear:
        head.__class__ = Fp32Linear
    return name


def fuse_gelu(model: torch.nn.Module) -> int:
    """Compute GPT-2's `gelu_new` (tanh-approximated GELU written as seven tensor ops) with torch's one fused
    kernel; returns how many activations were swapped.

    Same function up to float rounding (~1e-7), but autograd keeps one tensor per MLP instead of six: the
    activations saved for backward shrink by about half (GPT-2 small: docs/performance.md),
    and the elementwise passes drop from seven to one. The model's config is untouched, so saved and merged
    models are unchanged.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def unwrap_model(model: Any) -> Any:
    """The transformers model inside DDP/FSDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_name(model: Any) -> str:
    """Name of the reward head (`score` or `classifier`) on a transformers, PEFT or DDP-wrapped model."""
    inner = unwrap_model(model)
    for name in HEAD_NAMES:
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return name
    raise UserError(
        f"{type(inner).__name__} has no `score` or `classifier` head: load the base with "
        "AutoModelForSequenceClassification (num_labels=1), not a causal-LM or base class"
    )


def add_lora(
    model: Any,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """Wrap `model` with LoRA adapters and a trainable, saved copy of the reward head; the base's dropout is off.

    `task_type=SEQ_CLS` makes PEFT train and save the head (`modules_to_save`); without it the head
    stays random after training and is lost on save. Trainable weights are kept in fp32 so that
    fp16/bf16 compute cannot underflow their updates.
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    # The base's own dropout would give chosen and rejected different noise within one comparison, and
    # make a pair's reward depend on what it is batched with; LoRA keeps its own (`dropout`).
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    # Reentrant checkpointing loses the grads of LoRA layers whose inputs do not require grad.
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        # GPT-2's Conv1D stores weights transposed; an int8 base has plain Linear layers instead.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        # SEQ_CLS already adds `classifier` and `score` (our only head names, `head_name`): naming the head
        # here too would list it twice in the saved adapter_config.json
        modules_to_save=None,
    )
    head_name(model)  # a model without a reward head: refused here, not trained with a random one
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise UserError(
            f"cannot add LoRA to {model.config.model_type}: {e}. Name modules with --target-modules"
        ) from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model
