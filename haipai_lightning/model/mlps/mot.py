"""Mixture-of-Tokens (Antoniak et al., "Mixture of Tokens: Continuous MoE through Cross-Example
Aggregation", NeurIPS 2024): a continuous MoE with no top-k.

Training (continuous): the batch is split into groups of `group_size` examples; a group holds
the tokens of those examples *at the same position* (so the layer stays causal: position t
never sees another position). For every expert e, a controller gives each token i of a group
a mixing weight w_{e,i} = softmax over the group of (controller(x_i)_e / temperature); the
expert runs once per group on the mixture sum_i w_{e,i} x_i, and token i receives
sum_e w_{e,i} * expert_e(mixture_e). Every expert therefore processes n_tokens / group_size
rows: with n_experts = group_size the compute is one expert per token. The temperature is
learnable (log-parametrised) unless `learn_temperature=False`.

The output of a token depends on the other examples of its group, so a single sequence
cannot be decoded this way. The transition to discrete routing ("transition tuning" in the
paper): `discrete=True` (or any evaluation with `inference="discrete"`, the default) routes
each token on its own to its top `decode_top_k` experts by the same controller (softmax over
experts, the top-k probabilities renormalised) -- a token-choice MoE with the same experts,
causal and independent of the batch; fine-tune briefly with `discrete=True` before decoding.
`inference="mix"` keeps group mixing at evaluation (batched scoring of whole batches).

Routed-MLP protocol as in moe.py; kind "mot"; scores (B, T, E) the controller's softmax over
experts; selected bool (B, T, E) (mixing: every expert sees every token).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.mlps.experts import Dispatch, Experts, dispatch, ids_to_mask
from haipai_lightning.model.routing.losses import max_violation
from haipai_lightning.model.routing.record import RouterRecord, next_application


class MixtureOfTokens(nn.Module):
    routed = True

    def __init__(
        self,
        cfg: ModelConfig,
        n_experts: int = 8,
        group_size: int = 8,
        expert_hidden: int | None = None,
        temperature: float = 1.0,
        learn_temperature: bool = True,
        discrete: bool = False,
        inference: Literal["discrete", "mix"] = "discrete",
        decode_top_k: int = 1,
        dispatch: Dispatch = "auto",
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            n_experts: number of experts E.
            group_size: examples mixed per group (same position); the batch is padded to a multiple.
            expert_hidden: SwiGLU hidden size of each expert (None = cfg.ffn_dim).
            temperature: initial softmax temperature of the mixing weights.
            learn_temperature: learn the temperature (log-parametrised).
            discrete: route each token to its top-k experts, also in training (transition tuning).
            inference: routing outside training: "discrete" (per token, causal, batch-independent) or "mix".
            decode_top_k: experts per token in discrete routing.
            dispatch: expert matmuls of discrete routing: auto, grouped_mm or loop.
        """
        super().__init__()
        if group_size < 1 or not 1 <= decode_top_k <= n_experts or temperature <= 0:
            raise ConfigError(
                f"model.mlp.init_args: group_size={group_size} must be >= 1, decode_top_k={decode_top_k} in "
                f"1..n_experts={n_experts}, temperature={temperature} > 0"
            )
        if inference not in ("discrete", "mix"):
            raise ConfigError(f"model.mlp.init_args.inference={inference!r}: use discrete or mix")
        self.n_experts, self.group_size, self.decode_top_k = n_experts, group_size, decode_top_k
        self.discrete, self.inference = discrete, inference
        self.controller = nn.Linear(cfg.d_model, n_experts, bias=False)
        self.experts = Experts(cfg, n_experts, expert_hidden or cfg.ffn_dim, dispatch)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self.layer_index = 0  # set by the Block that holds this MLP

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x (B, T, D) -> output (B, T, D), mixing weights (nG, G, T, E) and the rows the experts computed."""
        B, T, D = x.shape
        E, G = self.n_experts, min(self.group_size, B)
        pad = (-B) % G
        xp = torch.cat([x, x.new_zeros(pad, T, D)]) if pad else x  # (Bp, T, D)
        nG = xp.size(0) // G
        xg = xp.view(nG, G, T, D)
        logits = self.controller(xg).float() / self.temperature  # (nG, G, T, E)
        if pad:  # padded examples take no part in the mixture
            is_pad = torch.arange(nG * G, device=x.device).view(nG, G) >= B
            logits = logits.masked_fill(is_pad[:, :, None, None], float("-inf"))
        w = logits.softmax(dim=1)  # over the group: each expert's mixture at each position
        mixed = torch.einsum("ngte,ngtd->entd", w.to(x.dtype), xg).reshape(E, nG * T, D)  # (E, rows, D)
        y = self.experts.batched(mixed).view(E, nG, T, D)
        out = torch.einsum("ngte,entd->ngtd", w.to(x.dtype), y).reshape(nG * G, T, D)[:B]
        return out, w, E * nG * T

    def forward(self, x: torch.Tensor, records: list[RouterRecord] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        E = self.n_experts
        probs = self.controller(x).float().softmax(-1)  # (B, T, E) the per-token view of the controller
        metrics: dict[str, torch.Tensor] = {"temperature": self.temperature.detach()}
        if self.discrete or (not self.training and self.inference == "discrete"):
            top = probs.topk(self.decode_top_k, dim=-1)
            gates = top.values / top.values.sum(-1, keepdim=True)
            out, rows = dispatch(self.experts, x.reshape(-1, D), top.indices.view(-1, self.decode_top_k),
                                 gates.view(-1, self.decode_top_k))
            out = out.view(B, T, D)
            sel = ids_to_mask(top.indices, E)
            load = sel.float().sum((0, 1)) / sel.sum().clamp(min=1)
            metrics["max_vio"] = max_violation(load)
        else:
            out, w, rows = self.mix(x)
            sel = torch.ones(B, T, E, dtype=torch.bool, device=x.device)
            # largest weight in each expert's mixture: 1/G for uniform mixing .. 1 when it takes one token
            metrics["mean_max_weight"] = w.amax(1).mean().detach()
        metrics.update(expert_rows=torch.tensor(float(rows)), mean_experts_per_token=torch.tensor(rows / max(B * T, 1)))
        if records is not None:
            records.append(RouterRecord("mot", None, probs.detach(), sel, {}, {}, metrics, layer=self.layer_index,
                                        application=next_application(records, "mot", self.layer_index)))
        return out
