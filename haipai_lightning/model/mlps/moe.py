"""Mixture-of-Experts MLPs: token-choice top-k, expert-choice, adaptive top-p.

Each is a *routed MLP*: class attribute `routed = True` and

    forward(x (B, T, D), records: list[RouterRecord] | None = None) -> (B, T, D)

appending one `RouterRecord` per call (nothing when records is None):
  name      `moe/layer<i>/<n>` (RouterRecord.name: n = the layer's n-th application in
            this forward pass, the recursion step for a shared layer of a cycle schedule)
  kind      moe_token_choice | moe_expert_choice | moe_top_p
  scores    (B, T, E) router probabilities (softmax over experts), detached
  selected  token-choice: int (B, T, k) chosen expert ids (before capacity drops);
            expert-choice / top-p (variable experts per token): bool (B, T, E)
  aux_losses (unweighted, training only) and aux_weights; metrics: max_vio, mean_experts_per_token,
            expert_rows (rows the experts computed: FLOP counting), and per router its own.

Routing is fp32 (router logits are cast), expert compute in the input dtype. Under MoR
routing the MLP sees the gathered tokens of a step, padded rows included (they are real
compute and compete for capacity like any token).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.mlps.experts import Dispatch, Experts, dispatch, ids_to_mask
from haipai_lightning.model.routing.losses import balance_loss, max_violation, z_loss
from haipai_lightning.model.routing.record import RouterRecord, next_application
from haipai_lightning.model.schedule import make_schedule


class _MoEBase(nn.Module):
    routed = True
    choice: str | None = None  # the record's choice: "token_choice" | "expert_choice" | "top_p"

    def __init__(self, cfg: ModelConfig, n_experts: int, expert_hidden: int | None, dispatch: Dispatch) -> None:
        super().__init__()
        if n_experts < 1:
            raise ConfigError(f"model.mlp.init_args.n_experts={n_experts} must be >= 1")
        if dispatch not in ("auto", "grouped_mm", "loop"):
            raise ConfigError(f"model.mlp.init_args.dispatch={dispatch!r}: use auto, grouped_mm or loop")
        self.n_experts = n_experts
        self.router = nn.Linear(cfg.d_model, n_experts, bias=False)
        # expert_hidden None = cfg.ffn_dim: every expert the size of the dense MLP (Mixtral, upcycling);
        # ffn_dim / top_k gives the dense MLP's active parameters (compute parity)
        self.experts = Experts(cfg, n_experts, expert_hidden or cfg.ffn_dim, dispatch)
        self.layer_index = 0  # set by the Block that holds this MLP (its unique layer id)

    def _record(self, records: list | None, probs: torch.Tensor, selected: torch.Tensor, aux: dict,
                weights: dict, metrics: dict) -> None:
        if records is None:
            return
        records.append(RouterRecord("moe", self.choice, probs.detach(), selected, aux, weights, metrics,
                                    layer=self.layer_index,
                                    application=next_application(records, "moe", self.layer_index)))


class TokenChoiceMoE(_MoEBase):
    """Each token picks its top-k experts (default 2 of 8) by a linear router's softmax.

    out = sum_{e in topk} g_e * expert_e(x), g = the top-k probabilities, renormalised to sum
    to 1 (`renormalize`, Mixtral) or raw (Switch / GShard). Load balance by the Switch loss
    E * sum f_e P_e plus the router z-loss, or loss-free (`bias_balancing`, DeepSeek-V3): a
    per-expert bias, added to the probabilities for the *choice* only, is nudged after every
    training forward towards under-loaded experts. `capacity_factor` C drops, in training, the
    assignments beyond C * N * k / E per expert (first choices before second choices, then in
    token order); None = dropless. Dropping depends on the other tokens of the batch, so
    evaluation always runs dropless (causal, batch-independent).
    """

    choice = "token_choice"

    def __init__(
        self,
        cfg: ModelConfig,
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | None = None,
        renormalize: bool = True,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        bias_balancing: bool = False,
        bias_update_rate: float = 1e-3,
        capacity_factor: float | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            n_experts: number of experts E.
            top_k: experts per token.
            expert_hidden: SwiGLU hidden size of each expert (None = cfg.ffn_dim; ffn_dim/top_k = dense compute).
            renormalize: gates = top-k probabilities divided by their sum.
            balance_loss_weight: weight of the Switch balancing loss (not used with bias_balancing).
            z_loss_weight: weight of the router z-loss.
            bias_balancing: loss-free balancing by a per-expert selection bias.
            bias_update_rate: step of that bias per training forward.
            capacity_factor: per-expert capacity in training, in units of N * k / E (None = dropless).
            dispatch: expert matmuls: auto (grouped_mm where it runs), grouped_mm, or loop.
        """
        super().__init__(cfg, n_experts, expert_hidden, dispatch)
        if not 1 <= top_k <= n_experts:
            raise ConfigError(f"model.mlp.init_args.top_k={top_k} must be in 1..n_experts={n_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ConfigError(f"model.mlp.init_args.capacity_factor={capacity_factor} must be > 0 (or null: dropless)")
        self.top_k, self.renormalize = top_k, renormalize
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.bias_balancing, self.bias_update_rate = bias_balancing, bias_update_rate
        self.capacity_factor = capacity_factor
        self.register_buffer("bias", torch.zeros(n_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> logits (N, E) fp32, probs (N, E), top-k ids (N, k), gates (N, k)."""
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        ids = (probs + self.bias if self.bias_balancing else probs).topk(self.top_k, dim=-1).indices
        gates = probs.gather(-1, ids)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        return logits, probs, ids, gates

    def _drop_over_capacity(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (N, k) -> the same with assignments beyond each expert's capacity set to -1."""
        N, k = ids.shape
        cap = math.ceil(self.capacity_factor * N * k / self.n_experts)
        flat = ids.t().reshape(-1)  # (k N,) slot-major: every token's first choice comes first
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_sorted = torch.arange(flat.numel(), device=ids.device) - starts[flat[order]]  # place within its expert
        rank = torch.empty_like(flat).scatter_(0, order, rank_sorted)
        return flat.masked_fill(rank >= cap, -1).view(k, N).t()

    def forward(self, x: torch.Tensor, records: list[RouterRecord] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        logits, probs, ids, gates = self.route(x.reshape(-1, D))
        kept = self._drop_over_capacity(ids) if self.capacity_factor is not None and self.training else ids
        out, rows = dispatch(self.experts, x.reshape(-1, D), kept, gates)
        load = torch.bincount(ids.flatten(), minlength=self.n_experts).float() / ids.numel()  # (E,)
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            if not self.bias_balancing:
                aux["balance"] = balance_loss(load, probs)
            aux["z_loss"] = z_loss(logits)
            if self.bias_balancing:  # loss-free: raise the bias of under-loaded experts
                with torch.no_grad():
                    self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        metrics = {"max_vio": max_violation(load), "mean_experts_per_token": torch.tensor(rows / max(B * T, 1)),
                   "expert_rows": torch.tensor(float(rows)),
                   "dropped_frac": torch.tensor(1.0 - rows / max(ids.numel(), 1))}
        self._record(records, probs.view(B, T, -1), ids.view(B, T, -1), aux,
                     {"balance": self.balance_loss_weight, "z_loss": self.z_loss_weight}, metrics)
        return out.view(B, T, D)


class ExpertChoiceMoE(_MoEBase):
    """Experts pick tokens (Zhou et al. 2022): each expert takes the top-c tokens of a sequence by
    the token's router probability, c = ceil(capacity_factor * T / E), so every expert is
    exactly balanced and a token gets 0..E experts (capacity_factor on average); the output of
    a token is sum over the experts that chose it of prob * expert(x).

    Causality caveat: the top-c of a sequence depends on its future tokens, so training routing
    is not causal and cannot decode token by token. Outside training the layer routes each token
    on its own, causally: `inference="topk"` takes the token's top-k experts by the same
    probabilities (k = inference_top_k, default round(capacity_factor): the training average);
    `inference="threshold"` trains a predictor (a linear layer on detached inputs, BCE to the
    expert-choice decisions, weight aux_loss_weight) and sends a token to the experts whose
    sigmoid(prediction) > 0.5. Evaluation reports `sampling_acc`, the agreement of the causal
    decisions with what expert choice would have picked on the same batch.
    """

    choice = "expert_choice"

    def __init__(
        self,
        cfg: ModelConfig,
        n_experts: int = 8,
        capacity_factor: float = 2.0,
        expert_hidden: int | None = None,
        z_loss_weight: float = 1e-3,
        inference: Literal["topk", "threshold"] = "topk",
        inference_top_k: int | None = None,
        aux_loss_weight: float = 0.01,
        dispatch: Dispatch = "auto",
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            n_experts: number of experts E.
            capacity_factor: average experts per token; each expert takes capacity_factor * T / E tokens.
            expert_hidden: SwiGLU hidden size of each expert (None = cfg.ffn_dim).
            z_loss_weight: weight of the router z-loss.
            inference: causal routing outside training: "topk" (per-token top-k) or "threshold" (learned).
            inference_top_k: k of the "topk" inference (None = round(capacity_factor)).
            aux_loss_weight: weight of the threshold predictor's BCE loss ("threshold" only).
            dispatch: expert matmuls at inference: auto, grouped_mm or loop (training uses one bmm).
        """
        super().__init__(cfg, n_experts, expert_hidden, dispatch)
        if not 0 < capacity_factor <= n_experts:
            raise ConfigError(f"model.mlp.init_args.capacity_factor={capacity_factor} must be in (0, n_experts]")
        if inference not in ("topk", "threshold"):
            raise ConfigError(f"model.mlp.init_args.inference={inference!r}: use topk or threshold")
        self.capacity_factor, self.z_loss_weight, self.inference = capacity_factor, z_loss_weight, inference
        self.inference_top_k = inference_top_k or min(n_experts, max(1, round(capacity_factor)))
        self.aux_loss_weight = aux_loss_weight
        self.predictor = nn.Linear(cfg.d_model, n_experts, bias=True) if inference == "threshold" else None

    def capacity(self, T: int) -> int:
        return min(T, math.ceil(self.capacity_factor * T / self.n_experts))

    def choose(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """probs (B, T, E) -> each expert's top-c token indices (B, E, c) and their probabilities."""
        top = probs.transpose(1, 2).topk(self.capacity(probs.size(1)), dim=-1)
        return top.indices, top.values

    def forward(self, x: torch.Tensor, records: list[RouterRecord] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        E = self.n_experts
        logits = self.router(x).float()  # (B, T, E)
        probs = logits.softmax(-1)
        idx, gate = self.choose(probs)  # (B, E, c)
        chosen = torch.zeros(B, E, T, dtype=torch.bool, device=x.device).scatter_(2, idx, True).transpose(1, 2)
        aux: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        pred = self.predictor(x.detach()).float() if self.predictor is not None else None
        if self.training:
            c = idx.size(-1)
            xs = x.gather(1, idx.reshape(B, E * c, 1).expand(-1, -1, D))  # (B, E c, D)
            xs = xs.view(B, E, c, D).transpose(0, 1).reshape(E, B * c, D)
            ys = self.experts.batched(xs) * gate.transpose(0, 1).reshape(E, B * c, 1).to(x.dtype)
            ys = ys.view(E, B, c, D).transpose(0, 1).reshape(B, E * c, D)
            out = x.new_zeros(B, T, D).scatter_add(1, idx.reshape(B, E * c, 1).expand(-1, -1, D), ys)
            sel, rows = chosen, E * B * c
            aux["z_loss"] = z_loss(logits)
            if pred is not None:
                aux["bce"] = F.binary_cross_entropy_with_logits(pred, chosen.float())
        else:  # causal: every token routed on its own
            if pred is not None:
                sel = torch.sigmoid(pred) > 0.5  # (B, T, E)
            else:
                sel = torch.zeros_like(chosen).scatter_(-1, probs.topk(self.inference_top_k, -1).indices, True)
            ids = torch.where(sel, torch.arange(E, device=x.device), -1).reshape(B * T, E)
            out, rows = dispatch(self.experts, x.reshape(-1, D), ids, probs.reshape(B * T, E))
            out = out.view(B, T, D)
            metrics["sampling_acc"] = (sel == chosen).float().mean()
        load = sel.float().sum((0, 1)) / sel.sum().clamp(min=1)
        metrics.update(max_vio=max_violation(load), mean_experts_per_token=sel.float().sum(-1).mean(),
                       expert_rows=torch.tensor(float(rows)), no_expert_frac=(~sel.any(-1)).float().mean())
        self._record(records, probs, sel, aux, {"z_loss": self.z_loss_weight, "bce": self.aux_loss_weight}, metrics)
        return out


class AdaptiveTopPMoE(_MoEBase):
    """Top-p ("dynamic") routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv 2403.07652,
    section 3.1): a token takes experts in order of probability until their cumulative
    probability reaches p, i.e. the smallest n with p_(1) + ... + p_(n) >= p
    (n = 1 + #{j : p_(1) + ... + p_(j) < p}, capped by max_experts).

    out = sum of the selected experts' prob * expert(x) (raw probabilities, or renormalised).
    The dynamic loss, the mean entropy of the router distribution, keeps the router from
    spreading mass to buy more experts; the Switch balancing loss keeps experts used.
    `threshold` is one p, or one p per unique layer (e.g. 0.6 for the first layer
    down to 0.2 for the last: early layers need more experts, the paper's section 4.4); a shared layer uses its p at every recursion step.
    Metrics: mean_experts_per_token (the paper reports ~1.7-1.9 at p=0.4), max_vio, threshold.
    """

    choice = "top_p"

    def __init__(
        self,
        cfg: ModelConfig,
        n_experts: int = 8,
        threshold: float | Sequence[float] = 0.4,
        max_experts: int | None = None,
        expert_hidden: int | None = None,
        dynamic_loss_weight: float = 1e-4,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        renormalize: bool = False,
        dispatch: Dispatch = "auto",
        learned_p: bool = False,
        p_loss_weight: float = 1.0,
        p_range: Sequence[float] = (0.05, 0.95),
        p_temperature: float = 0.05,
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            n_experts: number of experts E.
            threshold: cumulative probability p in (0, 1], or a list with one p per unique layer (with
                learned_p: the mean p the per-token predictor is held to).
            max_experts: cap on experts per token (None = E).
            expert_hidden: SwiGLU hidden size of each expert (None = cfg.ffn_dim).
            dynamic_loss_weight: weight of the router-entropy ("dynamic") loss.
            balance_loss_weight: weight of the Switch balancing loss.
            z_loss_weight: weight of the router z-loss.
            renormalize: divide the selected probabilities by their sum.
            dispatch: expert matmuls: auto, grouped_mm or loop.
            learned_p: predict p per token (a linear predictor squashed into p_range) instead of one p per layer.
            p_loss_weight: weight of the loss holding the mean predicted p to `threshold`.
            p_range: (lowest, highest) per-token p.
            p_temperature: width of the soft cut-off whose gradient trains the predictor (straight-through).
        """
        super().__init__(cfg, n_experts, expert_hidden, dispatch)
        lo, hi = (float(v) for v in p_range)
        if not 0 < lo < hi <= 1 or p_temperature <= 0:
            raise ConfigError(f"model.mlp.init_args.p_range={list(p_range)} must be 0 < low < high <= 1 and "
                              f"p_temperature={p_temperature} > 0")
        self.p_range, self.p_temperature, self.p_loss_weight = (lo, hi), p_temperature, p_loss_weight
        # learned per-token p: sigmoid(w.x + b) spans p_range; w = 0 and b = logit of `threshold` start it at
        # the layer's fixed p, so switching it on does not change the routing before training
        self.p_predictor = nn.Linear(cfg.d_model, 1) if learned_p else None
        ps = [float(threshold)] if isinstance(threshold, (int, float)) else [float(p) for p in threshold]
        n_unique = make_schedule(cfg).n_unique
        if len(ps) not in (1, n_unique) or any(not 0 < p <= 1 for p in ps):
            raise ConfigError(
                f"model.mlp.init_args.threshold={threshold} must be one p in (0, 1] or a list of {n_unique} "
                f"(one per unique layer of this model)"
            )
        self.thresholds = ps
        self.max_experts = min(max_experts or n_experts, n_experts)
        self.dynamic_loss_weight, self.balance_loss_weight = dynamic_loss_weight, balance_loss_weight
        self.z_loss_weight, self.renormalize = z_loss_weight, renormalize
        if self.p_predictor is not None:
            if any(not lo < p < hi for p in ps):
                raise ConfigError(f"model.mlp.init_args.threshold={threshold} must lie inside p_range={[lo, hi]} "
                                  "with learned_p")
            nn.init.zeros_(self.p_predictor.weight)
            u = (sum(ps) / len(ps) - lo) / (hi - lo)
            nn.init.constant_(self.p_predictor.bias, math.log(u / (1 - u)))

    @property
    def threshold(self) -> float:
        return self.thresholds[self.layer_index if len(self.thresholds) > 1 else 0]

    def select(self, probs: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """probs (N, E) -> ids (N, E): the top-p experts by descending probability, -1 after them.
        p (N, 1): a per-token threshold (learned_p); None = the layer's."""
        sp, si = probs.sort(-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass of the experts ranked above each one
        keep = before < (self.threshold if p is None else p)
        keep[:, self.max_experts :] = False
        return si.masked_fill(~keep, -1)

    def token_p(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> the learned per-token threshold p (N, 1) in p_range (fp32)."""
        lo, hi = self.p_range
        return lo + (hi - lo) * torch.sigmoid(self.p_predictor(x).float())

    def _learned_gates(self, probs: torch.Tensor, ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Gates (N, E) in the order of `ids` with a straight-through cut-off: value = the probability of a
        kept expert, gradient to p through sigmoid((p - mass ranked above) / temperature), so the LM loss
        tells the predictor whether a token's marginal kept expert helps (the dropped ones are not computed,
        so their gradient is unknown: the mean-p loss pulls the other way)."""
        sp = probs.sort(-1, descending=True).values  # (N, E): the order of `ids` (select sorts the same way)
        before = sp.cumsum(-1) - sp
        soft = torch.sigmoid((p - before) / self.p_temperature)
        return torch.where(ids >= 0, sp * (1 + soft - soft.detach()), torch.zeros_like(sp))

    def forward(self, x: torch.Tensor, records: list[RouterRecord] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        logits = self.router(x.reshape(-1, D)).float()  # (N, E)
        probs = logits.softmax(-1)
        p = self.token_p(x.reshape(-1, D)) if self.p_predictor is not None else None  # (N, 1)
        ids = self.select(probs, p)
        if p is None:
            gates = probs.gather(-1, ids.clamp(min=0)) * (ids >= 0)
        else:
            gates = self._learned_gates(probs, ids, p)
        if self.renormalize:
            gates = gates / gates.sum(-1, keepdim=True)
        out, rows = dispatch(self.experts, x.reshape(-1, D), ids, gates)
        sel = ids_to_mask(ids, self.n_experts)  # (N, E)
        load = sel.float().sum(0) / sel.sum().clamp(min=1)
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            aux["dynamic"] = -(probs * torch.log(probs.clamp(min=1e-9))).sum(-1).mean()
            aux["balance"] = balance_loss(load, probs)
            if self.z_loss_weight > 0:
                aux["z_loss"] = z_loss(logits)
            if p is not None:  # the per-token p may move, its mean stays at the layer's threshold
                aux["p_mean"] = (p.mean() - self.threshold) ** 2
        metrics = {"max_vio": max_violation(load), "mean_experts_per_token": torch.tensor(rows / max(B * T, 1)),
                   "expert_rows": torch.tensor(float(rows)), "threshold": torch.tensor(self.threshold)}
        if p is not None:
            pd = p.detach()
            metrics.update(p_mean=pd.mean(), p_std=pd.std() if pd.numel() > 1 else pd.new_zeros(()),
                           p_min=pd.min(), p_max=pd.max(), threshold=pd.mean())
        weights = {"dynamic": self.dynamic_loss_weight, "balance": self.balance_loss_weight,
                   "z_loss": self.z_loss_weight, "p_mean": self.p_loss_weight}
        self._record(records, probs.view(B, T, -1), sel.view(B, T, -1), aux, weights, metrics)
        return out.view(B, T, D)
