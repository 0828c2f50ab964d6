"""Depth routers: which tokens take which recursion step.

A router is built by a factory `Callable[[ModelConfig], nn.Module]` (YAML
`class_path`), and the model calls `router.step(r, h, run, positions, records)` for
each recursion step r. `run(x, positions)` applies the shared block to the given
hidden states. Every router appends a `RouterRecord` of what it decided, so the
model never logs and keeps no global state: the Lightning module and the
telemetry callbacks read the records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from haipai_lightning.config import ModelConfig

# run(h_selected (B, T', D), positions (B, T') or (T',)) -> new hidden states (B, T', D)
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RouterRecord:
    """What one routing component decided in one forward pass."""

    name: str  # e.g. "depth/step0", "mlp/layer3"
    kind: str  # "depth_full", "depth_expert_choice", "moe_token_choice", ...
    scores: torch.Tensor | None = None  # router outputs (B, T[, E])
    selected: torch.Tensor | None = None  # bool (B, T) or int ids of the choice
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted terms
    aux_weights: dict[str, float] = field(default_factory=dict)  # weight of each term in the loss


class FullRecursion(nn.Module):
    """Every token runs every recursion step: the recursive-Transformer baseline (no routing)."""

    def __init__(self, cfg: ModelConfig) -> None:
        """Args:
            cfg: the model configuration (given by the model).
        """
        super().__init__()
        self.n_recursions = cfg.n_recursions

    def step(
        self, r: int, h: torch.Tensor, run: StepFn, positions: torch.Tensor, records: list[RouterRecord]
    ) -> torch.Tensor:
        return run(h, positions)
