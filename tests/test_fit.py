"""lora_rm.training.loop: the loop's windows, micro-batches, out-of-memory split and statistics, and whole runs in fp32
and bf16 (forced, so every machine exercises both whatever `--precision auto` picks on it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from conftest import preference_rows, write_jsonl

from lora_rm.config import TrainConfig
from lora_rm.data.encode import EncodedPair
from lora_rm.errors import UserError
from lora_rm.loss import PairStats
from lora_rm.training.loop import accumulation_windows, merge_stats, micro_batches, split_micro_batches, train
from lora_rm.training.run import LoopState, learning_check_step, stop_requested, warn_if_not_learning


@dataclass
class FakeLayout:
    """Epoch e is the batches [[10e], [10e+1], ..., [10e+4]]: five single-pair batches."""

    collator: object = list

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return [[10 * epoch + i] for i in range(5)]


def _run(state: LoopState, accumulation=2, processes=1, rank=0, batch_size=4, total_steps=100):
    cfg = TrainConfig(
        base="b", dataset="d.jsonl", gradient_accumulation_steps=accumulation, batch_size=batch_size
    )
    accelerator = SimpleNamespace(process_index=rank, num_processes=processes, device="cpu")
    model = torch.nn.Linear(1, 1)
    return SimpleNamespace(
        cfg=cfg, accelerator=accelerator, layout=FakeLayout(), state=state, model=model, log=lambda *_: None,
        total_steps=total_steps,
        train_pairs=[EncodedPair([i, 0], [i + 1, 0]) for i in range(8)],
    )  # fmt: skip


def test_windows_continue_from_the_state_and_roll_over_epochs():
    state = LoopState(epoch=1, window=1)
    windows = accumulation_windows(_run(state))
    # epoch 1 in windows of 2: [[10],[11]] [[12],[13]] [[14]]; one window already done
    assert next(windows) == [[12], [13]]
    state.window += 1  # the loop moves the window on after each step
    assert next(windows) == [[14]]
    state.window += 1
    assert next(windows) == [[20], [21]]
    assert (state.epoch, state.window) == (2, 0)


def test_no_window_past_the_last_step():
    """A run resumed from its final checkpoint trains no further."""
    assert list(accumulation_windows(_run(LoopState(step=6), total_steps=6))) == []
    state = LoopState(step=5)
    windows = accumulation_windows(_run(state, total_steps=6))
    assert next(windows) == [[0], [1]]
    state.step += 1
    assert list(windows) == []


def test_windows_of_two_processes_are_even_shards():
    first = [next(accumulation_windows(_run(LoopState(), processes=2, rank=r))) for r in (0, 1)]
    assert first == [[[0], [2]], [[1], [3]]]


def test_micro_batches_are_cut_after_an_out_of_memory():
    state = LoopState(micro_split=2)
    parts = list(micro_batches(_run(state), [[0, 1, 2], [3]]))
    assert [len(p) for p in parts] == [2, 1, 1]  # the collator here is `list`: the pairs themselves


def test_out_of_memory_split_halves_then_gives_up_at_one_pair():
    state = LoopState()
    run = _run(state)
    split_micro_batches(run, [[0, 1], [2, 3]])
    assert state.micro_split == 2
    with pytest.raises(UserError, match="1 pair per micro-batch"):
        split_micro_batches(run, [[0, 1], [2, 3]])


def test_out_of_memory_under_several_processes_is_a_clear_error():
    """Retrying on one rank while the others wait in the all-reduce would hang: refuse instead."""
    state = LoopState()
    with pytest.raises(UserError, match="on one process only; lower --batch-size"):
        split_micro_batches(_run(state, processes=2, rank=1), [[0, 1]])
    assert state.micro_split == 1


def test_merge_stats_adds_every_count():
    a = PairStats(n_pairs=2, loss_sum=1.5, correct=1, ties=1, margin_sum=0.25)
    b = PairStats(n_pairs=3, loss_sum=0.5, correct=3, ties=0, margin_sum=1.0)
    assert merge_stats(a, b) == PairStats(n_pairs=5, loss_sum=2.0, correct=4, ties=1, margin_sum=1.25)


def test_stop_requested_on_one_process():
    accelerator = SimpleNamespace(num_processes=1)
    assert not stop_requested(accelerator, [])
    assert stop_requested(accelerator, [15])


def _cfg(tmp_path, base, precision: str, **kw) -> TrainConfig:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    options = dict(
        base=str(base), dataset=str(data), output_dir=str(tmp_path / precision), quant="none", batch_size=4,
        gradient_accumulation_steps=2, max_steps=3, logging_steps=1, eval_steps=3, learning_rate=5e-3,
        eval_fraction=0.25, lora_dropout=0.0, precision=precision, seed=0,
    )  # fmt: skip
    return TrainConfig(**{**options, **kw})


@pytest.mark.parametrize("precision, mixed", [("fp32", "no"), ("bf16", "bf16")])
@pytest.mark.integration
def test_a_short_run_in_each_precision(tmp_path, tiny_gpt2, precision, mixed):
    result = train(_cfg(tmp_path, tiny_gpt2, precision), log=lambda *_: None)
    assert result.steps == 3
    config = json.loads((result.output_dir / "config.json").read_text(encoding="utf-8"))
    assert config["mixed_precision"] == mixed
    lines = (result.output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert result.eval_metrics["n_pairs"] == 6
    # LoRA and head weights stay fp32 whatever the forward's precision
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)


@pytest.mark.integration
def test_train_twice_in_one_process_with_other_precisions(tmp_path, tiny_gpt2):
    """accelerate's state is process-wide; train() must not leave the first run's precision fixed."""
    train(_cfg(tmp_path, tiny_gpt2, "bf16", max_steps=1), log=lambda *_: None)
    result = train(_cfg(tmp_path, tiny_gpt2, "fp32", max_steps=1), log=lambda *_: None)
    config = json.loads((result.output_dir / "config.json").read_text(encoding="utf-8"))
    assert config["mixed_precision"] == "no"


def test_bad_input_builds_no_accelerator(tmp_path, tiny_gpt2, monkeypatch):
    """The input checks come first: a bad dataset is reported before accelerate's precision is decided."""
    import accelerate

    def no_accelerator(*_a, **_k):
        raise AssertionError("Accelerator built before the input checks")

    monkeypatch.setattr(accelerate, "Accelerator", no_accelerator)
    cfg = _cfg(tmp_path, tiny_gpt2, "bf16", dataset=str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="no such file"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "bf16").exists()


@pytest.mark.parametrize(
    "total, start, expected", [(100, 0, 10), (20, 0, 3), (3, 0, None), (100, 5, None), (1000, 0, 100)]
)
def test_the_learning_check_comes_after_a_tenth_of_the_run(total, start, expected):
    assert learning_check_step(_run(LoopState(step=start), total_steps=total)) == expected


@pytest.mark.parametrize(
    "loss, abs_margin_sum, lr, warned",
    [
        (0.6931, 0.0, 1e-4, True),
        (0.690, 0.16, 1e-4, True),  # mean |margin| 0.04
        (0.68, 0.0, 1e-4, False),
        (0.6931, 0.4, 1e-4, False),  # mean |margin| 0.1: margins of both signs, averaging to 0
        (0.3, 6.0, 1e-4, False),
        # at auto's rate (1e-3 here) a stuck start is normal on hard data: the end of the run says it if it stays
        (0.6931, 0.0, 1e-3, False),
        (0.6931, 0.0, 3e-3, False),
    ],
)
def test_not_learning_is_said_with_the_change_to_make(loss, abs_margin_sum, lr, warned):
    lines: list[str] = []
    run = _run(LoopState(step=10))
    run.cfg.learning_rate = lr
    run.log = lines.append
    stats = PairStats(n_pairs=4, loss_sum=4 * loss, margin_sum=0.0, abs_margin_sum=abs_margin_sum)
    warn_if_not_learning(run, stats)
    assert bool(lines) is warned
    if warned:
        assert "after 10 of 100 steps the training loss is" in lines[0] and "mean |margin|" in lines[0]
        assert "--learning-rate auto (0.001 for this base; now 0.0001)" in lines[0]


@pytest.mark.integration
def test_a_run_with_a_tiny_learning_rate_is_told_early(tmp_path, tiny_gpt2, monkeypatch):
    import sys

    setup_module = sys.modules["lora_rm.training.setup"]  # where set_up looks init_head up

    def tiny_head(model):  # a head that starts near 0 (as on a real base's wide hidden states): loss ~ln 2
        with torch.no_grad():
            model.score.weight.mul_(1e-3)

    monkeypatch.setattr(setup_module, "init_head", tiny_head)
    lines: list[str] = []
    train(
        _cfg(tmp_path, tiny_gpt2, "fp32", max_steps=20, learning_rate=1e-9, logging_steps=100),
        log=lines.append,
    )
    warnings = [line for line in lines if "the model is not learning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: after 3 of 20 steps")
