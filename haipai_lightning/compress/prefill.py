"""The one entry point of context compression: a compressed prefill that decoding continues from.

`compressed_prefill(model, ids, cfg, max_len)` returns a cache (holding only what the method keeps),
the logits of the first new token and a `CompressionRecord`; `generate` then decodes from that cache
exactly as after an ordinary prefill (a narrow interface: decoding itself is untouched).
`engine_prefill` does the same into the rows of the depth-wise batching engine, and
`compressed_token_nll` scores text with compressed contexts for `haipai eval`'s perplexity.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from haipai_lightning.compress.config import CompressConfig, CompressionRecord
from haipai_lightning.compress.evaluator import ehpc_scores
from haipai_lightning.compress.kv_ops import evict, kept_per_app, recompute, select_keep
from haipai_lightning.compress.merge import merged_prefill
from haipai_lightning.compress.reform import reform_scores
from haipai_lightning.config import ConfigError


def token_scores(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig) -> tuple[torch.Tensor, dict]:
    """(B, T) importance of each prompt token under cfg.method (higher = kept first), and method info."""
    B, T = ids.shape
    if cfg.method == "ehpc":
        return ehpc_scores(model, ids, cfg), {}
    if cfg.method == "reform":
        return reform_scores(model, ids, cfg)
    if cfg.method == "recent":  # StreamingLLM (arXiv 2309.17453): sinks + the most recent tokens
        return torch.arange(T, device=ids.device, dtype=torch.float).expand(B, T), {}
    if cfg.method == "random":
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        return torch.rand(B, T, generator=g).to(ids.device), {}
    raise ConfigError(f"compress.method={cfg.method!r} does not select tokens (merge merges them)")


def select(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig) -> tuple[torch.Tensor, dict]:
    """Kept positions (B, K) of the prompt ids (B, T)."""
    if cfg.keep_tokens(ids.size(1)) >= ids.size(1):
        return torch.arange(ids.size(1), device=ids.device).expand_as(ids).clone(), {}
    scores, info = token_scores(model, ids, cfg)
    return select_keep(scores, cfg, pool=cfg.method in ("ehpc", "reform")), info


@torch.no_grad()
def compressed_prefill(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig, max_len: int | None = None):
    """ids (B, T) -> (cache, logits (B, V) of the next token, CompressionRecord)."""
    model.eval()
    B, T = ids.shape
    max_len = max_len or model.cfg.max_seq_len
    t0 = time.perf_counter()
    extra: dict = {}
    ratios: list[float] = []
    if cfg.method == "merge":
        cache, logits, ratios = merged_prefill(model, ids, cfg, max_len)
    else:
        keep, extra = select(model, ids, cfg)
        cache = model.new_cache(max_len)
        logits = (recompute if cfg.mode == "recompute" else evict)(model, ids, keep, cache)
    seconds = time.perf_counter() - t0
    kept = kept_per_app(model, cache)
    rec = CompressionRecord(cfg.method, T, kept, sum(kept) / max(T * len(kept), 1), ratios, seconds,
                            cache.nbytes(), extra)
    return cache, logits, rec


@torch.no_grad()
def engine_prefill(model: torch.nn.Module, prompts: torch.Tensor, cache, cfg: CompressConfig) -> torch.Tensor:
    """The engine's prefill of prompts (G, n) into its rows (`cache[a]` -> RowView): -> last logits (G, V)."""
    if cfg.method == "merge":
        raise ConfigError("compress.method=merge changes the cache's attention (token sizes); the engine's shared "
                          "rows cannot hold it: use ehpc / reform / recent / random with the engine")
    keep, _ = select(model, prompts, cfg)
    return (recompute if cfg.mode == "recompute" else evict)(model, prompts, keep, cache)


@torch.no_grad()
def compressed_token_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, cfg: CompressConfig,
                         tail: int = 32) -> torch.Tensor:
    """Perplexity with compressed contexts: ids (N,) -> NLL (M,) of the scored tokens.

    Each block of seq_len + 1 tokens: its first seq_len - tail tokens are the (compressed) context, the
    last `tail` tokens are predicted through the compressed cache (teacher-forced), as decoding would."""
    if not 0 < tail < seq_len:
        raise ConfigError(f"--compress_tail {tail} must be in [1, seq_len - 1 = {seq_len - 1}]")
    out = []
    ctx = seq_len - tail
    for s in range(0, ids.numel() - seq_len - 1 + 1, seq_len):
        block = ids[None, s : s + seq_len + 1]
        cache, logits, _ = compressed_prefill(model, block[:, :ctx], cfg, seq_len + 1)
        rest = model(block[:, ctx:seq_len], cache=cache).logits[0]  # (tail, V)
        all_logits = torch.cat([logits, rest[:-1]], 0).float()  # predictions of tokens ctx .. seq_len - 1
        out.append(F.cross_entropy(all_logits, block[0, ctx:seq_len], reduction="none"))
        last = rest[-1:].float()  # and of token seq_len
        out.append(F.cross_entropy(last, block[0, seq_len : seq_len + 1], reduction="none"))
    if not out:
        raise ConfigError(f"perplexity with --compress needs at least seq_len + 1 = {seq_len + 1} tokens")
    return torch.cat(out)
