"""lora_rm.train (lora_rm.training.loop): gradient accumulation, the training loop end to end, what it changes and writes."""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_run_config
from safetensors.torch import load_file

from lora_rm.config import TrainConfig
from lora_rm.data.encode import EncodedPair
from lora_rm.errors import UserError
from lora_rm.model.collate import PreferenceCollator
from lora_rm.model.load import add_lora, load_base_model, load_tokenizer
from lora_rm.model.precision import resolve_precision
from lora_rm.model.rewards import compute_rewards
from lora_rm.model.saved import load_reward_model
from lora_rm.training.loop import backward_window, train
from lora_rm.training.setup import collector_paused

ROOT = Path(__file__).parents[1]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_accumulation_of_k_micro_batches_equals_one_big_batch(tiny_gpt2):
    tokenizer = load_tokenizer(str(tiny_gpt2))
    model = add_lora(load_base_model(str(tiny_gpt2), 0, seed=0), dropout=0.0)
    with torch.no_grad():  # non-zero B so that every LoRA weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    pairs = [
        EncodedPair([5, 6, 7, 0], [5, 9, 0], 0.5),
        EncodedPair([8, 0], [8, 10, 11, 12, 0]),
        EncodedPair([13, 14, 0], [15, 0]),
    ]
    accelerator = Accelerator(cpu=True)

    def grads_of(batches):
        model.zero_grad()
        stats = backward_window(model, batches, accelerator)
        return _grads(model), stats.summary()

    big, big_stats = grads_of([collate(pairs)])
    # an uneven window (2 pairs + 1 pair): each pair must weigh 1/3, not 1/2 * 1/2 and 1/2 * 1
    small, small_stats = grads_of([collate(pairs[:2]), collate(pairs[2:])])
    assert big.keys() == small.keys() and len(big) > 0
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-7, msg=name)
    assert small_stats["n_pairs"] == big_stats["n_pairs"] == 3
    assert small_stats["loss"] == pytest.approx(big_stats["loss"], rel=1e-5)


def test_the_collector_is_paused_for_set_up_and_left_as_it_was():
    assert gc.isenabled()
    with pytest.raises(UserError), collector_paused():
        assert not gc.isenabled()
        raise UserError("set-up failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_resolve_precision():
    assert resolve_precision("fp32", "cuda") == "no"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("bf16", "no")


def _cfg(tmp_path, base, data, **kw) -> TrainConfig:
    return tiny_run_config(
        base, data, tmp_path / "run", **{"epochs": 3, "eval_steps": 1000, "logging_steps": 2, **kw}
    )


@pytest.fixture
def trained(trained_run):
    """The suite's shared run (conftest.trained_run): 8 epochs, accumulation 2, logging every 2 steps, merged."""
    return trained_run


def test_training_learns_and_writes_its_outputs(trained):
    out = trained.output_dir
    assert trained.eval_metrics["accuracy"] > 0.8 and trained.eval_metrics["n_pairs"] == 12
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "lora_rm_config.json"):
        assert (trained.adapter_dir / name).is_file(), name
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(2, trained.steps + 1, 2))
    assert records[-1]["eval_accuracy"] == trained.eval_metrics["accuracy"]
    saved = json.loads((trained.adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    assert saved["max_length"] == 64 and saved["lora_r"] == 16 and saved["eval"]["n_pairs"] == 12
    assert not list(out.glob("*.partial"))


def test_base_unchanged_lora_and_head_moved(trained, tiny_gpt2):
    base = load_base_model(str(tiny_gpt2), 0, seed=0)  # same seed: the head the run started from
    model = trained.model
    # PEFT renames wrapped weights: base_model.model.<name> and <module>.base_layer.<param>
    trained_params = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in model.named_parameters()
    }
    for name, p in base.named_parameters():
        if name != "score.weight":
            assert torch.equal(trained_params[name], p), name
    head = model.get_base_model().score.modules_to_save["default"].weight
    assert not torch.allclose(head, base.score.weight)
    saved = load_file(str(trained.adapter_dir / "adapter_model.safetensors"))
    assert any("score" in k for k in saved), "the reward head must be in the adapter file"
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)


def _reward_batch(tokenizer):
    texts = ["question : how do i cook rice ? answer : sure first you should mix", "whatever go away"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    return PreferenceCollator(tokenizer.pad_token_id)([EncodedPair(ids[0], ids[1])])


def test_reloaded_adapter_reproduces_rewards_exactly(trained):
    batch = _reward_batch(trained.tokenizer)
    with torch.no_grad():
        before = compute_rewards(trained.model, batch.input_ids, batch.attention_mask)
        model, _ = load_reward_model(trained.adapter_dir)
        after = compute_rewards(model, batch.input_ids, batch.attention_mask)
    assert torch.equal(before, after)


def test_adapter_loads_into_an_already_loaded_model(trained, tiny_gpt2):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_gpt2), num_labels=1)
    model, tokenizer = load_reward_model(trained.adapter_dir, base=base)
    batch = _reward_batch(tokenizer)
    with torch.no_grad():
        expected = compute_rewards(trained.model, batch.input_ids, batch.attention_mask)
        assert torch.equal(compute_rewards(model, batch.input_ids, batch.attention_mask), expected)


def test_merged_model_loads_plainly_and_matches_adapter(trained):
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(str(trained.output_dir / "merged")).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = _reward_batch(trained.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(
            compute_rewards(merged, batch.input_ids, batch.attention_mask),
            compute_rewards(trained.model, batch.input_ids, batch.attention_mask),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.integration
def test_8bit_training_and_its_adapter_on_the_full_precision_base(tmp_path, tiny_gpt2, prefs_file):
    result = train(_cfg(tmp_path, tiny_gpt2, prefs_file, quant="8bit", epochs=2), log=lambda *_: None)
    assert result.eval_metrics["n_pairs"] == 12
    batch = _reward_batch(result.tokenizer)
    with torch.no_grad():
        int8 = compute_rewards(result.model, batch.input_ids, batch.attention_mask)
        full, _ = load_reward_model(result.adapter_dir, quant="none")
        fp = compute_rewards(full, batch.input_ids, batch.attention_mask)
    # Same adapter, int8 vs fp32 base weights: close (int8 rounding) and in the same order. A LoRA
    # delta applied with the wrong transpose (GPT-2 Conv1D vs int8 Linear) would not be.
    assert (int8[0] - int8[1]).sign() == (fp[0] - fp[1]).sign()
    torch.testing.assert_close(fp, int8, rtol=0.05, atol=0.05 * float(int8.abs().max()) + 1e-3)


@pytest.mark.integration
def test_quickstart_from_the_readme_learns(tmp_path):
    """The README's offline main job, as a user types it: tiny local GPT-2, example data, 8-bit, merged; every
    output written and eval accuracy well above 50%."""
    out = tmp_path / "quickstart"
    cmd = [
        sys.executable,
        "scripts/train_lora.py",
        "--config",
        "examples/quickstart.yaml",
        "--output-dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final eval: accuracy" in proc.stdout
    for rel in (
        "adapter/adapter_model.safetensors",
        "adapter/lora_rm_config.json",
        "merged/model.safetensors",
        "metrics.jsonl",
        "config.json",
        "eval/eval.json",
    ):
        assert (out / rel).is_file(), rel
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["quant"] == "8bit"
    final = json.loads((out / "adapter" / "lora_rm_config.json").read_text(encoding="utf-8"))["eval"]
    assert final["n_pairs"] == 200 and final["accuracy"] >= 0.85


@pytest.mark.integration
def test_report_to_sends_every_metrics_record_to_the_tracker(monkeypatch, tmp_path, tiny_gpt2, prefs_file):
    from accelerate.tracking import GeneralTracker

    inputs_module = importlib.import_module("lora_rm.training.inputs")

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False
        logged: list = []

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

    recorder = Recorder()
    monkeypatch.setattr(inputs_module, "tracker", lambda name: [recorder])
    train(_cfg(tmp_path, tiny_gpt2, prefs_file, max_steps=4, report_to="tensorboard"), log=lambda *_: None)
    lines = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [step for step, _ in recorder.logged] == [r["step"] for r in lines]
    assert recorder.logged[0][1]["loss"] == lines[0]["loss"]
    assert recorder.config["lora_r"] == 16


def test_report_to_a_missing_package_is_a_user_error(tmp_path, tiny_gpt2, prefs_file):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="pip install wandb"):
        train(_cfg(tmp_path, tiny_gpt2, prefs_file, report_to="wandb"), log=lambda *_: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["DEEPSPEED", "MEGATRON_LM", "XLA"])
def test_backends_the_loop_cannot_drive_are_refused(name):
    from accelerate.utils import DistributedType

    from lora_rm.errors import UserError
    from lora_rm.training.inputs import check_distributed

    with pytest.raises(UserError, match=f"set up for {name}.*does not support"):
        check_distributed(DistributedType[name])


@pytest.mark.parametrize("name", ["NO", "MULTI_CPU", "MULTI_GPU", "FSDP"])
def test_ddp_and_fsdp_pass_the_backend_check(name):
    from accelerate.utils import DistributedType

    from lora_rm.training.inputs import check_distributed

    check_distributed(DistributedType[name])


@pytest.mark.integration
def test_the_end_of_training_is_evaluated_once(tmp_path, tiny_gpt2, prefs_file):
    """The last step has no in-loop eval: the full evaluation is the one final number, in the log and in
    metrics.jsonl (the in-loop one ran on the training layout and could differ in the last digits)."""
    lines: list[str] = []
    cfg = tiny_run_config(tiny_gpt2, prefs_file, tmp_path / "run", max_steps=4, eval_steps=2)
    result = train(cfg, log=lines.append)
    assert [line.split(":")[0] for line in lines if line.startswith("eval")] == ["eval @ step 2", "eval"]
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1] == {"step": 4, **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}


@pytest.mark.integration
def test_the_auto_learning_rate_is_logged_and_saved_with_the_model(tmp_path, tiny_gpt2, prefs_file):
    lines: list[str] = []
    cfg = tiny_run_config(tiny_gpt2, prefs_file, tmp_path / "run", max_steps=2, learning_rate=None)
    result = train(cfg, log=lines.append)
    assert "learning rate: 0.002 (auto: 0.002 for a causal decoder up to 576 wide)" in lines  # 64 wide
    saved = json.loads((result.adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    assert saved["learning_rate"] == 2e-3
    assert "0.002 (cosine" in (result.adapter_dir / "README.md").read_text(encoding="utf-8")


@pytest.mark.integration
def test_the_published_evaluation_reads_the_saved_model_as_users_load_it(tiny_gpt2, tmp_path, monkeypatch):
    from conftest import preference_rows, write_jsonl

    from lora_rm.evaluation.reward_model import RewardModel

    # users' default dtype made bf16 here (it is on a GPU): the saved model then scores unlike the fp32 trainer
    monkeypatch.setenv("LORA_RM_SCORE_DTYPE", "bf16")
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    held_out = write_jsonl(tmp_path / "held.jsonl", preference_rows(30)[24:])
    cfg = tiny_run_config(tiny_gpt2, data, tmp_path / "run", max_steps=4, eval_dataset=str(held_out))
    result = train(cfg, log=lambda *_: None)
    saved = json.loads((result.adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    users = RewardModel.from_pretrained(result.adapter_dir).evaluate(
        str(held_out),
        tmp_path / "users",
        batch_size=cfg.batch_size * 2,
        save_stats=False,
        log=lambda *_: None,
    )
    fp32 = RewardModel.from_pretrained(result.adapter_dir, dtype=torch.float32).evaluate(
        str(held_out), tmp_path / "fp32", batch_size=cfg.batch_size * 2, save_stats=False, log=lambda *_: None
    )
    assert users["loss"] != fp32["loss"]  # the two readings differ: the check below tells them apart
    assert saved["eval"]["loss"] == pytest.approx(users["loss"], abs=1e-7)
    assert "RewardModel.from_pretrained" in saved["eval_model"] and "bfloat16" in saved["eval_model"]
    card = (result.adapter_dir / "README.md").read_text(encoding="utf-8")
    assert "read from the saved adapter as RewardModel.from_pretrained loads it (bfloat16)" in card


@pytest.mark.integration
def test_the_training_model_is_evaluated_when_the_saved_one_does_not_fit(tiny_gpt2, tmp_path, monkeypatch):
    from conftest import preference_rows, write_jsonl

    from lora_rm.evaluation.reward_model import RewardModel

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(RewardModel, "from_pretrained", no_memory)
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    logs: list[str] = []
    result = train(tiny_run_config(tiny_gpt2, data, tmp_path / "run", max_steps=2), log=logs.append)
    saved = json.loads((result.adapter_dir / "lora_rm_config.json").read_text(encoding="utf-8"))
    assert saved["eval_model"].startswith("the training model") and saved["eval"]["n_pairs"] == 6
    assert any(line.startswith("warning: the saved model does not fit") for line in logs), logs
