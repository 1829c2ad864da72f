"""The optimizer step that never lets a non-finite number into the weights.

A step is dropped (and counted by the caller) when the window's loss, the gradient, or the weights after the
update are not finite: an overflowing margin gives an infinite loss with a finite gradient, and a huge
learning rate gives finite gradients but infinite weights. Either would otherwise be saved as a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch


def guarded_step(accelerator: Any, model: Any, optimizer: Any, max_grad_norm: float, loss_finite: bool):
    """Clip, then step unless the loss or gradient is non-finite, then undo a step that left a weight non-finite.

    Every process takes the same decision (the gradient norm is synced; loss and weights are reduced).
    Returns (stepped, grad_norm): `stepped` False means the weights are as before the step.
    """
    loss_ok = _all_processes(accelerator, loss_finite)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    grad_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
    params = [p for p in model.parameters() if p.requires_grad]
    if not (loss_ok and grad_ok) and accelerator.scaler is None:
        return False, grad_norm
    if not loss_ok and grad_ok:  # with fp16 the scaler would take this step: its gradient is finite
        return False, grad_norm
    before = [p.detach().clone() for p in params]
    optimizer.step()  # with fp16 the grad scaler skips inf steps itself and lowers its scale
    if accelerator.optimizer_step_was_skipped:
        return False, grad_norm
    weights_ok = _all_processes(accelerator, all(bool(torch.isfinite(p).all()) for p in params))
    if not weights_ok:
        with torch.no_grad():
            for p, old in zip(params, before):
                p.copy_(old)
    return loss_ok and grad_ok and weights_ok, grad_norm


def _all_processes(accelerator: Any, ok: bool) -> bool:
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(0 if ok else 1, device=accelerator.device)
    return accelerator.reduce(flag, "max").item() == 0
