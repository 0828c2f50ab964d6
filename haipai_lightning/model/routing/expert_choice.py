"""MoR expert-choice routing (arXiv 2507.10524, section 2.2.1): at step r keep the top-k_r of the
tokens still active (hierarchical), with an auxiliary BCE loss so that a causal 0.5 threshold
makes the same decision at inference."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.routing.base import Router, RunFn
from haipai_lightning.model.routing.gate import TopKGate, capacity_k, capacity_k_rows
from haipai_lightning.model.routing.losses import z_loss
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.model.routing.selection import Selection, spaced_mask


class ExpertChoiceRouter(Router):
    """MoR expert-choice routing: at step r keep the top-k_r of the tokens active at step r-1.

    Output of a selected token: h + g * f(h) with g = alpha * sigmoid(router logit)
    ("weighted", as the MoR reference code) or h + f(h) ("additive"); unselected tokens
    keep h. f is the shared block (its layers include their residual connections).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        capacities: Sequence[float] | None = None,
        alpha: float = 0.1,
        gating: Literal["weighted", "additive"] = "weighted",
        aux_loss_weight: float = 0.001,
        aux_router: bool = False,
        capacity_warmup_steps: int = 0,
        z_loss_weight: float = 0.0,
        inference: Literal["threshold", "topk"] = "threshold",
        budget: dict | None = None,
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            capacities: fraction of the sequence kept at each step (None = (Nr - r) / Nr: 1, 2/3, 1/3 for Nr=3).
            alpha: scale of the sigmoid gate in the weighted output.
            gating: "weighted" (h + alpha*sigmoid(logit)*f(h)) or "additive" (h + f(h)).
            aux_loss_weight: weight of the BCE loss that makes the 0.5 threshold mimic top-k.
            aux_router: learn the threshold decision with a separate router on detached inputs.
            capacity_warmup_steps: anneal capacities from 1 to their targets over this many training steps.
            z_loss_weight: router z-loss weight (0 = off).
            inference: routing outside training: "threshold" (causal) or "topk" (looks ahead; for analysis).
            budget: a budget head (model/budget.py BudgetHead arguments, e.g. {prefix_len: 16, target: 2.0}):
                per-sequence compute scales the capacities below 1; the budget unit is the mean recursion depth.
        """
        super().__init__(cfg)
        nr = cfg.n_recursions
        caps = list(capacities) if capacities is not None else [(nr - r) / nr for r in range(nr)]
        if len(caps) != nr or any(not 0 < c <= 1 for c in caps) or any(b > a for a, b in zip(caps, caps[1:])):
            raise ConfigError(
                f"model.router.init_args.capacities={caps} must hold n_recursions={nr} non-increasing "
                "values in (0, 1] (hierarchical routing)"
            )
        if gating not in ("weighted", "additive"):
            raise ConfigError(f"model.router.init_args.gating={gating!r}: use 'weighted' or 'additive'")
        if inference not in ("threshold", "topk"):
            raise ConfigError(f"model.router.init_args.inference={inference!r}: use 'threshold' or 'topk'")
        self.capacities, self.alpha, self.gating = caps, alpha, gating
        self.aux_loss_weight, self.z_loss_weight = aux_loss_weight, z_loss_weight
        self.capacity_warmup_steps, self.inference = capacity_warmup_steps, inference
        self.budget_head = self._budget_head(cfg, budget)
        self.gates = nn.ModuleList(TopKGate(cfg.d_model, aux_router, budget is not None) for _ in range(nr))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # for the warm-up; resumes

    def capacity(self, r: int) -> float:
        c = self.capacities[r]
        if self.capacity_warmup_steps > 0:
            t = min(1.0, float(self.steps_seen) / self.capacity_warmup_steps)
            c = c + (1.0 - c) * 0.5 * (1 + math.cos(math.pi * t))  # cosine from 1 down to the target
        return c

    def step(self, r: int, h: torch.Tensor, run: RunFn, state: dict, records: list[RouterRecord]) -> torch.Tensor:
        """Test-time depth (r >= Nr): an extra step is routed like the last trained step, by its gate and
        capacity among the tokens still active, so a token recurses on only while that gate keeps choosing
        it (hierarchical: the extra compute goes to the deepest tokens; top-k in training mode)."""
        B, T, _ = h.shape
        if r == 0 and self.training:
            self.steps_seen += 1
        g = min(r, self.n_recursions - 1)  # the gate / capacity of this step
        cap = self.capacity(g)
        cand: Selection = state.get("ec_sel", Selection.full(T))  # tokens active after step r-1
        x_cand = cand.gather(h)  # (B, n, D)
        n_active = T if cand.is_full else int(cand.count().max())
        k: int | torch.Tensor = min(capacity_k(cap, T), n_active)
        scale = state.get("budget_scale")  # (B, T) per-token compute scale (model/budget.py) or None
        cand_scale = None
        if scale is not None and cap < 1:  # a per-sequence budget scales the capacity of this row
            row_k = capacity_k_rows((cap * scale[:, -1]).clamp(max=1.0), T)
            k = torch.minimum(row_k, cand.count() if not cand.is_full else torch.full_like(row_k, T))
            cand_scale = cand.gather(scale[..., None]).squeeze(-1)  # (B, n)
        # capacity 1 keeps every candidate in training, so inference keeps them all too (no guess)
        use_thr = not self.training and self.inference == "threshold" and cap < 1
        local, logits, aux, metrics = self.gates[g].decide(x_cand, cand, k, use_thr, scale=cand_scale)
        if cap >= 1:
            metrics.pop("sampling_acc")  # nothing is routed at this step
        sel = cand.sub(local)
        state["ec_sel"] = sel
        x = local.gather(x_cand)  # (B, k, D) the chosen tokens, in causal order
        logit_sel = local.gather(logits[..., None])  # (B, k, 1)
        out = run(x, sel) if x.size(1) else x
        new = x + (self.alpha * torch.sigmoid(logit_sel) * out if self.gating == "weighted" else out)
        h = sel.scatter(h, new)
        if self.z_loss_weight > 0 and self.training:
            aux["z_loss"] = z_loss(logits[..., None])  # logsumexp over one logit = the logit
        weights = {"bce": self.aux_loss_weight, "z_loss": self.z_loss_weight}
        metrics["capacity"] = torch.tensor(cap)
        scores = torch.zeros(B, T, device=h.device)
        if not cand.is_full:
            scores = cand.scatter(scores[..., None], torch.sigmoid(logits.detach())[..., None]).squeeze(-1)
        else:
            scores = torch.sigmoid(logits.detach())
        records.append(RouterRecord("depth", "expert_choice", scores, sel.mask(B, h.device), aux, weights, metrics,
                                    step=r))
        return h

    def budget_compute(self, scale: torch.Tensor) -> torch.Tensor:
        """Nominal mean recursion depth at compute scale s (B,): steps below capacity 1 keep min(1, s * c_r)."""
        return sum((torch.ones_like(scale) if c >= 1 else (c * scale).clamp(max=1.0)) for c in self.capacities)

    def every_token_at_first_step(self) -> bool:
        return self.capacities[0] >= 1

    # causal decoding: a token continues to step r when sigmoid(gate_r) > 0.5 (the BCE-trained threshold)
    def decode_continues(self, r: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        go = r < self.n_recursions
        for step in r[go].unique().tolist():
            if self.capacity(step) >= 1:
                continue  # capacity 1: every token runs this step
            at = r == step
            go[at] = torch.sigmoid(self.gates[step].threshold_logit(h[at]).reshape(-1)) > 0.5
        return go

    def decode_combine(self, r: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
                       state: torch.Tensor | None) -> torch.Tensor:
        if self.gating != "weighted":
            return h + out
        logit = torch.empty(h.size(0), 1, 1, device=h.device, dtype=h.dtype)
        for step in r.unique().tolist():  # one router per step
            at = r == step
            logit[at] = self.gates[step].router(h[at])
        return h + self.alpha * torch.sigmoid(logit) * out

    def nominal_records(self, B: int, T: int) -> list[RouterRecord]:
        """Each step keeps its capacity's top-k (which tokens does not change a count: evenly spaced)."""
        out, prev = [], T
        for r in range(self.n_recursions):
            prev = min(capacity_k(self.capacity(r), T), prev)
            out.append(RouterRecord("depth", "expert_choice", selected=spaced_mask(B, T, prev), step=r))
        return out

    def stream_readers(self) -> list[nn.Linear]:
        head = [self.budget_head.net[0]] if self.budget_head is not None else []
        return [lin for g in self.gates for lin in g.stream_readers()] + head
