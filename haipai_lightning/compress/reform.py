"""REFORM-style recurrent chunked prefill (Song et al., "Compress, Gather, and Recompute", arXiv 2506.01215).

What of the paper is implemented here (section numbers of the paper):

- 3.1 Compress (recurrent chunked forward): the prompt runs in chunks of `chunk` tokens; each chunk
  attends to a *compressed* cache carried from the earlier chunks, and after each chunk every layer
  application's cache is cut back to `keep_tokens` entries by the attention the chunk's last `window`
  queries pay them (sinks and recent tokens always stay; the paper uses the same attention-score
  eviction, H2O / SnapKV-like). Early exit: the recurrent pass runs only up to application
  `embed_app`, the layer whose states serve as embeddings; deeper layers never see the full prompt.
- 3.2 Gather: the hidden state of every token at `embed_app` is kept (one vector per token, not a
  K/V per layer); the last `window` tokens (the question) are compared with them by cosine
  similarity, and the top tokens (max over the question tokens, max-pooled over neighbours, plus sinks
  and the window) fill the budget.
- 3.3 Recompute: the model runs once on the gathered tokens at their original positions
  (kv_ops.recompute), so every layer application's cache is rebuilt from the kept tokens only.

Not implemented: the paper's choice of specific heads' Q/K/V states as embeddings by a calibration
search (the residual stream at one layer is used), and its multi-round gather with span expansion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.compress.kv_ops import attention_scores, prune_layer, select_keep
from haipai_lightning.compress.probe import StopForward, hooks, project_qk, query_positions
from haipai_lightning.config import ConfigError


@torch.no_grad()
def reform_scores(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig) -> tuple[torch.Tensor, dict]:
    """ids (B, T) -> (token scores (B, T), info): the recurrent compressed pass, then the cosine gather."""
    emb, info = recurrent_pass(model, ids, cfg)
    qe = F.normalize(emb[:, -min(cfg.window, ids.size(1)):], dim=-1)  # (B, W, D) the question's embeddings
    return (qe @ F.normalize(emb, dim=-1).transpose(1, 2)).amax(1), info  # (B, T) best cosine per token


@torch.no_grad()
def recurrent_pass(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig) -> tuple[torch.Tensor, dict]:
    """ids (B, T) -> (embeddings (B, T, D) at embed_app, info): chunk by chunk over a compressed carried cache.

    Causal: a token's embedding depends only on the tokens before it (its chunk, and what the evictions
    after earlier chunks -- decided by those chunks' own queries -- kept)."""
    B, T = ids.shape
    n_apps = len(model.order)
    if not 0 <= cfg.embed_app < n_apps:
        raise ConfigError(f"compress.embed_app={cfg.embed_app} must be in [0, {n_apps - 1}] (a layer application)")
    M = cfg.keep_tokens(T)  # carried cache entries per application
    last = cfg.embed_app
    cache = model.new_cache(T)
    emb = torch.zeros(B, T, model.cfg.d_model, device=ids.device)
    queries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # app -> (q of the chunk's last window, positions)
    start = 0

    def on_mixer(a, mixer, x, cos, sin, kv, share):  # noqa: ANN001, ANN202
        if a <= last:
            q, _ = project_qk(mixer, x, cos, sin)
            W = min(cfg.window, x.size(1))
            queries[a] = (q[:, :, -W:], (start + torch.arange(x.size(1), device=x.device))[None, -W:])

    def on_block(a, h):  # noqa: ANN001, ANN202
        if a == last:
            emb[:, start : start + h.size(1)] = h
            raise StopForward

    peak = 0
    with hooks(model, on_mixer, on_block) as counter:
        for start in range(0, T, cfg.chunk):
            end = min(start + cfg.chunk, T)
            counter["mixer"] = counter["block"] = 0
            try:
                model(ids[:, start:end], cache=cache)
            except StopForward:
                pass
            cache.seen = end
            peak = max(peak, max(int(cache[a].lengths.max()) for a in range(last + 1)))
            for a in range(last + 1):  # compress the carried cache of every application the pass ran
                _evict_to(cache[a], queries[a], M, cfg, T)
    return emb, {"peak_carried_entries": peak, "embed_app": last, "chunk": cfg.chunk}


def _evict_to(kv, q_info: tuple[torch.Tensor, torch.Tensor], M: int, cfg: CompressConfig, T: int) -> None:
    """Cut a LayerKV back to M entries per row by the attention of the chunk's last queries."""
    k, _, k_pos = kv.read()  # (B, Hkv, S, hd), (B, S)
    if k.size(2) <= M:
        return
    q, q_pos = q_info
    att = attention_scores(q, k, q_pos, k_pos).mean((1, 2))  # (B, S)
    scores = torch.full((k.size(0), T), float("-inf"), device=k.device)
    scores.scatter_(1, k_pos.clamp(min=0), att.masked_fill(k_pos < 0, float("-inf")))
    # the carried cache: sinks, the chunk's most recent tokens and the top entries (no pooling: entries only)
    keep_cfg = CompressConfig(method="recent", budget=M, sink=cfg.sink, window=min(cfg.window, M), pool=1)
    recent_end = int(k_pos.max()) + 1
    keep = select_keep(scores[:, :recent_end], keep_cfg, pool=False)  # (B, M) among positions < recent_end
    member = torch.zeros(k.size(0), T, dtype=torch.bool, device=k.device).scatter_(1, keep, True)
    prune_layer(kv, member)


@torch.no_grad()
def calibrate_embed_app(model: torch.nn.Module, ids: torch.Tensor, important: torch.Tensor, cfg: CompressConfig) -> int:
    """The layer application whose embeddings gather the important tokens best (REFORM chooses its embedding
    states by retrieval quality on calibration data): recall of important (N, T) among the kept tokens."""
    best, best_recall = 0, -1.0
    for a in range(len(model.order)):
        c = CompressConfig(**{**cfg.__dict__, "method": "reform", "embed_app": a})
        scores, _ = reform_scores(model, ids, c)
        keep = select_keep(scores, c)
        recall = float(important.gather(1, keep).sum() / important.sum())
        if recall > best_recall:
            best, best_recall = a, recall
    return best
