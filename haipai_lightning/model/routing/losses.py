"""Routing losses and balance measures shared by every router (depth routers, MoE, MoT).

Written once here: the Switch / GShard balancing loss (arXiv 2101.03961, eq. 4), the router
z-loss (ST-MoE, arXiv 2202.08906, eq. 5), MaxVio and the auxiliary-loss-free bias update
(Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3).
"""

from __future__ import annotations

import torch


def balance_loss(load: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e P_e (1 when uniform, E when one choice takes all).

    load (E,): fraction of the assignments each choice received (sums to 1);
    probs (N, E): router probabilities, P_e their mean over tokens.
    """
    return load.numel() * (load * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2 over the last dim; keeps router logits small.
    A single-logit router (sigmoid gate) passes logits[..., None]: the loss is the mean logit^2."""
    return (torch.logsumexp(logits, -1) ** 2).mean()


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio: (max_e load_e - mean load) / mean load (0 = perfectly balanced)."""
    return (load.max() - load.mean()) / load.mean().clamp(min=1e-12)


@torch.no_grad()
def loss_free_bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """Raise the selection bias of under-loaded choices, lower it for over-loaded ones (in place)."""
    bias += rate * torch.sign(load.mean() - load)
