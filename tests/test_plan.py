"""lora_rm.training.plan: the memory arithmetic against hand-worked figures, size parsing, fit_to_vram, `lora-rm plan`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import preference_rows, write_jsonl
from transformers import GPT2Config, LlamaConfig

from lora_rm.cli import main
from lora_rm.config import TrainConfig, parse_size
from lora_rm.errors import UserError
from lora_rm.training.plan import (
    GIB,
    activation_bytes,
    estimate,
    fit_to_vram,
    lora_params,
    model_shape,
    trainable_bytes,
    weight_bytes,
)


def tiny_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)


def llama_1b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )


def test_tiny_gpt2_parameters_by_kind_counted_by_hand():
    shape = model_shape(tiny_config())
    # per layer, Linear (Conv1D) weights: c_attn 64x192 + attn.c_proj 64x64 + c_fc 64x256 + mlp.c_proj 256x64
    assert shape.linear_params == 2 * (12288 + 4096 + 16384 + 16384) == 98304
    assert sorted(shape.quantized)[:2] == [(4096, 64), (4096, 64)]
    # wte 1000x64 + wpe 128x64 + per layer (biases 192+64+256+64, two LayerNorms 2x128) + ln_f 128 + score 64x1
    assert shape.other_params == 64000 + 8192 + 2 * (576 + 256) + 128 + 64 == 74048
    assert shape.total_params == 172352
    assert shape.head_params == 64
    assert shape.target_modules == ("c_attn",) and shape.lora_targets == ((64, 192), (64, 192))
    assert (shape.n_layers, shape.hidden, shape.intermediate, shape.heads) == (2, 64, 256, 4)
    assert shape.activation == "gelu_new" and not shape.gated_mlp


def test_weight_bytes_for_each_quant():
    shape = model_shape(tiny_config())
    fp32_rest = 4 * 74048  # embeddings, norms, biases, head: fp32 after prepare_model_for_kbit_training
    # int8: a byte per weight + a fp32 scale per output row (2 x (192 + 64 + 256 + 64) = 1152 rows)
    assert weight_bytes(shape, "8bit") == 98304 + 4 * 1152 + fp32_rest == 399104
    # NF4: half a byte per weight + an 8-bit absmax per 64 + a fp32 scale per 256 blocks, per tensor:
    # c_attn 6144+192+4, attn.c_proj 2048+64+4, c_fc and mlp.c_proj 8192+256+4 each
    assert weight_bytes(shape, "4bit") == 2 * (6340 + 2116 + 8452 + 8452) + fp32_rest == 346912
    assert weight_bytes(shape, "none") == 2 * 172352  # bf16 base


def test_lora_and_trainable_state():
    shape = model_shape(tiny_config())
    assert lora_params(shape, 8) == 8 * (64 + 192) * 2 == 4096  # r x (in + out) on c_attn, 2 layers
    assert trainable_bytes(shape, 8) == (4096 + 64) * 16  # fp32 weight, grad, two AdamW moments
    assert trainable_bytes(shape, 8, "paged_adamw_8bit") == (4096 + 64) * 10


def test_lora_count_matches_peft_on_a_real_model(tiny_gpt2):
    from lora_rm.model.load import add_lora, load_base_model

    config = GPT2Config.from_pretrained(tiny_gpt2)
    shape = model_shape(config)
    model = add_lora(load_base_model(str(tiny_gpt2), 0), r=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_params(shape, 8) + shape.head_params
    assert sum(p.numel() for p in model.get_base_model().parameters()) == shape.total_params + trainable


def test_activation_bytes_by_the_documented_formula():
    shape = model_shape(tiny_config())  # h 64, f 256, a 4; gelu_new (fused) keeps k = 1 f-wide tensor
    tokens = 2 * 2 * 32  # 2 pairs = 4 sequences of 32 tokens
    # 8bit (e = 4): norms 8h 512 + attention 8h+4a+2T 592 + MLP e*k*f 1024 + LoRA (2+1)*64+2*8 208
    # + int8-held e*(2h+f) 1536 = 3872 per layer; outside 6h = 384
    assert activation_bytes(shape, "8bit", 8, 2, 32) == tokens * (2 * 3872 + 384) == 1040384
    # checkpointing: per layer the input e*h 256 + the held 1536; one layer in full; outside
    assert activation_bytes(shape, "8bit", 8, 2, 32, True) == tokens * (2 * 1792 + 3872 + 384) == 1003520
    # bf16 base (e = 2): MLP 512, nothing held: 1824 per layer
    assert activation_bytes(shape, "none", 8, 2, 32) == tokens * (2 * 1824 + 384) == 516096
    assert activation_bytes(shape, "none", 8, 2, 32, True) == tokens * (2 * 128 + 1824 + 384)
    assert activation_bytes(shape, "4bit", 8, 2, 32) == tokens * (2 * (3872 - 1536) + 384)
    # no LoRA dropout: no 1-byte mask
    assert activation_bytes(shape, "none", 8, 2, 32, lora_dropout=0.0) == tokens * (2 * 1760 + 384)


def test_bf16_activation_formula_matches_saved_tensors_on_cpu():
    """The bf16-base formula vs the bytes autograd really saves (CPU, bf16 autocast, no LoRA dropout).

    A Llama shape, because its RMSNorm upcasts to fp32 in code on every device; the CPU still differs from
    CUDA in its SDPA kernel, so the two agree within a few percent, not exactly."""
    from transformers import AutoModelForSequenceClassification

    from lora_rm.model.load import add_lora

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        num_labels=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model = add_lora(base, r=8, dropout=0.0).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(1, 1000, (4, 64))
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids, attention_mask=mask)
    expected = activation_bytes(model_shape(config), "none", 8, 2, 64, lora_dropout=0.0)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.05)


def test_gpt2_small_and_llama_1b_estimates_are_sane():
    gpt2 = model_shape(GPT2Config())
    assert gpt2.total_params == 124_440_576
    assert 200e6 < weight_bytes(gpt2, "8bit") < 300e6  # 85M int8 weights + 39.5M fp32 (mostly embeddings)
    assert weight_bytes(gpt2, "4bit") < weight_bytes(gpt2, "8bit")
    llama = model_shape(llama_1b())
    assert llama.total_params == 1_034_514_432 and llama.gated_mlp
    assert lora_params(llama, 16) == 22 * 16 * ((2048 + 2048) + (2048 + 256))  # q_proj, v_proj (GQA: 256 out)
    assert 1.1e9 < weight_bytes(llama, "8bit") < 1.4e9
    est = estimate(llama, "4bit", 16, 1, 1024, checkpointing=True)
    assert 1 * GIB < est.total < 4 * GIB
    assert estimate(llama, "4bit", 16, 8, 1024).total > estimate(llama, "4bit", 16, 8, 1024, True).total


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GB", 8 * 10**9),
        ("7.5GiB", int(7.5 * 2**30)),
        ("8000MB", 8 * 10**9),
        ("512 mib", 512 * 2**20),
        ("123B", 123),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8", "eight GB", "8 GB/s", "-1GB", "0GB", "", "8GBB"])
def test_parse_size_rejects_with_an_example(text):
    with pytest.raises(UserError, match="write it like 8GB, 7.5GiB or 8000MB"):
        parse_size(text)


def test_bad_vram_is_a_config_problem():
    with pytest.raises(UserError, match="vram: '8' is not a memory size"):
        TrainConfig(base="b", dataset="d", vram="8")


def _cfg(vram_bytes: int, **kw) -> TrainConfig:
    options = dict(base="b", dataset="d", max_length=128, batch_size=4, gradient_accumulation_steps=4)
    return TrainConfig(**{**options, **kw, "vram": f"{vram_bytes}B"})


def test_fit_to_vram_keeps_the_effective_batch():
    config, shape = tiny_config(), model_shape(tiny_config())
    common = dict(shape=shape, quant="8bit", r=16, seq_len=128)
    fits_2 = estimate(batch_size=2, **common).total
    assert estimate(batch_size=4, **common).total > fits_2
    batch, steps, ckpt, message = fit_to_vram(_cfg(fits_2), config)
    assert (batch, steps, ckpt) == (2, 8, False)
    assert "effective batch 16 kept" in message
    assert fit_to_vram(_cfg(10**12), config)[:3] == (4, 4, False)  # never above the batch asked for
    # one pair without checkpointing is too much, with it it fits
    only_ckpt = estimate(batch_size=1, checkpointing=True, **common).total
    assert estimate(batch_size=1, **common).total > only_ckpt
    assert fit_to_vram(_cfg(only_ckpt), config)[:3] == (1, 16, True)
    assert fit_to_vram(_cfg(10**12, gradient_checkpointing=True), config)[2] is True  # kept when asked for
    with pytest.raises(UserError, match="try --quant 4bit"):
        fit_to_vram(_cfg(100 * 2**20), config)


@pytest.mark.integration
def test_train_with_vram_uses_the_fitted_batch(tmp_path, tiny_gpt2):
    from lora_rm.training.loop import train

    config = GPT2Config.from_pretrained(tiny_gpt2)
    shape, logged = model_shape(config), []
    budget = estimate(shape, "none", 16, 2, 64).total  # the fixture's limit is 64 tokens
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    cfg = TrainConfig(
        base=str(tiny_gpt2),
        dataset=str(data),
        output_dir=str(tmp_path / "run"),
        quant="none",
        precision="fp32",
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        eval_fraction=0.0,
        vram=f"{budget}B",
    )
    train(cfg, log=logged.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["batch_size"], saved["gradient_accumulation_steps"]) == (2, 2)
    assert any("2 pairs per micro-batch x 2 accumulation steps" in m for m in logged)


def test_cli_prints_a_table(tmp_path, capsys):
    tiny_config().save_pretrained(tmp_path)
    code = main(
        ["plan", "--base", str(tmp_path), "--max-length", "64", "--vram", "1GB", "--batch-sizes", "1", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0
    shape = model_shape(tiny_config())
    assert "172.4k parameters, 2 layers, hidden 64" in out
    assert "fits 1GB" in out and "largest micro-batch within 1GB" in out
    for b in (1, 2):
        total = estimate(shape, "8bit", 16, b, 64).total / GIB
        assert any(
            line.split()[:2] == [str(b), str(2 * b * 64)] and f"{total:.2f}" in line
            for line in out.splitlines()
        )


def test_cli_plan_errors_exit_2(tmp_path, capsys):
    assert main(["plan", "--base", str(tmp_path / "nope"), "--max-length", "64"]) == 2
    assert "no such local folder" in capsys.readouterr().err
    tiny_config().save_pretrained(tmp_path)
    assert main(["plan", "--base", str(tmp_path), "--vram", "lots"]) == 2
    assert "vram: 'lots' is not a memory size" in capsys.readouterr().err
    assert main(["plan", "--base", str(tmp_path), "--target-modules", "nothing_here"]) == 2
    assert "match no Linear layer" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "quant,checkpointing", [("8bit", False), ("8bit", True), ("4bit", True), ("none", False)]
)
def test_estimate_against_a_gpu(tmp_path, quant, checkpointing):
    """scripts/check_plan.py with GPT-2 small's shape: the estimated tensors within 25% of the measured peak."""
    import subprocess
    import sys
    from pathlib import Path

    GPT2Config().save_pretrained(tmp_path)
    script = Path(__file__).parents[1] / "scripts" / "check_plan.py"
    argv = [sys.executable, str(script), "--base", str(tmp_path), "--quant", quant, "--max-length", "512"]
    argv += ["--batch-size", "2", "--json"] + (["--gradient-checkpointing"] if checkpointing else [])
    result = json.loads(
        subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    )
    assert result["measured_peak_allocated_gib"] == pytest.approx(result["estimated_tensors_gib"], rel=0.25)


def test_plan_flags_are_train_configs_own(tmp_path, capsys):
    from lora_rm.config import config_fields
    from lora_rm.training.plan_report import PLAN_OPTIONS, plan_parser

    fields = {f.name: f for f in config_fields()}
    actions: dict = {}
    for a in plan_parser()._actions:  # the flag itself, not its hidden --no- twin
        actions.setdefault(a.dest, a)
    for name in PLAN_OPTIONS:
        assert actions[name].default == fields[name].default, name
        assert fields[name].metadata["help"].replace("%", "%%") in actions[name].help, name
    tiny_config().save_pretrained(tmp_path)
    tables = []
    for dropout in ("0.0", "0.1"):
        assert main(["plan", "--base", str(tmp_path), "--max-length", "64", "--lora-dropout", dropout]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] != tables[1], "dropout keeps an extra mask per LoRA input: the estimate must change"
    assert main(["plan", "--base", str(tmp_path), "--lora-dropout", "1.5"]) == 2
    assert "--lora-dropout: must be in [0, 1)" in capsys.readouterr().err
