"""Shared test helpers (imported as `from helpers import ...`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def train_fixed_batch(model: torch.nn.Module, x: torch.Tensor, steps: int, lr: float = 3e-3, aux: bool = True,
                      after_first_backward: Callable[[], None] | None = None) -> list[float]:
    """AdamW steps on one batch x (B, T + 1): next-token loss (+ the model's aux losses when `aux`).

    Returns the LM loss of every step; `after_first_backward` can inspect the first gradients.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        out = model(x[:, :-1])
        lm = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        (lm + sum(out.aux_losses.values()) if aux else lm).backward()
        if i == 0 and after_first_backward is not None:
            after_first_backward()
        opt.step()
        losses.append(lm.item())
    return losses
