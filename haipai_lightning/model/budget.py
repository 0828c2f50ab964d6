"""A budget head: how much compute a sequence gets, set from its prefix (SelfBudgeter, arXiv 2505.11274).

SelfBudgeter has a model predict, before answering, the budget a query deserves and then honour it.
Here the "budget" is a per-sequence *compute scale* s > 0 applied to the trained routing capacities:

    expert-choice MoR step r keeps  min(1, s * capacity_r)  of the sequence   (step 0 stays at 1 if it is 1)
    a Mixture-of-Depths layer keeps  min(1, s * mod_capacity)

so s = 1 is the routing the model was trained with, and the compute it buys is monotone in s. The
user speaks in the router's unit (`Router.budget_compute`: mean recursion depth for expert-choice MoR,
MoD capacity for a model routed only by MoD) and `scale_for` inverts it by bisection.

The head reads the prelude's hidden states of the first `prefix_len` tokens (detached: it must not
shape the representation) and predicts a per-sequence loss-vs-compute curve

    loss(s) ~= a + c / s          (c >= 0; diminishing returns of compute, a power law of exponent 1)

fitted by least squares to the loss each training sequence reached at a budget s drawn at random
(log-uniform in [s_min, s_max]: the routers learn to route at every budget). The budget it chooses
minimises the predicted loss plus a price lambda on compute, s* = sqrt(c / lambda), and lambda is a
dual variable moved after every training step so that the mean chosen compute meets `target`
(a Lagrangian trade of loss against compute toward the target).

Causality: with the head choosing, tokens before position prefix_len route at the reference s = 1
and later tokens at s*, which depends only on tokens < prefix_len. A decoding cache accumulates the
prefix (`KVCache.routing_state`), so cached decoding gives the full forward's logits. A budget
given by the caller (`HaipaiModel.forward(budget=...)`) applies to every token.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError
from haipai_lightning.model.routing.record import RouterRecord


class BudgetHead(nn.Module):
    def __init__(self, d_model: int, prefix_len: int = 16, target: float | None = None, hidden: int = 64,
                 s_min: float = 0.25, s_max: float = 4.0, fit_weight: float = 1.0, dual_rate: float = 0.05) -> None:
        """Args:
            d_model: width of the residual stream (given by the router).
            prefix_len: tokens the head reads; earlier tokens route at the reference budget.
            target: mean compute the head's choices should meet, in the router's unit (None: s = 1's compute).
            hidden: hidden size of the head's MLP.
            s_min, s_max: range of the compute scale (sampled in training, clamped at inference).
            fit_weight: weight of the loss-curve fit.
            dual_rate: step of the compute price's log per training step.
        """
        super().__init__()
        if prefix_len < 1 or not 0 < s_min < 1 <= s_max or hidden < 1:
            raise ConfigError(f"model.router.init_args.budget: prefix_len={prefix_len} must be >= 1, hidden={hidden} "
                              f">= 1 and 0 < s_min={s_min} < 1 <= s_max={s_max}")
        self.prefix_len, self.target, self.s_min, self.s_max = prefix_len, target, s_min, s_max
        self.fit_weight, self.dual_rate = fit_weight, dual_rate
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self.register_buffer("log_price", torch.zeros(()))  # log lambda, the dual variable (resumes)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (a, c, s) of the last training forward

    def curve(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled (B, D) mean prefix state -> (a, c) (B,) of loss(s) = a + c / s."""
        out = self.net(pooled.detach().float())
        return out[:, 0], F.softplus(out[:, 1])

    def choose(self, c: torch.Tensor) -> torch.Tensor:
        """argmin_s a + c/s + lambda s = sqrt(c / lambda), clamped to [s_min, s_max]; (B,)."""
        return (c / self.log_price.exp()).sqrt().clamp(self.s_min, self.s_max)

    def sample(self, B: int, device: torch.device) -> torch.Tensor:
        """Training budgets (B,), log-uniform in [s_min, s_max]."""
        lo, hi = math.log(self.s_min), math.log(self.s_max)
        return torch.exp(lo + (hi - lo) * torch.rand(B, device=device))

    def fit_loss(self, seq_loss: torch.Tensor) -> torch.Tensor | None:
        """Least-squares fit of the last training forward's curve to its per-sequence LM losses (B,)."""
        if self._last is None:
            return None
        a, c, s = self._last
        self._last = None
        return self.fit_weight * F.mse_loss(a + c / s, seq_loss.detach().float())

    @torch.no_grad()
    def update_price(self, chosen_compute: torch.Tensor, target: float) -> None:
        """Dual ascent: compute above the target raises its price (and lowers the next choices)."""
        self.log_price += self.dual_rate * float(chosen_compute.mean() - target)


def scale_for(compute_fn: Callable[[torch.Tensor], torch.Tensor], compute: torch.Tensor, lo: float = 1e-3,
              hi: float = 64.0, iters: int = 40) -> torch.Tensor:
    """The scale s (B,) with compute_fn(s) == compute (B,), by bisection (compute_fn is non-decreasing);
    a compute beyond the reachable range gives the nearest end."""
    lo_t, hi_t = torch.full_like(compute, lo), torch.full_like(compute, hi)
    for _ in range(iters):
        mid = (lo_t + hi_t) / 2
        below = compute_fn(mid) < compute
        lo_t, hi_t = torch.where(below, mid, lo_t), torch.where(below, hi_t, mid)
    return hi_t


def per_token_scale(head: BudgetHead, h: torch.Tensor, positions: torch.Tensor, cache: object | None) -> torch.Tensor:
    """Inference with the head choosing: h (B, T, D) after the prelude -> scale (B, T): 1 before
    prefix_len, the head's choice from tokens < prefix_len after it. A cache keeps the prefix's running
    sum across decoding calls (`routing_state`), so cached and full forwards agree."""
    B, T, _ = h.shape
    pos = positions if positions.dim() == 2 else positions[None].expand(B, T)  # (B, T)
    st = getattr(cache, "routing_state", None)
    if cache is not None and st is None:  # a cache without routing memory (the engine): the reference budget
        return h.new_ones(B, T)
    if st is not None and "budget_sum" in st:
        total, count = st["budget_sum"], st["budget_n"]
    else:
        total, count = h.new_zeros(B, h.size(-1)), h.new_zeros(B)
    inside = (pos < head.prefix_len).to(h.dtype)  # (B, T)
    total = total + (h * inside[..., None]).sum(1)
    count = count + inside.sum(1)
    if st is not None:
        st["budget_sum"], st["budget_n"] = total, count
    _, c = head.curve(total / count.clamp(min=1)[:, None])
    chosen = head.choose(c)  # (B,) valid once the prefix is complete
    return torch.where(pos >= head.prefix_len, chosen[:, None], torch.ones_like(chosen)[:, None])


def budget_scale(router: nn.Module, h: torch.Tensor, positions: torch.Tensor, cache: object | None,
                 budget: torch.Tensor | float | None, training: bool) -> torch.Tensor | None:
    """The forward's per-token compute scale (B, T), or None (no budget, no head): a caller's budget
    (B,) or scalar in the router's unit, else the head's (sampled in training, chosen at inference)."""
    B, T, _ = h.shape
    head = getattr(router, "budget_head", None)
    if budget is not None:
        want = torch.as_tensor(budget, dtype=torch.float32, device=h.device).expand(B)
        return scale_for(router.budget_compute, want)[:, None].expand(B, T)
    if head is None:
        return None
    if not training:
        return per_token_scale(head, h, positions, cache)
    s = head.sample(B, h.device)
    a, c = head.curve(h[:, : head.prefix_len].mean(1))
    head._last = (a, c, s)
    target = head.target if head.target is not None else float(router.budget_compute(torch.ones(1)))
    head.update_price(router.budget_compute(head.choose(c.detach())), target)
    return s[:, None].expand(B, T)


def budget_record(router: nn.Module, scale: torch.Tensor, records: list[RouterRecord]) -> RouterRecord:
    """Telemetry: requested compute (from the scale of the sequences' last tokens) vs realised (from the
    routing records), in the router's unit; `budget_error` = |realised - requested| / requested."""
    requested = router.budget_compute(scale[:, -1].float()).mean()
    realised = realised_compute(records)
    if realised is None:
        realised = mod_capacity_realised(records)
    metrics = {"requested": requested.detach()}
    if realised is not None:
        metrics.update(realised=realised.detach(), budget_error=((realised - requested).abs() / requested).detach())
    return RouterRecord("budget", None, metrics=metrics)  # scores: none (a scale is not a probability)


def realised_compute(records: list[RouterRecord]) -> torch.Tensor | None:
    """Mean recursion depth (expert-choice steps run per token) from this forward's depth records, or
    None without per-step depth records."""
    steps = [r.selected for r in records if r.is_depth and r.step is not None and r.selected is not None]
    if not steps:
        return None
    return sum(s.float().mean() for s in steps)


def mod_capacity_realised(records: list[RouterRecord]) -> torch.Tensor | None:
    """Mean fraction of tokens the Mixture-of-Depths layers ran, or None without MoD records."""
    mods = [r.selected.float().mean() for r in records if r.group == "mod" and r.selected is not None]
    return sum(mods) / len(mods) if mods else None
