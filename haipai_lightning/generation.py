"""Autoregressive sampling with a KV cache, and loading a model from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from haipai_lightning.checkpoint import CHECKPOINT_KEY, build_component, load_checkpoint_file
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model import HaipaiModel


@dataclass
class SamplingConfig:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int | None = 0


def sample_next(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,), applying temperature, top-k and top-p (nucleus)."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass *before* it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= s.top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: HaipaiModel, input_ids: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + new): one prefill, then one cached step per new token."""
    model.eval()
    total = input_ids.size(1) + s.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({input_ids.size(1)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds "
            f"model.config.max_seq_len={model.cfg.max_seq_len}; shorten the prompt or lower max_new_tokens"
        )
    gen = None
    if s.seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(s.seed)
    cache = model.new_cache(total)
    logits = model(input_ids, cache=cache).logits[:, -1]
    out = [input_ids]
    for _ in range(s.max_new_tokens):
        nxt = sample_next(logits.float(), s, gen)[:, None]  # (B, 1)
        out.append(nxt)
        logits = model(nxt, cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


@torch.no_grad()
def speculative_generate(
    model: HaipaiModel, input_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
    draft: HaipaiModel | None = None, draft_depth: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Greedy speculative decoding; the output equals plain greedy decoding of `model`.

    The draft is, by default, the same model stopped at recursion step `draft_depth` (seed 000,
    stage 5.2: a recursion boundary is a natural point to draft from: the draft shares every
    weight and costs draft_depth/Nr of the shared block), or any smaller model given as `draft`.
    Each round the draft proposes k tokens one by one; the full model scores them in one
    cached forward and keeps the longest prefix it agrees with plus its own next token. Both
    caches are rolled back to the accepted length (`KVCache.truncate`).
    input_ids (1, T) -> ((1, T + max_new_tokens), stats).
    """
    if input_ids.size(0) != 1:
        raise ValueError("speculative_generate decodes one sequence (batch 1)")
    model.eval()
    drafter, depth = (draft.eval(), None) if draft is not None else (model, draft_depth)
    total = input_ids.size(1) + max_new_tokens + k + 1
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens + k exceeds model.config.max_seq_len={model.cfg.max_seq_len}")
    full_cache, draft_cache = model.new_cache(total), drafter.new_cache(total)
    nxt = model(input_ids, cache=full_cache).logits[:, -1].argmax(-1)  # the full model's next token
    drafter(input_ids[:, :-1], cache=draft_cache, max_depth=depth)  # the draft re-reads the last token below
    seq = input_ids[0].tolist()
    pending_draft = [seq[-1]]  # tokens the draft cache has not seen yet
    rounds = proposed = accepted = 0
    while len(seq) - input_ids.size(1) < max_new_tokens:
        rounds += 1
        # 1) draft k tokens; the first one is the full model's own next token (certain)
        props = [int(nxt)]
        feed = pending_draft + props
        for _ in range(k - 1):
            logits = drafter(torch.tensor([feed]), cache=draft_cache, max_depth=depth).logits[:, -1]
            feed = [int(logits.argmax(-1))]
            props.append(feed[0])
        # 2) verify all proposals in one cached forward of the full model
        n0 = len(seq)
        ver = model(torch.tensor([props]), cache=full_cache).logits[0].argmax(-1).tolist()  # (k,)
        m = 0  # accepted draft tokens beyond the first
        while m < k - 1 and props[m + 1] == ver[m]:
            m += 1
        proposed += k - 1
        accepted += m
        keep = props[: m + 1]
        seq += keep
        nxt = torch.tensor(ver[m])
        # 3) roll both caches back to the accepted tokens
        full_cache.truncate(n0 + m + 1)
        draft_seen = min(draft_cache.seen, n0 + m + 1)
        draft_cache.truncate(draft_seen)
        pending_draft = seq[draft_seen:]
    out = torch.tensor([seq[: input_ids.size(1) + max_new_tokens]])
    return out, {"rounds": rounds, "acceptance": accepted / max(proposed, 1),
                 "tokens_per_round": (len(seq) - input_ids.size(1)) / max(rounds, 1)}


def load_model(ckpt_path: str, map_location: str = "cpu") -> tuple[HaipaiModel, Any]:
    """Rebuild a HaipaiModel (and its tokenizer, if saved) from a Haipai checkpoint."""
    ckpt = load_checkpoint_file(ckpt_path, map_location)
    meta = ckpt.get(CHECKPOINT_KEY)
    if meta is None:
        raise ConfigError(f"{ckpt_path!r} is not a Haipai checkpoint (no 'haipai' section)")
    from haipai_lightning.growth_arch import build_model, replay_arch

    # a grown checkpoint's architecture is its base one with the growth log replayed
    model = build_model(replay_arch(meta["arch"], meta.get("growth") or []))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    tokenizer = None
    if meta.get("tokenizer"):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(meta["tokenizer"])
    return model.eval(), tokenizer
