"""Autoregressive generation with a KV cache: one prefill, then one cached step per new token."""

from __future__ import annotations

import torch

from haipai_lightning.decode.sampling import SamplingConfig, sample_next
from haipai_lightning.model.decoder import HaipaiModel


@torch.no_grad()
def generate(model: HaipaiModel, input_ids: torch.Tensor, s: SamplingConfig, compress=None,
             records: list | None = None) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + new): one prefill, then one cached step per new token.

    compress: a `compress.config.CompressConfig` (issue #21): the prefill keeps only what the method keeps
    (evaluator heads, REFORM, token merging, sink + window, random) and decoding continues from that cache;
    its `CompressionRecord` is appended to `records` when given."""
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
    if compress is not None:
        from haipai_lightning.compress.prefill import compressed_prefill

        cache, logits, rec = compressed_prefill(model, input_ids, compress, total)
        if records is not None:
            records.append(rec)
    else:
        cache = model.new_cache(total)
        logits = model(input_ids, cache=cache).logits[:, -1]
    out = [input_ids]
    for _ in range(s.max_new_tokens):
        nxt = sample_next(logits.float(), s, gen)[:, None]  # (B, 1)
        out.append(nxt)
        logits = model(nxt, cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)
