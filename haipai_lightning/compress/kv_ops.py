"""What every selection-based method shares: choose tokens, then recompute or evict.

A method scores the prompt's tokens (B, T); `select_keep` turns scores into the kept positions
(B, K) under the budget (sinks and the last `window` tokens always kept, SnapKV-style max-pooling so
that a kept token brings its neighbours, arXiv 2404.14469). Then either

- `recompute`: the whole model runs on the kept tokens only, at their original RoPE positions, into
  a fresh cache (the prefill of the remaining layers costs K, not T tokens; REFORM's "recompute"
  step, arXiv 2506.01215 section 3.3, and EHPC's compressed prompt, arXiv 2501.12959), or
- `evict`: a full prefill, then every layer application's cache keeps only the kept positions
  (KV-cache eviction; saves decode attention and memory, not prefill time).

`cache.seen` is set to the prompt length either way, so decoding continues at the right positions.
Caches are addressed through `cache[a]` (a `LayerKV` or the engine's `RowView`): the interface the
decoding code already has, nothing of its internals beyond the stored keys, values and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from haipai_lightning.compress.config import CompressConfig


def select_keep(scores: torch.Tensor, cfg: CompressConfig, pool: bool = True) -> torch.Tensor:
    """scores (B, T) -> kept positions (B, K) ascending: sinks + last window + top pooled scores."""
    B, T = scores.shape
    K = cfg.keep_tokens(T)
    if K >= T:
        return torch.arange(T, device=scores.device).expand(B, T).clone()
    s = scores.float()
    if pool and cfg.pool > 1:  # a kept token brings its neighbours (the rest of its phrase)
        s = F.max_pool1d(s[:, None], cfg.pool, stride=1, padding=cfg.pool // 2)[:, 0, :T]
    pos = torch.arange(T, device=scores.device)
    forced = (pos < cfg.sink) | (pos >= T - cfg.window)  # (T,)
    s = s.masked_fill(forced[None], float("inf"))
    keep = s.topk(K, dim=1).indices  # (B, K)
    return keep.sort(dim=1).values


def apps_of(model: torch.nn.Module) -> int:
    return len(model.order)


@torch.no_grad()
def recompute(model: torch.nn.Module, ids: torch.Tensor, keep: torch.Tensor, cache) -> torch.Tensor:
    """Run the model on the kept tokens ids[b, keep[b]] at their positions into `cache`; -> last logits (B, V).

    The last prompt token is always kept (window >= 1), so the returned logits predict the first new token."""
    out = model(ids.gather(1, keep), cache=cache, positions=keep)
    if hasattr(cache, "seen"):
        cache.seen = ids.size(1)
    return out.logits[:, -1]


def prune_layer(kv, member: torch.Tensor) -> None:
    """Keep only the entries of `kv` (a LayerKV, or a RowView of one) whose position is marked in member (B, T).

    Entries at positions >= T (tokens decoded after the prompt) are kept. Kept entries move to the
    front of their row in their order, and the row's length shrinks: the cache holds fewer entries.
    """
    base, rows = (kv.kv, kv.rows) if hasattr(kv, "kv") else (kv, None)
    if base.k is None:
        return
    rows = torch.arange(base.k.size(0), device=base.k.device) if rows is None else rows
    B, T = member.shape
    n = base.lengths[rows]  # (B,)
    S = int(n.max())
    if S == 0:
        return
    pos = base.pos[rows, :S]  # (B, S)
    live = torch.arange(S, device=pos.device)[None] < n[:, None]
    inside = member.gather(1, pos.clamp(0, T - 1)) & (pos >= 0) & (pos < T)
    keep = live & (inside | (pos >= T))
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept entries first, in order
    r = rows[:, None]
    base.k[r, :, torch.arange(S, device=pos.device)[None]] = base.k[r, :, order]
    base.v[r, :, torch.arange(S, device=pos.device)[None]] = base.v[r, :, order]
    base.pos[r, torch.arange(S, device=pos.device)[None]] = pos.gather(1, order)
    base.lengths[rows] = keep.sum(1)


@torch.no_grad()
def evict(model: torch.nn.Module, ids: torch.Tensor, keep: torch.Tensor, cache) -> torch.Tensor:
    """Full prefill of ids (B, T) into `cache`, then every application keeps only `keep` (B, K); -> last logits."""
    logits = model(ids, cache=cache).logits[:, -1]
    member = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device).scatter_(1, keep, True)
    for a in range(apps_of(model)):
        prune_layer(cache[a], member)
    return logits


def kept_per_app(model: torch.nn.Module, cache) -> list[int]:
    """Cache entries of row 0 per layer application (what the budget bounds)."""
    out = []
    for a in range(apps_of(model)):
        kv = cache[a]
        base, rows = (kv.kv, kv.rows) if hasattr(kv, "kv") else (kv, None)
        out.append(0 if base.lengths is None else int(base.lengths[0 if rows is None else rows[0]]))
    return out


def attention_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of queries q (B, H, W, hd) over keys k (B, Hkv, S, hd) -> (B, H, W, S).

    q_pos (B|1, W), k_pos (B|1, S) absolute positions (-1 = no key); a query sees keys at or before it."""
    H, Hkv = q.size(1), k.size(1)
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, 1)
    s = (q @ k.transpose(-1, -2)) / q.size(-1) ** 0.5
    ok = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (k_pos[:, None, None, :] >= 0)
    return s.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0.0)
