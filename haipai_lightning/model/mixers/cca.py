"""Core-context-aware attention (CCA, Chen et al. 2024, arXiv 2412.12465), an adapted form.

Tokens are split into groups of `group` consecutive absolute positions. Globality-aware pooling turns
each group into one core key/value, a softmax-weighted sum of the group's keys and values; the
locality-preserving part keeps the raw keys of the query's own group and the previous one. A query
at position t (group G = t // group) attends jointly (one softmax) over
  - the raw keys at positions (G - 1) * group .. t (causal), and
  - the core keys of the groups 0 .. G - 2, which ended before that window starts.
So distant context costs one key per group instead of `group` keys.

Adaptation (said plainly): the paper weighs a group's tokens by the *last token's query* and pools in
the input space; here a learned query per key/value head scores the group's keys (u_h . k_j), so a
group's core depends only on its own keys and is rebuilt from the decoding cache (cached == uncached;
under MoR routing a group pools the keys that exist for that layer application). The implementation
is dense (an explicit score matrix with masks): it shows the semantics, it does not save compute, and
the cache keeps every key. FLOP counting counts full attention. No sliding window, no kv_mode=shared.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.cache import KVView
from haipai_lightning.model.mixers.attention import Attention, KVShare
from haipai_lightning.model.mixers.attention_core import positions_of
from haipai_lightning.model.rope import apply_rope


class CoreContextAttention(Attention):
    """Attention over the local window's raw keys and the earlier groups' pooled core keys."""

    def __init__(self, cfg: ModelConfig, group: int = 16) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            group: tokens per group (the local window is the current and the previous group).
        """
        super().__init__(cfg)
        if group < 1:
            raise ConfigError(f"model.mixer.init_args.group={group} must be >= 1")
        self.group = group
        self.pool_query = nn.Parameter(torch.zeros(cfg.kv_heads, cfg.head_dim))  # u_h (0: mean pooling)

    def cores(self, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k, v (B, Hkv, S, hd), key positions (B|1, S) (-1 = none) -> core keys/values (B, Hkv, NG, hd)
        and which groups have any key (B|1, NG)."""
        n_groups = int(k_pos.max().clamp(min=0)) // self.group + 1
        gid = torch.where(k_pos >= 0, k_pos // self.group, -1)  # (B|1, S)
        member = gid[..., None] == torch.arange(n_groups, device=k.device)  # (B|1, S, NG)
        score = (k @ self.pool_query.to(k.dtype)[None, :, :, None]) / math.sqrt(k.size(-1))  # (B, Hkv, S, 1)
        w = score.masked_fill(~member[:, None], float("-inf")).softmax(2)  # over the group's keys
        w = torch.nan_to_num(w, nan=0.0)  # empty groups
        return w.transpose(-1, -2) @ k, w.transpose(-1, -2) @ v, member.any(1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVView | None = None,
                share: KVShare | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        if share is not None and share.sharing:
            raise ConfigError("CoreContextAttention does not support model.config.kv_mode=shared")
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.wq(x).view(B, T, H, hd), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, Hkv, hd), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, Hkv, hd).transpose(1, 2)
        q_pos = positions_of(T, kv, share, x.device)  # (B|1, T)
        if kv is not None:
            k, v, mask = kv.update(k, v)
            k_pos = kv.key_positions(k.size(2))  # (B, S), -1 = empty
            causal = (k_pos >= 0)[:, None, :] if mask is None else mask[:, 0] & (k_pos >= 0)[:, None, :]
        else:
            k_pos = q_pos if valid is None else torch.where(valid, q_pos.expand(B, T), -1)  # pads pool nothing
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None]  # (1, T, S)
        start = (q_pos // self.group - 1).clamp(min=0) * self.group  # (B|1, T) the local window's first position
        local = causal & (k_pos[:, None, :] >= start[..., None])  # (B|1, T, S)
        ck, cv, present = self.cores(k, v, k_pos)  # (B, Hkv, NG, hd), (B|1, NG)
        ng = torch.arange(ck.size(2), device=x.device)
        core_vis = (ng[None, None] < (q_pos // self.group - 1)[..., None]) & present[:, None, :]  # (B|1, T, NG)
        keys, vals = torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        if Hkv != H:
            keys, vals = keys.repeat_interleave(H // Hkv, 1), vals.repeat_interleave(H // Hkv, 1)
        mask = torch.cat([local.expand(B, -1, -1), core_vis.expand(B, -1, -1)], -1)[:, None]  # (B, 1, T, S + NG)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(hd)
        y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vals  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))
