"""lora_rm.training.loop: no non-finite loss, gradient or weight ever reaches the weights or a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import run_training, train_command
from conftest import preference_rows, write_jsonl
from safetensors.torch import load_file

from lora_rm.training.loop import guarded_step


class _OneProcess:
    num_processes, scaler, optimizer_step_was_skipped = 1, None, False

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def _model_with_grad(grad: float) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    return model, torch.optim.SGD(model.parameters(), lr=1.0)


def test_an_infinite_loss_with_a_finite_gradient_is_not_a_step():
    model, opt = _model_with_grad(0.5)
    before = [p.detach().clone() for p in model.parameters()]
    stepped, _ = guarded_step(_OneProcess(), model, opt, 1.0, loss_finite=False)
    assert not stepped and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_step_that_makes_a_weight_infinite_is_undone():
    model, opt = _model_with_grad(-1.0)
    with torch.no_grad():
        model.bias.fill_(3e38)  # + lr 1e38 * 1 overflows float32
    opt.param_groups[0]["lr"] = 1e38
    before = [p.detach().clone() for p in model.parameters()]
    stepped, _ = guarded_step(_OneProcess(), model, opt, 0.0, loss_finite=True)
    assert not stepped and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_finite_step_is_taken():
    model, opt = _model_with_grad(0.5)
    before = model.bias.detach().clone()
    stepped, norm = guarded_step(_OneProcess(), model, opt, 0.0, loss_finite=True)
    assert stepped and float(norm) > 0 and not torch.equal(before, model.bias)


# Runs the training script with the loss infinite from micro-batch `sys.argv[1]` on, its gradient still finite:
# what an overflowing margin did before margins were checked.
INFINITE_LOSS = r"""
import runpy, sys
import lora_rm.training.loop
real, start, calls = lora_rm.training.loop.batch_losses, int(sys.argv.pop(1)), [0]
def batch_losses(*a, **k):
    calls[0] += 1
    losses = real(*a, **k)
    return losses + float("inf") if calls[0] > start else losses
lora_rm.training.loop.batch_losses = batch_losses
sys.argv[0] = sys.argv[1]; del sys.argv[1]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.integration
def test_a_run_whose_loss_turns_infinite_stops_with_the_last_finite_weights(tmp_path, tiny_gpt2):
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    out = tmp_path / "run"
    cmd = train_command(
        tiny_gpt2, data, out, max_steps=20, save_steps=2, save_total_limit=5, logging_steps=1,
        max_bad_steps=3, gradient_accumulation_steps=2, learning_rate="5e-3",
    )  # fmt: skip
    proc = run_training([cmd[0], "-c", INFINITE_LOSS, "4", *cmd[1:]])  # steps 3, 4 and 5 are bad
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient" in proc.stderr
    assert f"last good weights in {out / 'step-000005'}" in proc.stderr
    saved = [
        load_file(str(out / s / "adapter" / "adapter_model.safetensors"))
        for s in ("step-000002", "step-000005")
    ]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    assert all(torch.isfinite(w).all() for w in saved[1].values())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 5 and last["skipped_steps"] == 3
