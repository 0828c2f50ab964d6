"""DTRNet-style token routing in attention (Dynamic Token Routing Network, arXiv 2509.00925).

Per layer a router (TopKGate) sends a fraction of the tokens through full attention; the others take
the cheap path, the value and output projections only: out = W_o W_v x (each query head reads its
key/value group's value row), no mixing across tokens. In training the router takes the top
`capacity` x T tokens of each row (expert choice, non-causal); its auxiliary BCE loss teaches
sigmoid(logit) > 0.5 to predict that choice, which decides causally, token by token, at inference
and in decoding (as the MoR / MoD gates of this package).

The routed tokens attend among themselves (their keys and values only; decoding caches only theirs),
at their absolute positions (RoPE, sliding window), like the gathered tokens of a MoR step. The
router learns from the language-model loss through a straight-through factor, g / sg(g) on the
attention path and (1 - g) / sg(1 - g) on the cheap path (sg = stop-gradient; computed as
exp(log g - sg(log g)) so a saturated gate gives no 0 / 0): exactly 1 in value, so
capacity 1 (every token routed) is the dense attention layer, and a bypassed token's output depends
on that token only. Record `dtr/layer<i>/<n>`: scores sigmoid(logits) (B, T), selected bool (B, T),
aux `bce` in training, metrics sampling_acc and routed_fraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.mixers.attention_core import head_outputs, positions_of
from haipai_lightning.model.routing.gate import TopKGate, capacity_k
from haipai_lightning.model.routing.record import RouterRecord, next_application
from haipai_lightning.model.routing.selection import Selection, select_mask


class DTRNetAttention(Attention):
    """Attention for the routed tokens, W_o W_v x for the rest (a routed mixer: it appends a record)."""

    routed = True

    def __init__(self, cfg: ModelConfig, capacity: float = 0.1, aux_loss_weight: float = 0.01,
                 window: int | None = None, flash: bool = True, flex: bool = False) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            capacity: fraction of each row's tokens routed through attention in training (0 < c <= 1).
            aux_loss_weight: weight of the router's BCE loss (it trains the inference threshold).
            window, flash, flex: as Attention.
        """
        super().__init__(cfg, window=window, flash=flash, flex=flex)
        if not 0.0 < capacity <= 1.0:
            raise ConfigError(f"model.mixer.init_args.capacity={capacity} must be in (0, 1]")
        self.capacity, self.aux_loss_weight = capacity, aux_loss_weight
        self.gate = TopKGate(cfg.d_model)
        self.layer_index = 0  # set by the Block that holds this mixer

    @property
    def attention_fraction(self) -> float:
        """Nominal fraction of the tokens that attend (FLOP counting, analysis/flops.py)."""
        return self.capacity

    def stream_io(self) -> tuple[list[nn.Linear], list[nn.Linear]]:
        return [self.wq, self.wk, self.wv, *self.gate.stream_readers()], [self.wo]

    def route(self, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        """x (B, T, D) -> routed bool (B, T), logits (B, T), aux losses, metrics."""
        B, T, _ = x.shape
        k = capacity_k(self.capacity, T)
        sel, logits, aux, metrics = self.gate.decide(x, Selection(None, valid, T), k, use_threshold=not self.training)
        routed = sel.mask(B, x.device)
        return (routed if valid is None else routed & valid), logits, aux, metrics

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
                share: KVShare | None = None, valid: torch.Tensor | None = None,
                records: list[RouterRecord] | None = None) -> torch.Tensor:
        if share is not None and share.sharing:
            raise ConfigError("DTRNetAttention does not support model.config.kv_mode=shared (only routed tokens "
                              "have keys/values)")
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        cand = valid if valid is not None else (kv.valid if kv is not None else None)  # routing pads never route
        routed, logits, aux, metrics = self.route(x, cand)
        log_g = F.logsigmoid(logits.float())[..., None]  # (B, T, 1) log g and log(1 - g): no 0/0 when g saturates
        log_1mg = F.logsigmoid(-logits.float())[..., None]
        y = self.wv(x).view(B, T, Hkv, 1, hd).expand(B, T, Hkv, H // Hkv, hd).reshape(B, T, H * hd)
        y = y * (log_1mg - log_1mg.detach()).exp().to(x.dtype)  # the cheap path: W_v x (W_o below)
        if bool(routed.any()):
            gsel = select_mask(routed)
            pos = gsel.gather(positions_of(T, kv, share, x.device).expand(B, T))  # (B, k) absolute positions
            gcos = gsel.gather(cos if cos.dim() == 4 else cos.expand(B, *cos.shape))
            gsin = gsel.gather(sin if sin.dim() == 4 else sin.expand(B, *sin.shape))
            xs = gsel.gather(x)
            if kv is not None:
                a = head_outputs(self, xs, gcos, gsin, KVView(kv.kv, pos, kv.rows, gsel.valid), None, None)
            else:
                a = head_outputs(self, xs, gcos, gsin, None, KVShare.at(pos), gsel.valid)
            st = gsel.gather((log_g - log_g.detach()).exp().to(x.dtype))  # g / sg(g), exactly 1 in value
            y = gsel.scatter(y, a * st)
        if records is not None:
            metrics["routed_fraction"] = routed.float().sum() / (cand.sum() if cand is not None else routed.numel())
            records.append(RouterRecord("dtr", "expert_choice", torch.sigmoid(logits).detach(), routed, aux,
                                        {"bce": self.aux_loss_weight}, metrics, layer=self.layer_index,
                                        application=next_application(records, "dtr", self.layer_index)))
        return self.wo(y)
