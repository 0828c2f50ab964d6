"""Optimizer parameter groups and the trapezoid (warmup-stable-decay) LR schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


def param_groups(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Decay matrices; never decay norms, biases, embeddings or parameters flagged `_no_weight_decay`.

    Groups (empty ones are left out), each named so optimizers can pick theirs:
      "matrix"    2-D weights of the nn.Linear layers inside every block's mixer and MLP
                  (attention and MLP projections, Mamba's projections; shared recursion
                  blocks included, once): what GaLore / Q-GaLore project to low rank.
      "decay"     other decayed parameters (routers, gates, an untied head, stacked experts).
      "no_decay"  norms, biases, embeddings, and `p._no_weight_decay = True` (Mamba's A_log,
                  as mamba-ssm marks it), weight_decay 0.
    The decayed groups keep the optimizer's own `weight_decay` unless one is given here.
    """
    # the Linear weights of mixers / MLPs of the unique layers: the low-rank projection targets
    block = re.compile(r"(^|\.)layers\.\d+\.(mixer|mlp)\.")
    # routing layers inside an MLP (MoE router, MoT controller, top-p predictor) are gates, not projections
    gate = re.compile(r"\.(router|controller|predictor)$")
    matrix_ids = {id(m.weight) for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and block.search(n + ".") and not gate.search(n) and m.weight.ndim == 2}
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied / shared weights appear once
            continue
        seen.add(id(p))
        if p.ndim < 2 or "embed" in name or getattr(p, "_no_weight_decay", False):
            groups["no_decay"].append(p)
        else:
            groups["matrix" if id(p) in matrix_ids else "decay"].append(p)
    out = []
    for key, params in groups.items():
        if not params:
            continue
        group: dict = {"params": params, "name": key}
        if key == "no_decay":
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        out.append(group)
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state: every tensor in `optimizer.state`, counted once.

    Tensors inside objects a state may hold (galore-torch keeps a `GaLoreProjector` with its
    `ortho_matrix`) are counted too. Parameters and gradients are not state.
    """
    seen: set[int] = set()
    total = 0

    def visit(v) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            if id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif hasattr(v, "ortho_matrix"):  # galore_torch.galore_projector.GaLoreProjector
            visit(v.ortho_matrix)

    for state in optimizer.state.values():
        visit(state)
    return total


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
