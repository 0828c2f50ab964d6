"""Contextual position encoding (CoPE, Golovneva et al. 2024, arXiv 2405.18719, section 3).

Positions are counted by the context: a gate g_ij = sigmoid(q_i . k_j) decides whether key j counts,
and the position of key j seen from query i is p_ij = sum_{k=j..i} g_ik (over the keys query i can
see). p_ij is fractional, so the position embedding is interpolated between the learned integer ones,
e[p] = (p - floor p) e[ceil p] + (ceil p - p) e[floor p] (p clamped to npos_max - 1), and q_i . e[p_ij]
is added to the attention logit. As in the paper's code, q_i . e[p] is computed once for the integer
p (a (T, npos_max) product) and interpolated. The gates use the scaled, masked logits (the paper's
code computes them from the attention logits), so masked keys count 0.

CoPE can replace RoPE (`rope=False`) or come on top of it (`rope=True`, the default). Keys are
counted over the keys that exist for this layer application (a routed MoR step's gathered tokens, or
the decoding cache's entries, or under kv_mode=shared step 1's keys at or before the query), so cached
decoding equals the full forward. The sliding window is not supported (explicit scores; FLOP counting
is that of full attention).
"""

from __future__ import annotations

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.mixers.attention_core import explicit_attention


class CoPEAttention(Attention):
    """Grouped-query causal attention with contextual position logits (with or without RoPE)."""

    def __init__(self, cfg: ModelConfig, npos_max: int = 64, rope: bool = True) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            npos_max: number of learned integer positions (contextual positions above clamp to the last).
            rope: keep RoPE on queries and keys as well (False: CoPE alone).
        """
        super().__init__(cfg)
        if npos_max < 2:
            raise ConfigError(f"model.mixer.init_args.npos_max={npos_max} must be >= 2")
        self.npos_max, self.rope = npos_max, rope
        self.pos_emb = nn.Parameter(torch.randn(self.head_dim, npos_max) * cfg.init_std)  # columns e[0..npos-1]

    def contextual_positions(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """scores (B, H, T, S) scaled logits, mask bool (B|1, 1, T, S) -> p (B, H, T, S), p_ij = sum_{k>=j} g_ik."""
        gates = torch.sigmoid(scores) * mask
        return gates.flip(-1).cumsum(-1).flip(-1)

    def position_logits(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, hd), fractional positions (B, H, T, S) -> q . e[p] interpolated (B, H, T, S)."""
        pos = pos.clamp(max=self.npos_max - 1)
        lo, hi = pos.floor().long(), pos.ceil().long()
        logits_int = q @ self.pos_emb.to(q.dtype)  # (B, H, T, npos_max)
        w = pos - lo.to(pos.dtype)
        return logits_int.gather(-1, hi) * w + logits_int.gather(-1, lo) * (1 - w)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
                share: KVShare | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:

        def logit_fn(scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return scores + self.position_logits(q, self.contextual_positions(scores, mask))

        return self.wo(explicit_attention(self, x, cos, sin, kv, share, logit_fn=logit_fn, rope=self.rope))
