"""Mixture-of-Heads attention (MoH, Jin et al. 2024, arXiv 2410.11842, sections 3.2-3.3).

Attention heads are experts: out = sum_i g_i H_i W_o^i, the sum over the heads a token activates.
The first `n_shared` query heads are always on; of the other `n_routed` heads each token picks its
top-k by a router. Two-stage weights (eq. 5-6):

    g_i = a_1 softmax(W_s x)_i             for a shared head i
    g_i = a_2 softmax(W_r x)_i             for a routed head i in the token's top-k (0 otherwise)
    [a_1, a_2] = softmax(W_h x)

Balance (eq. 7): the Switch loss over the routed heads, E sum_i f_i P_i (f_i: fraction of the top-k
assignments head i took, P_i: its mean router probability; E = n_routed, so uniform = 1). Each token
routes on its own, so training, evaluation and decoding decide alike (causal, batch-independent).

Compute: every head is computed and the inactive ones are zeroed before W_o (dense kernels); the
FLOP count is that of the dense attention plus the three router linears. Keys/values, caches, GQA,
RoPE, the sliding window and KV sharing are Attention's own.

`gate_weights=False` replaces g by the 0/1 activity of the heads: with every head active that is
exactly multi-head attention (the reduction the tests check).
"""

from __future__ import annotations

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.mixers.attention_core import head_outputs
from haipai_lightning.model.routing.losses import balance_loss, max_violation
from haipai_lightning.model.routing.record import RouterRecord, next_application


class MixtureOfHeadsAttention(Attention):
    """Attention whose query heads are gated per token: shared heads always on, routed heads top-k.

    A routed mixer (`routed = True`): forward(x, cos, sin, kv, share, valid, records) appends a
    RouterRecord `moh/layer<i>/<n>` (scores (B, T, n_routed) router probabilities, selected (B, T, k)
    chosen routed-head ids, aux `balance` in training, metrics max_vio and shared_weight).
    """

    routed = True

    def __init__(self, cfg: ModelConfig, n_shared: int | None = None, top_k: int | None = None,
                 gate_weights: bool = True, balance_loss_weight: float = 0.01, window: int | None = None,
                 flash: bool = True, flex: bool = False) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            n_shared: always-active query heads (None = a quarter of the heads, at least 1).
            top_k: routed heads each token activates (None = half the routed heads, at least 1).
            gate_weights: weight head outputs by the two-stage router weights (False: 0/1 activity).
            balance_loss_weight: weight of the balance loss over the routed heads.
            window, flash, flex: as Attention.
        """
        super().__init__(cfg, window=window, flash=flash, flex=flex)
        H = cfg.n_heads
        n_shared = max(1, H // 4) if n_shared is None else n_shared
        if not 0 <= n_shared <= H:
            raise ConfigError(f"model.mixer.init_args.n_shared={n_shared} must be in 0..n_heads={H}")
        n_routed = H - n_shared
        top_k = max(1, n_routed // 2) if top_k is None else top_k
        if n_routed and not 1 <= top_k <= n_routed:
            raise ConfigError(f"model.mixer.init_args.top_k={top_k} must be in 1..{n_routed} (the routed heads)")
        self.n_shared, self.n_routed, self.top_k = n_shared, n_routed, top_k if n_routed else 0
        self.gate_weights, self.balance_loss_weight = gate_weights, balance_loss_weight
        d = cfg.d_model
        self.router = nn.Linear(d, n_routed, bias=False) if n_routed else None  # W_r
        self.shared_router = nn.Linear(d, n_shared, bias=False) if n_shared else None  # W_s
        self.mix = nn.Linear(d, 2, bias=False) if n_shared and n_routed else None  # W_h: [a_1, a_2]
        self.layer_index = 0  # set by the Block that holds this mixer

    def stream_io(self) -> tuple[list[nn.Linear], list[nn.Linear]]:
        readers = [m for m in (self.router, self.shared_router, self.mix) if m is not None]
        return [self.wq, self.wk, self.wv, *readers], [self.wo]

    def head_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x (B, T, D) -> g (B, T, H) per-head weights, and what the record needs."""
        B, T, _ = x.shape
        parts, info = [], {"shared_weight": torch.tensor(0.0)}
        a = self.mix(x).float().softmax(-1) if self.mix is not None else None  # (B, T, 2)
        if self.n_shared:
            ps = self.shared_router(x).float().softmax(-1) if self.gate_weights else x.new_ones(B, T, self.n_shared)
            parts.append(ps * a[..., :1] if a is not None and self.gate_weights else ps)
            info["shared_weight"] = a[..., 0].detach().mean() if a is not None else torch.tensor(1.0)
        if self.n_routed:
            pr = self.router(x).float().softmax(-1)  # (B, T, n_routed)
            ids = pr.topk(self.top_k, dim=-1).indices  # (B, T, k)
            active = torch.zeros_like(pr).scatter_(-1, ids, 1.0)
            gr = pr * active if self.gate_weights else active
            parts.append(gr * a[..., 1:] if a is not None and self.gate_weights else gr)
            info.update(probs=pr, ids=ids, active=active)
        return torch.cat(parts, -1).to(x.dtype), info

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
                share: KVShare | None = None, valid: torch.Tensor | None = None,
                records: list[RouterRecord] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        g, info = self.head_gates(x)  # (B, T, H)
        y = head_outputs(self, x, cos, sin, kv, share, valid).view(B, T, self.n_heads, self.head_dim)
        out = self.wo((y * g[..., None]).reshape(B, T, -1))
        if records is not None and self.n_routed:
            self._record(records, info, valid)
        return out

    def _record(self, records: list[RouterRecord], info: dict, valid: torch.Tensor | None) -> None:
        probs, active = info["probs"], info["active"]
        if valid is not None:
            probs, active = probs[valid], active[valid]
        probs, active = probs.reshape(-1, self.n_routed), active.reshape(-1, self.n_routed)
        load = active.sum(0) / active.sum().clamp(min=1)
        aux = {"balance": balance_loss(load, probs)} if self.training else {}
        metrics = {"max_vio": max_violation(load.detach()), "shared_weight": info["shared_weight"]}
        records.append(RouterRecord("moh", "top_k", info["probs"].detach(), info["ids"], aux,
                                    {"balance": self.balance_loss_weight}, metrics, layer=self.layer_index,
                                    application=next_application(records, "moh", self.layer_index)))
