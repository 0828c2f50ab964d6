"""NonFiniteGuard: stop a diverged run at its first non-finite loss or gradient, before the step is applied.

Without it a run whose loss turns NaN (too high a learning rate, fp16/bf16 overflow) keeps training
on NaN weights, writes them over last.ckpt at the next save and fails later with an unrelated error.
The guard checks, after the backward and before the optimizer step, that the loss and the gradient
norm are finite (one device sync per step). On the first bad step it raises TrainingDiverged: the
optimizer step never happens, so the weights (and every checkpoint already written) stay those of the
last good step, and nothing is saved after it. `haipai fit` prints the message as one line and exits 2.

`haipai fit` adds a NonFiniteGuard() by default; a `callbacks.NonFiniteGuard` in the config replaces it.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from haipai_lightning.config import TrainingDiverged


class NonFiniteGuard(L.Callback):
    """Raise TrainingDiverged at the first training step whose loss or gradients are NaN / inf."""

    def __init__(self, max_nonfinite_steps: int = 0, check_gradients: bool = True) -> None:
        """Args:
            max_nonfinite_steps: non-finite steps tolerated in a row; each one is skipped (its gradients are
                dropped, the weights stay as they were). 0 = stop at the first.
            check_gradients: also check the gradient norm (off under fp16 AMP, whose GradScaler skips such
                steps itself).
        """
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps, self.check_gradients = max_nonfinite_steps, check_gradients
        self._loss: torch.Tensor | None = None
        self._in_a_row = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._loss = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss = self._loss if self._loss is not None else torch.zeros((), device=pl_module.device)
        loss = loss.float().sum()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # fp16 AMP: inf gradients are routine there, the GradScaler skips those steps and lowers its scale
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        check_grads = self.check_gradients and scaler is None and bool(grads)
        gnorm = torch.nn.utils.get_total_norm(grads).float().to(loss.device) if check_grads else torch.zeros_like(loss)
        bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
        if trainer.world_size > 1:  # every rank stops (or skips) at the same step
            bad = torch.as_tensor(trainer.strategy.reduce_boolean_decision(bool(bad), all=False))
        if not bool(bad):  # the one device sync of the check
            self._in_a_row = 0
            return
        self._in_a_row += 1
        if self._in_a_row <= self.max_nonfinite_steps:
            for g in optimizer.param_groups:  # skip: the optimizer leaves parameters without gradients alone
                for p in g["params"]:
                    p.grad = None
            return
        raise TrainingDiverged(_message(trainer, optimizer, float(loss) if self._loss is not None else None,
                                        float(gnorm) if check_grads else None))


def _message(trainer: L.Trainer, optimizer: Any, loss: float | None, gnorm: float | None) -> str:
    step = trainer.global_step + 1
    if loss is not None and not math.isfinite(loss):
        what = f"the training loss is {loss}"
    else:
        what = f"the gradient norm is {gnorm}" + (f" (loss {loss:.4g})" if loss is not None else "")
    last = ""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.last_model_path:
            last = f"; {cb.last_model_path} is the last good checkpoint"
            break
    group = optimizer.param_groups[0]
    lr = group.get("initial_lr", group.get("lr"))  # the configured one (a scheduler may have scaled it down)
    clip = trainer.gradient_clip_val
    precision = str(trainer.precision)
    tips = [f"a lower learning rate (model.optimizer.init_args.lr, now {lr:.3g})" if isinstance(lr, float)
            else "a lower learning rate (model.optimizer.init_args.lr)",
            f"stronger gradient clipping (trainer.gradient_clip_val, now {clip})" if clip
            else "gradient clipping (trainer.gradient_clip_val: 1.0)"]
    if "16" in precision:
        tips.append(f"fp32 (trainer.precision: 32-true) instead of {precision}")
    else:
        tips.append("a longer warmup (model.lr_scheduler)")
    return (f"training diverged at step {step}: {what}; stopped before applying it{last}. "
            f"Try {', '.join(tips[:-1])} or {tips[-1]}")
