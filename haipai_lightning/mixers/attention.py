"""Causal grouped-query self-attention with RoPE through F.scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.cache import KVView
from haipai_lightning.config import ModelConfig
from haipai_lightning.layers import apply_rope


@dataclass
class KVShare:
    """Recursive KV sharing across recursion steps (MoR section 2.3).

    Step 1 runs every token and stores each shared layer's keys/values (and their
    positions) under its slot; later steps reuse them (`reuse=True`): a routed query at
    position p sees the stored keys at positions <= p. With a decoding cache the store
    holds the whole history, so decoding reuses step 1's cache too.
    """

    store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # slot -> (k, v, key positions (B|1, S))
    slot: int
    reuse: bool
    q_pos: torch.Tensor | None = None  # (B, T) or (T,) positions of the queries


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
        kv: KVView | None = None,
        share: KVShare | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin broadcastable to (B, T, H, hd/2); kv: this application's decode cache;
        share: recursive KV sharing (MoR) -- store this step's keys/values, or reuse step 1's."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        mask, causal = None, T > 1
        if share is not None and share.reuse:
            # Steps r > 1 of recursive KV sharing: no K/V projections at all; the active
            # tokens' queries attend to step 1's keys/values of every token up to their position.
            k, v, key_pos = share.store[share.slot]  # (B, Hkv, S, hd), (B|1, S)
            q_pos = share.q_pos if share.q_pos.dim() == 2 else share.q_pos[None]
            mask = ((key_pos[:, None, :] <= q_pos[:, :, None]) & (key_pos[:, None, :] >= 0))[:, None]
        else:
            k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            if kv is not None:
                k, v, mask = kv.update(k, v)  # the row's history + the new tokens; mask (B, 1, T, S) or None
                causal = False
            if share is not None:  # step 1 of KV sharing: keep keys/values for the later steps
                if kv is not None:
                    key_pos = kv.key_positions(k.size(2))
                else:
                    key_pos = share.q_pos if share.q_pos.dim() == 2 else share.q_pos[None]
                share.store[share.slot] = (k, v, key_pos)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
