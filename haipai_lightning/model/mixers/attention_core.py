"""Shared pieces of the conditional attention variants (issue #19).

- `head_outputs`: `Attention.forward` up to, not including, the output projection: (B, T, H*hd), every
  feature of Attention (GQA, RoPE, sliding window, KV caches, KV sharing, flash / SDPA) kept. The
  head-gated variants (Mixture-of-Heads, DTRNet) weight or replace rows before `wo`.
- `explicit_attention`: attention with an explicit (B, H, T, S) score matrix, for variants that change
  the logits (CoPE) or the weights (adaptive span). Queries and keys carry absolute positions
  (decoding cache, `KVShare.at` for routed tokens, or consecutive), so cached == uncached; both KV
  modes (per-step caches, and MoR's recursive KV sharing).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.rope import apply_rope

_IDENTITY = nn.Identity()

# logits hook: (scores (B, H, T, S), q (B, H, T, hd), k (B, H, S, hd), mask bool (B|1, 1, T, S)) -> scores
LogitFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# weights hook: (weights (B, H, T, S) after softmax, distance q_pos - k_pos (B|1, 1, T, S)) -> weights
WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def head_outputs(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None,
                 share, valid: torch.Tensor | None) -> torch.Tensor:
    """`Attention.forward` of `attn` without its output projection: x (B, T, D) -> (B, T, H*hd).

    `wo` is bypassed for the call only (the module's parameters and state dict are untouched)."""
    wo = attn._modules["wo"]
    attn._modules["wo"] = _IDENTITY
    try:
        return Attention.forward(attn, x, cos, sin, kv, share, valid)
    finally:
        attn._modules["wo"] = wo


def positions_of(T: int, kv: KVView | None, share, device: torch.device) -> torch.Tensor:
    """(B|1, T) absolute positions of the queries: routed tokens' (share.q_pos), the cache's, or 0..T-1."""
    pos = share.q_pos if share is not None and share.q_pos is not None else None
    pos = kv.positions if pos is None and kv is not None else pos
    pos = torch.arange(T, device=device) if pos is None else pos
    return pos if pos.dim() == 2 else pos[None]


def explicit_attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None,
                       share, logit_fn: LogitFn | None = None, weight_fn: WeightFn | None = None,
                       rope: bool = True) -> torch.Tensor:
    """Causal GQA attention of `attn` (an Attention: wq, wk, wv, heads) with explicit scores: (B, T, H*hd).

    Keys: this call's tokens (causal by slot: routed rows keep causal order, pads trail) or, with a
    decoding cache, the row's history under the cache's mask. KV sharing (kv_mode=shared, MoR section
    2.3) as in `Attention.forward`: step 1 stores its keys/values with their positions, later steps
    project only queries and attend to the stored keys at positions <= their own. `logit_fn` edits
    the scaled scores (masked entries are -inf afterwards); `weight_fn` rescales the softmax weights,
    which are then renormalised.
    """
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.wq(x).view(B, T, H, hd)
    q = (apply_rope(q, cos, sin) if rope else q).transpose(1, 2)
    q_pos = positions_of(T, kv, share, x.device)  # (B|1, T)
    sharing = share is not None and share.sharing
    if sharing and share.reuse:  # a later recursion step: step 1's keys/values, no K/V projections
        k, v, k_pos = share.store[share.slot]  # (B, Hkv, S, hd), (B|1, S)
        mask = ((k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] >= 0))[:, None]  # (B|1, 1, T, S)
    else:
        k = attn.wk(x).view(B, T, Hkv, hd)
        k = (apply_rope(k, cos, sin) if rope else k).transpose(1, 2)
        v = attn.wv(x).view(B, T, Hkv, hd).transpose(1, 2)
        if kv is not None:
            k, v, mask = kv.update(k, v)
            S = k.size(2)
            k_pos = kv.key_positions(S)  # (B, S)
            if mask is None:
                mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=x.device)
            mask = mask & (k_pos >= 0)[:, None, None, :]
        else:
            k_pos = q_pos
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        if sharing:  # step 1: keep keys/values (and their positions) for the later steps
            share.store[share.slot] = (k, v, k_pos)
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, H, T, S)
    if logit_fn is not None:
        scores = logit_fn(scores, q, k, mask)
    w = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    if weight_fn is not None:
        dist = (q_pos[:, :, None] - k_pos[:, None, :])[:, None].to(w.dtype)  # (B|1, 1, T, S)
        w = weight_fn(w, dist)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    y = w @ v  # (B, H, T, hd)
    return y.transpose(1, 2).reshape(B, T, H * hd)
