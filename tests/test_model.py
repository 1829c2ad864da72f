"""lora_rm.model.load: loading, trainable parameters, quantized bases, heads, the fused GELU."""

from __future__ import annotations

import pytest
import torch

from lora_rm.errors import UserError
from lora_rm.model.load import add_lora, head_name, init_head, load_base_model, load_tokenizer, unwrap_model
from lora_rm.model.rewards import compute_rewards


def _model(path, quant="none", **lora):
    tokenizer = load_tokenizer(str(path))
    return add_lora(
        load_base_model(str(path), tokenizer.pad_token_id, quant=quant, seed=0), **lora
    ), tokenizer


def test_pad_falls_back_to_eos_and_is_set_on_the_model(tiny_gpt2):
    model, tokenizer = _model(tiny_gpt2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert model.config.pad_token_id == 0
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_only_lora_and_head_are_trainable(fixture, request):
    model, _ = _model(request.getfixturevalue(fixture))
    head = head_name(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train"
    assert all("lora_" in n or f"{head}.modules_to_save" in n for n in trainable), trainable
    assert any(f"{head}.modules_to_save" in n for n in trainable), "the reward head must be trained"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_the_head_is_listed_once_in_modules_to_save(fixture, request, tmp_path):
    import json

    model, _ = _model(request.getfixturevalue(fixture))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))["modules_to_save"]
    assert saved.count(head_name(model)) == 1 and len(saved) == len(set(saved)), saved


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_8bit_base_keeps_head_in_full_precision_and_trains(fixture, request):
    import bitsandbytes as bnb

    model, tokenizer = _model(request.getfixturevalue(fixture), quant="8bit")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    head = getattr(model.get_base_model(), head_name(model))
    assert all(p.dtype == torch.float32 for p in head.parameters())
    ids = tokenizer(["how do i cook rice", "whatever go away"], padding=True, return_tensors="pt")
    rewards = compute_rewards(model, ids["input_ids"], ids["attention_mask"])
    (rewards[0] - rewards[1]).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_on_8bit_gives_every_trainable_a_gradient(tiny_gpt2):
    model, tokenizer = _model(tiny_gpt2, quant="8bit", gradient_checkpointing=True)
    model.train()
    # LoRA B starts at zero, so A's gradient is zero on the first step by construction: nudge B first.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = tokenizer(["how do i cook rice", "whatever go away"], padding=True, return_tensors="pt")
    rewards = compute_rewards(model, ids["input_ids"], ids["attention_mask"])
    (rewards[0] - rewards[1]).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_causal_lm_class_without_head_is_a_user_error(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    with pytest.raises(UserError, match="AutoModelForSequenceClassification"):
        head_name(AutoModelForCausalLM.from_pretrained(str(tiny_gpt2)))


def test_unknown_local_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_tokenizer(str(tmp_path / "no-such-model"))


def test_seeded_head_is_reproducible(tiny_gpt2):
    a = load_base_model(str(tiny_gpt2), 0, seed=3).score.weight
    b = load_base_model(str(tiny_gpt2), 0, seed=3).score.weight
    assert torch.equal(a, b)


def test_a_new_head_is_drawn_with_std_one_over_width_plus_one():
    model = torch.nn.Module()
    model.score = torch.nn.Linear(4000, 1)
    torch.nn.init.constant_(model.score.bias, 1.0)
    torch.manual_seed(0)
    init_head(model)
    assert abs(model.score.weight.std().item() * 4001 - 1) < 0.05  # 4000 draws: ~1% sampling error
    assert torch.equal(model.score.bias, torch.zeros(1))


def test_training_starts_from_the_small_head_and_seeds_it(trained_run, tiny_gpt2):
    """The trained copy of the head starts from init_head's draw (PEFT keeps the start as original_module)."""
    start = unwrap_model(trained_run.model).score.original_module.weight
    tokenizer = load_tokenizer(str(tiny_gpt2))
    expected = load_base_model(str(tiny_gpt2), tokenizer.pad_token_id, seed=0)  # the suite's run has seed 0
    assert not torch.equal(start, expected.score.weight)  # transformers' draw (std 0.02) is not what trains
    init_head(expected)
    assert torch.equal(start, expected.score.weight)
    assert abs(start.std().item() * 33 - 1) < 0.5  # std 1/33 for this 32-wide model (32 draws)


@pytest.mark.parametrize(
    "quant, capability, fallback",
    [("8bit", (7, 0), "--quant 4bit"), ("8bit", (5, 2), "--quant none"), ("4bit", (5, 2), "--quant none")],
)
def test_old_gpus_get_a_clear_quantization_fallback(monkeypatch, quant, capability, fallback):
    from lora_rm.model.load import check_quantization

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    with pytest.raises(UserError, match=fallback):
        check_quantization(quant, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    check_quantization(quant, "cuda")
    check_quantization(quant, "cpu")


def test_missing_bitsandbytes_suggests_quant_none(monkeypatch):
    import builtins

    from lora_rm.model.load import check_quantization

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UserError, match="--quant none"):
        check_quantization("8bit", "cpu")
    check_quantization("none", "cpu")


def _saved_activation_bytes(model, input_ids) -> int:
    """Bytes autograd keeps for backward in one forward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids)
    return sum(saved.values())


def test_gpt2_gelu_runs_fused_with_the_same_rewards_and_less_saved_memory(tiny_gpt2):
    from transformers import AutoModelForSequenceClassification
    from transformers.activations import NewGELUActivation

    tokenizer = load_tokenizer(str(tiny_gpt2))
    fused = load_base_model(str(tiny_gpt2), tokenizer.pad_token_id, seed=0)
    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_gpt2), num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    assert fused.config.activation_function == stock.config.activation_function == "gelu_new"
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert any(isinstance(m, NewGELUActivation) for m in stock.modules())
    ids = torch.randint(1, len(tokenizer), (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            fused(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-6
        )
    # one saved tensor per MLP activation instead of six (tiny model: n_embd 32, 2 layers)
    for model in (fused, stock):
        for p in model.parameters():
            p.requires_grad_(True)
    assert _saved_activation_bytes(fused, ids) < 0.8 * _saved_activation_bytes(stock, ids)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_bert"])
def test_the_reward_head_computes_in_fp32_under_bf16(fixture, request):
    """bf16 keeps 8 significant bits: rewards near 3 that differ by < 0.016 would tie. The head works in fp32
    on the (bf16) hidden states, in training (LoRA's trained copy of the head) and in a plain model."""
    from lora_rm.model.load import Fp32Linear

    model, tokenizer = _model(request.getfixturevalue(fixture))
    base = model.get_base_model()
    head = getattr(base, head_name(model))
    assert isinstance(head.modules_to_save["default"], Fp32Linear) and isinstance(
        head.original_module, Fp32Linear
    )

    layer = head.modules_to_save["default"]
    x = torch.randn(64, layer.in_features).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    expected = x.double() @ layer.weight.double().T + (0 if layer.bias is None else layer.bias.double())
    assert torch.allclose(out.double(), expected, atol=1e-5)
    ids = tokenizer(["how do i cook rice", "whatever go away"], padding=True, return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards = compute_rewards(model, ids["input_ids"], ids["attention_mask"])
    assert rewards.dtype == torch.float32
    plain = load_base_model(str(request.getfixturevalue(fixture)), tokenizer.pad_token_id, seed=0)
    assert isinstance(getattr(plain, head_name(plain)), Fp32Linear)
    assert list(plain.state_dict()) == list(type(plain)(plain.config).state_dict())  # saved names unchanged
