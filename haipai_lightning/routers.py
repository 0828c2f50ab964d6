"""Depth routers: which tokens take which recursion step (Mixture-of-Recursions).

A router is built by a factory `Callable[[ModelConfig], nn.Module]` (YAML `class_path`).
For each recursion step r the model calls

    h = router.step(r, h, run, state, records)

where `run(x, sel)` applies the shared block to the gathered tokens `x` (B, k, D) of the
`Selection` sel, and `state` is a dict that lives for one forward pass (the previous
step's selection, the token-choice depths). Every router appends a `RouterRecord`, so the
model never logs and keeps no global state: the Lightning module and telemetry read them.

Routers:
    FullRecursion        every token runs every step (the recursive-Transformer baseline)
    ExpertChoiceRouter   each step keeps the top-k of the tokens still active (hierarchical)
    TokenChoiceRouter    each token picks its depth once, before the first step
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.recursion import Selection, select_mask, select_topk

RunFn = Callable[[torch.Tensor, Selection], torch.Tensor]  # (x (B, k, D), sel) -> block(x) (B, k, D)


@dataclass
class RouterRecord:
    """What one routing component decided in one forward pass."""

    name: str  # e.g. "depth/step0", "mod/layer1"
    kind: str  # "depth_expert_choice", "depth_token_choice", "mod", ...
    scores: torch.Tensor | None = None  # router probabilities (B, T) or (B, T, E), detached
    selected: torch.Tensor | None = None  # bool (B, T): took part; or int (B, T) choice ids
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted terms
    aux_weights: dict[str, float] = field(default_factory=dict)  # weight of each term in the loss
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. sampling accuracy, capacity


class FullRecursion(nn.Module):
    """Every token runs every recursion step: the recursive-Transformer baseline (no routing)."""

    def __init__(self, cfg: ModelConfig) -> None:
        """Args:
            cfg: the model configuration (given by the model).
        """
        super().__init__()
        self.n_recursions = cfg.n_recursions

    def step(self, r: int, h: torch.Tensor, run: RunFn, state: dict, records: list[RouterRecord]) -> torch.Tensor:
        return run(h, Selection.full(h.size(1)))


def capacity_k(capacity: float, n: int) -> int:
    """Tokens kept out of n at a capacity factor (at least one)."""
    return max(1, min(n, math.floor(capacity * n + 1e-6)))


def bce_targets(scores_shape: torch.Size, chosen: Selection, device: torch.device) -> torch.Tensor:
    return chosen.mask(scores_shape[0], device).float()


class TopKGate(nn.Module):
    """Expert-choice gate shared by MoR steps and Mixture-of-Depths blocks.

    A linear router (no bias) scores tokens; in training the top-k by score are taken
    (k = capacity x candidates; non-causal: it looks at the whole sequence). An auxiliary
    BCE loss teaches sigmoid(logit) > 0.5 to predict membership of that top-k, so that at
    inference the same decision is made causally, token by token, by the threshold.
    """

    def __init__(self, d_model: int, aux_router: bool = False) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, 1, bias=False)
        nn.init.normal_(self.router.weight, 0.0, 0.02)
        # optional separate predictor on detached inputs (MoR's "auxiliary router"): it learns the
        # top-k decision without pulling on the representation
        self.aux = nn.Linear(d_model, 1, bias=False) if aux_router else None

    def decide(
        self, x: torch.Tensor, cand: Selection, k: int, use_threshold: bool, threshold: float = 0.5
    ) -> tuple[Selection, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """x (B, n, D) candidates -> (local selection among them, logits (B, n), aux losses, metrics)."""
        logits = self.router(x).squeeze(-1)  # (B, n)
        valid = cand.valid if cand.valid is not None else torch.ones_like(logits, dtype=torch.bool)
        pred_logits = self.aux(x.detach()).squeeze(-1) if self.aux is not None else logits
        topk = select_topk(logits.masked_fill(~valid, float("-inf")), k, logits.size(1))
        target = topk.mask(logits.size(0), logits.device) & valid
        aux, metrics = {}, {}
        if self.training:
            aux["bce"] = F.binary_cross_entropy_with_logits(pred_logits[valid], target[valid].float())
        thresh = (torch.sigmoid(pred_logits) > threshold) & valid
        # agreement of causal threshold routing with top-k routing over the candidates
        metrics["sampling_acc"] = ((thresh == target) | ~valid).float().sum() / valid.sum().clamp(min=1)
        if use_threshold:
            return select_mask(thresh), logits, aux, metrics
        return topk, logits, aux, metrics


class ExpertChoiceRouter(nn.Module):
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
        """
        super().__init__()
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
        self.gates = nn.ModuleList(TopKGate(cfg.d_model, aux_router) for _ in range(nr))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))  # for the warm-up; resumes

    def capacity(self, r: int) -> float:
        c = self.capacities[r]
        if self.capacity_warmup_steps > 0:
            t = min(1.0, float(self.steps_seen) / self.capacity_warmup_steps)
            c = c + (1.0 - c) * 0.5 * (1 + math.cos(math.pi * t))  # cosine from 1 down to the target
        return c

    def step(self, r: int, h: torch.Tensor, run: RunFn, state: dict, records: list[RouterRecord]) -> torch.Tensor:
        B, T, _ = h.shape
        if r == 0 and self.training:
            self.steps_seen += 1
        cand: Selection = state.get("ec_sel", Selection.full(T))  # tokens active after step r-1
        x_cand = cand.gather(h)  # (B, n, D)
        n_active = T if cand.is_full else int(cand.count().max())
        k = min(capacity_k(self.capacity(r), T), n_active)
        # capacity 1 keeps every candidate in training, so inference keeps them all too (no guess)
        use_thr = not self.training and self.inference == "threshold" and self.capacity(r) < 1
        local, logits, aux, metrics = self.gates[r].decide(x_cand, cand, k, use_thr)
        if self.capacity(r) >= 1:
            metrics.pop("sampling_acc")  # nothing is routed at this step
        sel = cand.sub(local)
        state["ec_sel"] = sel
        x = local.gather(x_cand)  # (B, k, D) the chosen tokens, in causal order
        logit_sel = local.gather(logits[..., None])  # (B, k, 1)
        out = run(x, sel) if x.size(1) else x
        new = x + (self.alpha * torch.sigmoid(logit_sel) * out if self.gating == "weighted" else out)
        h = sel.scatter(h, new)
        if self.z_loss_weight > 0 and self.training:
            aux["z_loss"] = (logits**2).mean()  # logsumexp over one logit = the logit
        weights = {"bce": self.aux_loss_weight, "z_loss": self.z_loss_weight}
        metrics["capacity"] = torch.tensor(self.capacity(r))
        scores = torch.zeros(B, T, device=h.device)
        if not cand.is_full:
            scores = cand.scatter(scores[..., None], torch.sigmoid(logits.detach())[..., None]).squeeze(-1)
        else:
            scores = torch.sigmoid(logits.detach())
        records.append(RouterRecord(f"depth/step{r}", "depth_expert_choice", scores, sel.mask(B, h.device),
                                    aux, weights, metrics))
        return h


class TokenChoiceRouter(nn.Module):
    """MoR token-choice routing: an MLP router assigns each token a depth i in 1..Nr before the
    first step (softmax over Nr depths, top-1); the token then runs recursions 1..i.

    The selected tokens' update is weighted by the probability of the chosen depth,
    h + p * (f(h) - h) ("weighted", the MoE convention that lets gradients reach the router),
    or taken as is, f(h) ("plain"). Load balance across depths by an auxiliary loss
    (Switch-style sum f_i P_i) plus a router z-loss, or loss-free by a bias on the logits
    that is nudged after every training step (DeepSeek-V3 style).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        hidden: int | None = None,
        gating: Literal["weighted", "plain"] = "weighted",
        balance_loss_weight: float = 0.1,
        z_loss_weight: float = 1e-5,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        balance_warmup_steps: int = 0,
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            hidden: hidden size of the MLP router (None = d_model).
            gating: "weighted" (h + p*(f(h)-h)) or "plain" (f(h)).
            balance_loss_weight: weight of the load-balancing loss (0 with bias_balancing).
            z_loss_weight: weight of the router z-loss.
            bias_balancing: loss-free balancing with a per-depth bias updated by the observed load.
            bias_update_rate: step size of that bias.
            balance_warmup_steps: ramp the balancing loss weight from 0 over this many training steps.
        """
        super().__init__()
        if gating not in ("weighted", "plain"):
            raise ConfigError(f"model.router.init_args.gating={gating!r}: use 'weighted' or 'plain'")
        self.nr = cfg.n_recursions
        hid = hidden or cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hid, bias=False), nn.GELU(), nn.Linear(hid, self.nr, bias=False))
        self.gating, self.balance_loss_weight, self.z_loss_weight = gating, balance_loss_weight, z_loss_weight
        self.bias_balancing, self.bias_update_rate = bias_balancing, bias_update_rate
        self.balance_warmup_steps = balance_warmup_steps
        self.register_buffer("bias", torch.zeros(self.nr))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, T, D) -> depth index (B, T) in 0..Nr-1, gate prob (B, T), logits (B, T, Nr). Causal: per token."""
        logits = self.mlp(h).float()
        probs = logits.softmax(-1)
        depth = (probs + self.bias).argmax(-1) if self.bias_balancing else probs.argmax(-1)
        return depth, probs.gather(-1, depth[..., None]).squeeze(-1), logits

    def step(self, r: int, h: torch.Tensor, run: RunFn, state: dict, records: list[RouterRecord]) -> torch.Tensor:
        B, T, _ = h.shape
        if r == 0:
            depth, gate, logits = self.route(h)
            state.update(tc_depth=depth, tc_gate=gate)
            self._record(depth, logits, records)
        depth, gate = state["tc_depth"], state["tc_gate"]
        sel = select_mask(depth >= r)  # tokens whose depth reaches step r
        if sel.idx is not None and sel.idx.size(1) == 0:
            return h
        x = sel.gather(h)
        out = run(x, sel)
        if self.gating == "weighted":
            g = sel.gather(gate[..., None]).to(x.dtype)
            out = x + g * (out - x)
        return sel.scatter(h, out)

    def _record(self, depth: torch.Tensor, logits: torch.Tensor, records: list[RouterRecord]) -> None:
        probs = logits.softmax(-1)
        load = F.one_hot(depth, self.nr).float().flatten(0, 1).mean(0)  # (Nr,) fraction per depth
        aux: dict[str, torch.Tensor] = {}
        weight = self.balance_loss_weight
        if self.training:
            self.steps_seen += 1
            if self.balance_warmup_steps > 0:
                weight *= min(1.0, float(self.steps_seen) / self.balance_warmup_steps)
            if not self.bias_balancing:
                aux["balance"] = self.nr * (load * probs.flatten(0, 1).mean(0)).sum()
            aux["z_loss"] = (torch.logsumexp(logits, -1) ** 2).mean()
            if self.bias_balancing:  # loss-free: raise the bias of under-loaded depths
                with torch.no_grad():
                    self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        metrics = {"max_vio": (load.max() - load.mean()) / load.mean(), "mean_depth": depth.float().mean() + 1}
        records.append(RouterRecord("depth/token_choice", "depth_token_choice", probs.detach(), depth + 1, aux,
                                    {"balance": weight, "z_loss": self.z_loss_weight}, metrics))
