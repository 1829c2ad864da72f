"""lora_rm.training.optim: the mixed precision `--precision` resolves to on each device, and the optimizer and schedule."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rm.config import TrainConfig
from lora_rm.errors import UserError
from lora_rm.model.precision import choose_precision, resolve_precision
from lora_rm.training.optim import build_optimizer


@pytest.mark.parametrize("precision, expected", [("fp32", "no"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_explicit_precisions_on_a_gpu(precision, expected):
    assert resolve_precision(precision, "cuda") == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, fast_bf16, expected):
    """Both answers on every machine: the CPU probes are replaced, whatever this CPU has."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_on_cpu_runs_a_quantized_base_in_fp32(monkeypatch, quant, fast_bf16):
    """bitsandbytes' CPU kernels work in fp32: bf16 autocast around them only adds casts (3.2x slower
    measured on MiniLM in 8-bit), so auto picks fp32 even on a bf16 CPU, and says why."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: fast_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    mode, why = choose_precision("auto", "cpu", quant)
    assert mode == "no" and f"{quant} saves memory here, not time" in why
    assert resolve_precision("auto", "cpu", "none") == ("bf16" if fast_bf16 else "no")
    assert resolve_precision("bf16", "cpu", quant) == "bf16"  # an explicit precision wins


@pytest.mark.parametrize("quant", ["none", "8bit", "4bit"])
def test_auto_on_a_gpu_ignores_quantization(monkeypatch, quant):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda", quant) == "bf16"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_prefers_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "cuda") == expected


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)  # the frozen base
    return model


def test_adamw_over_the_trainable_parameters_only():
    cfg = TrainConfig(base="b", dataset="d.jsonl", learning_rate=1e-3, weight_decay=0.01)
    model = _model()
    optimizer, _ = build_optimizer(model, cfg, total_steps=10, device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in params} == {id(p) for p in model[1].parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_warmup_then_linear_decay_to_zero():
    cfg = TrainConfig(base="b", dataset="d.jsonl", learning_rate=1.0, lr_scheduler="linear", warmup_ratio=0.2)
    optimizer, scheduler = build_optimizer(_model(), cfg, total_steps=10, device_type="cpu")
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    warmup = math.ceil(0.2 * 10)
    assert lrs[: warmup + 1] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[-1] == pytest.approx(1.0 / 8) and scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_paged_8bit_adamw_needs_cuda():
    cfg = TrainConfig(base="b", dataset="d.jsonl", optimizer="paged_adamw_8bit")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        build_optimizer(_model(), cfg, total_steps=10, device_type="cpu")


def test_a_run_logs_the_precision_auto_chose(monkeypatch, tmp_path, tiny_gpt2, prefs_file):
    from lora_rm.training.inputs import check_inputs

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    lines: list[str] = []
    for quant in ("8bit", "none"):
        cfg = TrainConfig(
            base=str(tiny_gpt2),
            dataset=str(prefs_file),
            output_dir=str(tmp_path),
            quant=quant,
            precision="auto",
        )
        inputs = check_inputs(cfg, lines.append)
        assert inputs.mixed_precision == ("no" if quant == "8bit" else "bf16")
    precision_lines = [line for line in lines if line.startswith("precision:")]
    assert precision_lines[0].startswith("precision: fp32 (auto: on CPU the 8bit base runs fastest in fp32")
    assert precision_lines[1] == "precision: bf16 (auto: this CPU has AVX512-BF16/AMX)"


def test_the_reward_head_can_have_its_own_learning_rate():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, num_labels=1, pad_token_id=0)
    model = get_peft_model(
        GPT2ForSequenceClassification(config), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["c_attn"])
    )
    head = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".score." in n}
    lora = {id(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert len(head) == 1 and len(lora) == 2  # PEFT's trained copy of `score`, LoRA's A and B

    cfg = TrainConfig(base="b", dataset="d.jsonl", learning_rate=1e-4, head_learning_rate=1e-3)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps=10, device_type="cpu")
    groups = [({id(p) for p in g["params"]}, g["initial_lr"]) for g in optimizer.param_groups]
    assert groups == [(lora, 1e-4), (head, 1e-3)]
    scheduler.step()  # the schedule scales both rates alike
    assert scheduler.get_last_lr()[1] / scheduler.get_last_lr()[0] == pytest.approx(10)

    same = TrainConfig(base="b", dataset="d.jsonl", learning_rate=1e-4)
    optimizer, _ = build_optimizer(model, same, total_steps=10, device_type="cpu")
    assert [({id(p) for p in g["params"]}, g["initial_lr"]) for g in optimizer.param_groups] == [
        (lora | head, 1e-4)
    ]


@pytest.mark.parametrize(
    "model_type, width, expected",
    [
        ("llama", 576, 2e-3),  # SmolLM2-135M
        ("gpt2", 64, 2e-3),
        ("gpt2", 768, 1.5e-3),  # 2e-3 x 576 / 768
        ("mistral", 4096, 2.8e-4),  # 2e-3 x 576 / 4096 = 2.8125e-4, two digits
        ("llama", 8192, 1.4e-4),
        ("bert", 384, 1e-3),  # all-MiniLM-L6-v2
        ("bert", 768, 7.5e-4),
        ("deberta-v2", 1024, 5.6e-4),  # 1e-3 x 576 / 1024 = 5.625e-4
        ("t5", 512, 1e-3),  # neither: the lower rate
        (None, None, 1e-3),
    ],
)
def test_auto_learning_rate_by_the_kind_and_width_of_the_base(model_type, width, expected):
    from types import SimpleNamespace

    from lora_rm.training.optim import auto_learning_rate

    lr, why = auto_learning_rate(SimpleNamespace(model_type=model_type, hidden_size=width))
    decoder = model_type in ("llama", "gpt2", "mistral")
    base = "0.002 for a causal decoder" if decoder else "0.001 for a base other"
    assert lr == pytest.approx(expected) and why.startswith(f"auto: {base}")


def test_causal_decoders_are_told_from_encoders_by_their_model_type():
    from transformers import AutoConfig

    from lora_rm.model.precision import reads_last_token

    decoders = ["gpt2", "llama", "qwen2", "mistral", "gemma", "phi3", "gpt_neox", "opt", "falcon"]
    others = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "modernbert", "bart"]
    others += ["t5"]  # an encoder-decoder: neither
    assert all(reads_last_token(AutoConfig.for_model(kind)) for kind in decoders)
    assert not any(reads_last_token(AutoConfig.for_model(kind)) for kind in others)
    assert not reads_last_token(None)


def test_learning_rate_auto_from_the_command_line_and_config_files():
    assert TrainConfig(base="b", dataset="d.jsonl").learning_rate is None  # auto is the default
    assert TrainConfig(base="b", dataset="d.jsonl", learning_rate="Auto").learning_rate is None
    assert TrainConfig(base="b", dataset="d.jsonl", learning_rate="2e-4").learning_rate == 2e-4
    with pytest.raises(UserError, match="learning_rate: expected a number, got 'fast'"):
        TrainConfig(base="b", dataset="d.jsonl", learning_rate="fast")
    with pytest.raises(UserError, match="head_learning_rate: expected a number, got 'auto'"):
        TrainConfig(base="b", dataset="d.jsonl", head_learning_rate="auto")  # no auto for the head
