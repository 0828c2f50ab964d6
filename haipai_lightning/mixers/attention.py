"""Causal grouped-query self-attention with RoPE through F.scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.cache import LayerKV
from haipai_lightning.config import ModelConfig
from haipai_lightning.layers import apply_rope


@dataclass
class KVShare:
    """Recursive KV sharing across recursion steps (MoR section 2.3).

    Step 1 runs every token and stores each shared layer's keys/values under its slot;
    later steps reuse them (`reuse=True`) with `mask` (B, 1, k, T): a routed query at
    position p sees the keys at positions <= p.
    """

    store: dict[int, tuple[torch.Tensor, torch.Tensor]]
    slot: int
    reuse: bool
    mask: torch.Tensor | None = None


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
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV | None = None,
        share: KVShare | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin broadcastable to (B, T, H, hd/2); kv: this application's decode cache;
        share: recursive KV sharing (MoR) -- store this step's keys/values, or reuse step 1's."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        mask, causal = None, True
        if share is not None and share.reuse:
            # Steps r > 1 of recursive KV sharing: no K/V projections at all; the active
            # tokens' queries attend to step 1's keys/values of every token up to their position.
            k, v = share.store[share.slot]  # (B, Hkv, S, hd)
            mask, causal = share.mask, False  # (B, 1, T, S)
        else:
            k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            if share is not None:
                share.store[share.slot] = (k, v)
            if kv is not None:
                k, v = kv.update(k, v)  # (B, Hkv, S, hd), S = past + T
        S = k.size(2)
        if mask is None and S != T:
            causal = False
            if T > 1:  # prefill after a prefix: query i sees keys <= past + i
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
