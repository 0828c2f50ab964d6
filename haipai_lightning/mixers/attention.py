"""Causal grouped-query self-attention with RoPE through F.scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.cache import LayerKV
from haipai_lightning.config import ModelConfig
from haipai_lightning.layers import apply_rope


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention (heads from the model config).

    SDPA picks the fused kernel the platform has (flash / memory-efficient on GPU,
    a fused C++ kernel on CPU), so no hand-written attention here.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        """Args:
            cfg: the model configuration (given by the model).
        """
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = nn.Linear(d, self.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=False)
        self.wo.is_residual_out = True

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin broadcastable to (B, T, H, hd/2); kv: this application's cache."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, Hkv, S, hd), S = past + T
        S = k.size(2)
        mask, causal = None, S == T
        if S != T and T > 1:  # prefill after a prefix: query i sees keys <= past + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
