"""Autoregressive generation with a KV cache: one prefill, then one cached step per new token."""

from __future__ import annotations

import torch

from haipai_lightning.decode.hooks import Forcing, TokenHook
from haipai_lightning.decode.sampling import SamplingConfig, sample_next
from haipai_lightning.decode.static import StaticDecoder
from haipai_lightning.model.decoder import HaipaiModel


@torch.no_grad()
def generate(model: HaipaiModel, input_ids: torch.Tensor, s: SamplingConfig,
             budget: float | torch.Tensor | None = None, hook: TokenHook | None = None, compile: bool = False,
             fast: bool = True, compress=None, records: list | None = None) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + new): one prefill, then one cached step per new token.
    `budget`: the compute of each sequence in the router's budget unit (model/budget.py; None = the
    router's budget head chooses from the prompt, if it has one). `hook` (decode/hooks.py) may force
    tokens after any token, e.g. the LMLM fact lookup.

    Dense models (every token runs every layer, no budget) decode through `StaticDecoder` (static KV
    buffers, fused projections; `compile=True` compiles its step); others, or fast=False, through the
    model's general cached forward (the reference path).

    compress: a `compress.config.CompressConfig` (issue #21): the prefill keeps only what the method keeps
    (evaluator heads, REFORM, token merging, sink + window, random) and decoding continues from that cache
    (general path); its `CompressionRecord` is appended to `records` when given.
    """
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
        step = lambda ids: model(ids, cache=cache, budget=budget).logits[:, -1]  # noqa: E731
    elif fast and budget is None and StaticDecoder.unsupported(model) is None:
        dec = StaticDecoder.cached(model, input_ids.size(0), total, compile=compile)
        logits, step = dec.prefill(input_ids), dec.step
    else:
        cache = model.new_cache(total)
        step = lambda ids: model(ids, cache=cache, budget=budget).logits[:, -1]  # noqa: E731
        logits = step(input_ids)
    out = [input_ids]
    if hook is not None:
        forcing = [Forcing(hook) for _ in range(input_ids.size(0))]
        prompts, made = input_ids.tolist(), [[] for _ in forcing]
        for f, p in zip(forcing, prompts):  # the prompt itself may end in a call
            f.after(p, [])
    for _ in range(s.max_new_tokens):
        nxt = sample_next(logits.float(), s, gen)[:, None]  # (B, 1)
        if hook is not None:  # forced tokens replace the sampled ones
            nxt = torch.tensor([[f.take(t)] for f, t in zip(forcing, nxt[:, 0].tolist())], device=nxt.device)
            for f, p, m, t in zip(forcing, prompts, made, nxt[:, 0].tolist()):
                m.append(t)
                f.after(p, m)
        out.append(nxt)
        logits = step(nxt)
    return torch.cat(out, dim=1)
