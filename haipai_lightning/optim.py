"""Optimizer parameter groups and the trapezoid (warmup-stable-decay) LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Decay matrices; never decay norms, biases and embeddings (nanoGPT / Llama practice).

    The decay group keeps the optimizer's own `weight_decay` unless one is given here.
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied / shared weights appear once
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    group = {"params": decay, "name": "decay"}
    if weight_decay is not None:
        group["weight_decay"] = weight_decay
    return [group, {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


class TrapezoidLR(LRScheduler):
    """Linear warmup -> constant -> decay to `min_lr_ratio` over the last `decay_fraction` of training.

    The MoR paper trains with this schedule ("trapezoid", a.k.a. warmup-stable-decay);
    its stable phase lets a run be extended from a checkpoint without re-warming.
    `total_steps=None` is filled in by the Lightning module from the trainer's
    estimated stepping batches.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        decay_fraction: float = 0.2,
        min_lr_ratio: float = 0.1,
        decay_shape: str = "cosine",
        last_epoch: int = -1,
    ) -> None:
        """Args:
            optimizer: given by the module.
            warmup_steps: linear warmup length in optimizer steps.
            total_steps: schedule length (None = the trainer's estimated stepping batches).
            decay_fraction: share of total_steps spent decaying at the end (0 = no decay).
            min_lr_ratio: final LR as a fraction of the peak LR.
            decay_shape: "cosine" or "linear" decay.
        """
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"lr_scheduler.decay_fraction={decay_fraction} must be in [0, 1]")
        if decay_shape not in ("cosine", "linear"):
            raise ValueError(f"lr_scheduler.decay_shape={decay_shape!r}: use 'cosine' or 'linear'")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.decay_fraction, self.min_lr_ratio, self.decay_shape = decay_fraction, min_lr_ratio, decay_shape
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        total = self.total_steps or step + 1
        decay_start = total - int(self.decay_fraction * total)
        if step < decay_start or total == decay_start:
            return 1.0
        t = min(1.0, (step - decay_start) / (total - decay_start))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.decay_shape == "cosine" else 1 - t
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]
