"""MoR token-choice routing (arXiv 2507.10524, section 2.2.2): each token picks its recursion depth
once, before the first step, and runs steps 1..depth."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.routing.base import Router, RunFn
from haipai_lightning.model.routing.losses import balance_loss, loss_free_bias_update, max_violation, z_loss
from haipai_lightning.model.routing.record import RouterRecord
from haipai_lightning.model.routing.selection import select_mask


class TokenChoiceRouter(Router):
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
        super().__init__(cfg)
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
        # tokens whose depth reaches step r; test-time extra steps (r >= Nr) run the tokens that chose the
        # deepest depth: the router's own "needs the most compute", and its weighted gate stays theirs
        sel = select_mask(depth >= min(r, self.nr - 1))
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
                aux["balance"] = balance_loss(load, probs.flatten(0, 1))
            aux["z_loss"] = z_loss(logits)
            if self.bias_balancing:  # loss-free: raise the bias of under-loaded depths
                loss_free_bias_update(self.bias, load, self.bias_update_rate)
        metrics = {"max_vio": max_violation(load), "mean_depth": depth.float().mean() + 1}
        records.append(RouterRecord("depth", "token_choice", probs.detach(), depth + 1, aux,
                                    {"balance": weight, "z_loss": self.z_loss_weight}, metrics))

    # causal decoding: the depth is chosen once, right after the prelude; state (N, 2) = (depth 1..Nr, gate prob)
    def decode_start(self, h: torch.Tensor) -> torch.Tensor:
        depth, gate, _ = self.route(h)  # (N, 1) each
        return torch.stack([depth[:, 0].to(gate.dtype) + 1, gate[:, 0]], dim=-1)

    def decode_continues(self, r: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        return state[:, 0] > r

    def decode_combine(self, r: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
                       state: torch.Tensor | None) -> torch.Tensor:
        if self.gating != "weighted":
            return out
        return h + state[:, 1, None, None].to(h.dtype) * (out - h)

    def nominal_records(self, B: int, T: int) -> list[RouterRecord]:
        """A perfectly balanced router: each depth 1..Nr gets T / Nr tokens."""
        depth = (torch.arange(T) % self.nr + 1).expand(B, T)
        return [RouterRecord("depth", "token_choice", selected=depth)]

    def stream_readers(self) -> list[nn.Linear]:
        return [self.mlp[0]]

    @classmethod
    def widened_init_args(cls, init_args: dict[str, Any], factor: int) -> dict[str, Any]:
        out = dict(init_args)
        if out.get("hidden"):
            out["hidden"] = factor * out["hidden"]
        return out
