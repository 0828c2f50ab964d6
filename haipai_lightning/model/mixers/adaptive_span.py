"""Adaptive attention span (Sukhbaatar et al. 2019, arXiv 1905.07799, section 3).

Each head h learns a span z_h in [0, max_span]. A key at distance x = q_pos - k_pos (absolute
positions, so routed tokens and cached decoding measure the same distances) is weighted by the soft
mask m_z(x) = clamp((R + z - x) / R, 0, 1): the attention weights a_x m_z(x) are renormalised to sum
to 1 (eq. 3 of the paper: the mask on exp(s_x), i.e. on the softmax weights, then renormalised).
An L1 penalty on the spans, (1 / H) sum_h z_h, is the aux loss `span` (weight `span_loss_weight`),
reported in a RouterRecord `span/layer<i>/<n>`.

Decoding trims the cache to the span: a key at distance >= R + max_h z_h from the earliest query of a
step gets weight exactly 0 from every head, now and for every later query, so after the step it is
dropped (`LayerKV.drop_before`); the cache holds at most about R + max z_h entries per row and each
step scores only those. The weights being renormalised over the kept keys, the decode output equals
the full forward (a query's masked-out keys only ever cancelled in the renormalisation). The earliest
query (not the last) sets the cut, so speculative decoding's rollback never needs a dropped key.
Training and the full forward still score every causal key (FLOP counting counts full attention).
A span >= the sequence length is full causal attention (the reduction the tests check).
"""

from __future__ import annotations

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.mixers.attention_core import explicit_attention
from haipai_lightning.model.routing.record import RouterRecord, next_application


class AdaptiveSpanAttention(Attention):
    """Grouped-query attention with a learned soft span per query head (explicit scores, SDPA not used).

    `routed = True` only so that the model hands it the records list (its record carries the L1 loss).
    """

    routed = True

    def __init__(self, cfg: ModelConfig, max_span: int | None = None, ramp: int = 32, init_span: float = 1.0,
                 span_loss_weight: float = 1e-4) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            max_span: the largest span S (None = cfg.max_seq_len).
            ramp: R, the length of the soft ramp at the end of the span.
            init_span: initial z / S of every head, in [0, 1] (1: starts as full attention).
            span_loss_weight: weight of the L1 penalty (1 / H) sum_h z_h (in tokens).
        """
        super().__init__(cfg)
        self.max_span = max_span or cfg.max_seq_len
        if self.max_span < 1 or ramp < 1 or not 0.0 <= init_span <= 1.0:
            raise ConfigError(f"model.mixer.init_args: max_span={max_span} and ramp={ramp} must be >= 1, "
                              f"init_span={init_span} in [0, 1]")
        self.ramp, self.span_loss_weight = ramp, span_loss_weight
        self.span_frac = nn.Parameter(torch.full((cfg.n_heads,), float(init_span)))  # z_h / S
        self.layer_index = 0  # set by the Block that holds this mixer

    def spans(self) -> torch.Tensor:
        """(H,) the spans z_h in tokens."""
        return self.span_frac.clamp(0.0, 1.0) * self.max_span

    def span_mask(self, dist: torch.Tensor) -> torch.Tensor:
        """dist (..., T, S) key distances -> the soft mask (..., H, T, S) broadcast over heads."""
        z = self.spans().to(dist.dtype)[:, None, None]  # (H, 1, 1)
        return ((self.ramp + z - dist) / self.ramp).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
                share: KVShare | None = None, valid: torch.Tensor | None = None,
                records: list[RouterRecord] | None = None) -> torch.Tensor:

        def weight_fn(w: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
            return w * self.span_mask(dist)  # dist (B|1, 1, T, S) -> mask (B|1, H, T, S)

        y = explicit_attention(self, x, cos, sin, kv, share, weight_fn=weight_fn)
        if kv is not None and not torch.is_grad_enabled():  # decoding: forget keys beyond every head's span
            reach = float(self.ramp + self.spans().max())  # keys at distance >= reach weigh 0 for all heads
            q_pos = kv.positions if kv.positions.dim() == 2 else kv.positions[None].expand(x.size(0), -1)
            kv.drop_before(torch.floor(q_pos.min(1).values - reach).long() + 1)  # (B,)
        if records is not None:
            z = self.spans()
            aux = {"span": z.mean()} if self.training else {}
            records.append(RouterRecord("span", None, aux_losses=aux, aux_weights={"span": self.span_loss_weight},
                                        metrics={"mean_span": z.detach().mean(), "max_span": z.detach().max()},
                                        layer=self.layer_index,
                                        application=next_application(records, "span", self.layer_index)))
        return self.wo(y)
