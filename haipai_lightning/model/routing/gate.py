"""TopKGate: the expert-choice gate shared by MoR recursion steps and Mixture-of-Depths layers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.model.routing.selection import Selection, select_mask, select_topk, select_topk_rows


def capacity_k(capacity: float, n: int) -> int:
    """Tokens kept out of n at a capacity factor (at least one)."""
    return max(1, min(n, math.floor(capacity * n + 1e-6)))


def capacity_k_rows(capacity: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Per-row capacity_k: capacity (B,) of n (int or (B,)) -> (B,) long, at least one, at most n."""
    n_t = torch.as_tensor(n, device=capacity.device)
    return torch.minimum(torch.floor(capacity * n_t + 1e-6).long().clamp(min=1), n_t.long().expand_as(capacity))


class TopKGate(nn.Module):
    """A linear router (no bias) scores tokens; in training the top-k by score are taken
    (k = capacity x candidates; non-causal: it looks at the whole sequence). An auxiliary
    BCE loss teaches sigmoid(logit) > 0.5 to predict membership of that top-k, so that at
    inference the same decision is made causally, token by token, by the threshold
    (MoR paper, arXiv 2507.10524, section 2.2.1; MoD, arXiv 2404.02258, section 3.5).
    """

    def __init__(self, d_model: int, aux_router: bool = False, budget: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, 1, bias=False)
        nn.init.normal_(self.router.weight, 0.0, 0.02)
        # optional separate predictor on detached inputs (MoR's "auxiliary router"): it learns the
        # top-k decision without pulling on the representation
        self.aux = nn.Linear(d_model, 1, bias=False) if aux_router else None
        # budget-aware routing (model/budget.py): the causal threshold moves with the sequence's compute
        # scale s by softplus(slope) * log(s), >= 0 per doubling, so a larger budget never raises the bar;
        # the BCE teaches the slope the top-k decision at each budget. Only when asked: older checkpoints
        # hold no such parameter.
        self.budget_slope = nn.Parameter(torch.full((), 0.5413)) if budget else None  # softplus -> 1.0

    def stream_readers(self) -> list[nn.Linear]:
        """The linears that read the residual stream (rotations fuse into them)."""
        return [self.router] + ([self.aux] if self.aux is not None else [])

    def threshold_logit(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (...,) the logit whose sigmoid > 0.5 decides causally at inference."""
        return (self.aux or self.router)(x).squeeze(-1)

    def decide(
        self, x: torch.Tensor, cand: Selection, k: int | torch.Tensor, use_threshold: bool, threshold: float = 0.5,
        scale: torch.Tensor | None = None,
    ) -> tuple[Selection, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """x (B, n, D) candidates -> (local selection among them, logits (B, n), aux losses, metrics).
        k: tokens kept per row, one int or (B,) per row (a per-sequence budget); scale (B, n): the
        candidates' compute scale, which shifts the logits by softplus(budget_slope) * log(scale)."""
        logits = self.router(x).squeeze(-1)  # (B, n)
        shift = 0.0
        if scale is not None and self.budget_slope is not None:
            shift = F.softplus(self.budget_slope) * scale.to(logits.dtype).log()
            logits = logits + shift
        valid = cand.valid if cand.valid is not None else torch.ones_like(logits, dtype=torch.bool)
        pred_logits = self.aux(x.detach()).squeeze(-1) + shift if self.aux is not None else logits
        masked = logits.masked_fill(~valid, float("-inf"))
        topk = (select_topk(masked, k, logits.size(1)) if isinstance(k, int)
                else select_topk_rows(masked, k, logits.size(1)))
        target = topk.mask(logits.size(0), logits.device) & valid
        aux, metrics = {}, {}
        if self.training:
            aux["bce"] = F.binary_cross_entropy_with_logits(pred_logits[valid], target[valid].float())
        thresh = (torch.sigmoid(pred_logits) > threshold) & valid
        # agreement of causal threshold routing with top-k routing over the candidates
        metrics["sampling_acc"] = ((thresh == target) & valid).float().sum() / valid.sum().clamp(min=1)
        if use_threshold:
            return select_mask(thresh), logits, aux, metrics
        return topk, logits, aux, metrics
