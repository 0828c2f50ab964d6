"""Token merging for a causal LM's prefill (ToMe, arXiv 2210.09461, made causal as in QuickMerge++,
arXiv 2508.13204, with per-layer ratios as in arXiv 2509.09955 / 2509.09168).

Before each layer application a, a fraction `merge_ratios[a]` of the prompt tokens (never the last
`window` ones, which the next prediction reads directly) is merged away:

- bipartite soft matching on keys: the tokens alternate into sets A (even slots) and B (odd slots);
  each A token's partner is the most cosine-similar of the next `span` B tokens *after* it, by the
  layer's own keys of its input (pre-RoPE, so the position does not dominate the similarity). The r
  best-matched A tokens merge into their partners. A merged token sits at its partner's (the later)
  position and holds only tokens at or before it, so causal order is kept.
- a merged token is the size-weighted mean of its members' residual streams, and its size s counts
  in attention: every query adds log(s) to its logit ("proportional attention", ToMe section 3), which
  equals attending to s copies of it. That is exact for duplicates (tested).

The caches store each application's (merged) tokens with their log-sizes (`SizedKV`, a LayerKV whose
update returns the additive float mask SDPA takes), so decoding after a merged prefill keeps the
proportional attention. The merge loop runs the layer applications itself, so it needs a model whose
router runs every token at every step (FullRecursion, vanilla Nr=1) without Mixture-of-Depths,
Mamba mixers, sliding windows or KV sharing; others get a ConfigError.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.config import ConfigError
from haipai_lightning.model.cache import KVCache, KVView, LayerKV


class SizedKV(LayerKV):
    """A LayerKV whose entries carry log-sizes: the mask it returns is additive (log s, -inf = hidden)."""

    def __init__(self, max_len: int, rows: int | None = None) -> None:
        super().__init__(max_len, rows)
        self.log_size: torch.Tensor | None = None  # (R, max_len + 1)
        self.pending: torch.Tensor | None = None  # (B, T) log-sizes of the next update's tokens (None = 0)

    def update(self, k, v, positions, valid=None, rows=None):  # noqa: ANN001, ANN201
        B, T = k.size(0), k.size(2)
        first = self.k is None
        keys, vals, mask = super().update(k, v, positions, valid, rows)
        if first:
            self.log_size = keys.new_zeros(self.k.size(0), self.max_len + 1)
        rows_idx = torch.arange(B, device=k.device) if rows is None else rows
        if valid is not None:
            raise ValueError("SizedKV holds merged prompts; routed (padded) updates are not supported")
        new_len = self.lengths[rows_idx]
        dest = (new_len - T)[:, None] + torch.arange(T, device=k.device)[None]  # (B, T)
        self.log_size[rows_idx[:, None], dest] = 0.0 if self.pending is None else self.pending.to(keys.dtype)
        self.pending = None
        S = keys.size(2)
        bias = self.log_size[rows_idx, :S][:, None, None, :]  # (B, 1, 1, S)
        if not bool(bias.any()):  # nothing merged: the plain mask, so the logits equal an unmerged prefill bit for bit
            return keys, vals, mask
        if mask is None:
            mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=k.device)
        return keys, vals, torch.where(mask, bias, float("-inf")).to(keys.dtype)


class SizedCache(KVCache):
    def __init__(self, n_applications: int, max_len: int) -> None:
        super().__init__(n_applications, max_len)
        self.layers = [SizedKV(max_len) for _ in range(n_applications)]


def check_mergeable(model: torch.nn.Module) -> None:
    """ConfigError unless the merge loop can run this model's applications one by one."""
    cfg = model.cfg
    if len(model.mod_gates) or cfg.kv_mode == "shared" or any(
            not hasattr(layer.mixer, "wq") or getattr(layer.mixer, "window", None) is not None or
            getattr(layer.mixer, "routed", False) for layer in model.layers):
        raise ConfigError("compress.method=merge needs plain full attention in every layer, no Mixture-of-Depths "
                          "and kv_mode recursion_wise; use ehpc / reform for this model")
    h = torch.zeros(1, 2, cfg.d_model, device=model.embed.weight.device)
    seen: list[bool] = []

    def run(x, sel):  # noqa: ANN001, ANN202
        seen.append(sel.is_full)
        return x + 1.0

    for r in range(model.schedule.n_recursions if model.schedule.cycle else 0):
        out = model.router.step(r, h, run, {}, [])
        if not all(seen) or not torch.equal(out, h + 1.0):
            raise ConfigError(f"compress.method=merge needs a router that runs every token at every recursion step "
                              f"(FullRecursion); model.router {type(model.router).__name__} routes: use ehpc / reform")


def merge_step(h: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, logs: torch.Tensor, r: int, protect: int,
               span: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge r tokens of each row away: h (B, T, D), keys (B, T, dk), pos / logs (B, T) -> shorter (B, T - r, ...).

    Only slots < T - protect take part; A = even slots, B = odd slots; an A token merges into the most
    similar of the next `span` B tokens after it (a later slot), the r best matches of each row merge."""
    B, T, D = h.shape
    n = T - protect
    nA = n // 2  # A slots 0, 2, .., 2(nA-1); B slots 1, 3, .., 2nA-1 (all before the protected tail)
    r = min(r, nA)
    if r <= 0:
        return h, pos, logs
    kn = F.normalize(keys.float(), dim=-1)
    a_idx = torch.arange(nA, device=h.device) * 2  # (nA,)
    offs = torch.arange(span, device=h.device)  # candidate partners: B slots a+1, a+3, ...
    cand = a_idx[:, None] + 1 + 2 * offs[None]  # (nA, span)
    ok = cand < 2 * nA
    cand = cand.clamp(max=2 * nA - 1)
    sim = (kn[:, a_idx, None, :] * kn[:, cand, :]).sum(-1).masked_fill(~ok[None], -2.0)  # (B, nA, span)
    best, arg = sim.max(-1)  # (B, nA)
    partner = cand[None].expand(B, -1, -1).gather(2, arg[..., None])[..., 0]  # (B, nA) slot of the partner
    chosen = best.topk(r, dim=1).indices  # (B, r) which A tokens merge
    src = a_idx[chosen]  # (B, r) their slots
    dst = partner.gather(1, chosen)  # (B, r)
    w = logs.exp()  # sizes (B, T)
    bi = torch.arange(B, device=h.device)[:, None]
    num = h * w[..., None]
    num = num.index_put((bi.expand(-1, r), dst), num[bi, src], accumulate=True)
    w2 = w.index_put((bi.expand(-1, r), dst), w[bi, src], accumulate=True)
    gone = torch.zeros(B, T, dtype=torch.bool, device=h.device)
    gone[bi, src] = True
    stay = (~gone).nonzero()[:, 1].view(B, T - r)  # (B, T - r) surviving slots, in order
    h2 = (num / w2[..., None]).gather(1, stay[..., None].expand(-1, -1, D)).to(h.dtype)
    return h2, pos.gather(1, stay), w2.gather(1, stay).log()


@torch.no_grad()
def merged_prefill(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig, max_len: int
                   ) -> tuple[SizedCache, torch.Tensor, list[float]]:
    """Prefill ids (B, T) with merging before each application -> (cache, last logits (B, V), applied ratios)."""
    check_mergeable(model)
    n_apps = len(model.order)
    ratios = list(cfg.merge_ratios or [0.0] * n_apps)
    if len(ratios) != n_apps:
        raise ConfigError(f"compress.merge_ratios has {len(ratios)} entries; the model has {n_apps} layer applications")
    B, T = ids.shape
    cache = SizedCache(n_apps, max_len)
    h = model.embed(ids)
    pos = torch.arange(T, device=ids.device).expand(B, T)
    logs = torch.zeros(B, T, device=ids.device)
    applied = []
    for a, (layer_id, _) in enumerate(model.order):
        layer = model.layers[layer_id]
        Tn = h.size(1)
        r = int(math.floor(ratios[a] * max(Tn - cfg.window, 0)))
        while r > 0 and h.size(1) > cfg.window + 1:  # rounds of bipartite matching until r tokens are gone
            mixer = layer.mixer
            kx = mixer.wk(layer.mixer_norm(h))  # (B, T, Hkv*hd) this layer's keys, pre-RoPE
            before = h.size(1)
            h, pos, logs = merge_step(h, kx, pos, logs, r, cfg.window)
            r -= before - h.size(1)
            if h.size(1) == before:
                break
        applied.append(1.0 - h.size(1) / Tn)
        cos, sin = model.rope(pos)
        cache[a].pending = logs
        h = layer(h, cos, sin, KVView(cache[a], pos))
    cache.seen = T
    logits = model.head(model.norm(h))[:, -1]  # over every row, as the model does: bit-equal when nothing merges
    return cache, logits, applied

