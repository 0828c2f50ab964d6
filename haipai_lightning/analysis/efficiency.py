"""Efficiency report of a model: parameters, training FLOPs per token, decode speed, KV bytes, peak memory.

What each figure is:
- unique / effective parameters: stored weights / weights a token meets running every recursion.
- training FLOPs per token: `flops.training_flops` of one training-mode forward on a (batch, seq_len)
  block, divided by its tokens: what the routers really spent (a token that exits after one
  recursion costs one pass through the shared block), 3 x forward matmul FLOPs.
- decode tokens/s: greedy KV-cached decoding after a prefill (`model.new_cache`), new tokens over
  the time of the cached steps only (the prefill is timed apart).
- KV-cache bytes: keys/values stored after prefill + decoding (`KVCache.nbytes`: MoR caches only
  what each recursion step's tokens left), and the same tokens in a cache where every token ran
  every attention application (vanilla); their ratio is MoR's KV saving ((Nr+1)/2Nr, 1/Nr in theory).
- peak memory: on CUDA the peak allocated bytes of the decode; on CPU the process's peak resident
  set (ru_maxrss), which includes Python and the libraries -- an upper bound, not the model alone.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from haipai_lightning.analysis.flops import forward_flops, training_flops


@dataclass
class EfficiencyReport:
    unique_params: int
    effective_params: int
    param_bytes: int
    train_flops_per_token: float
    forward_flops_per_token: float  # training-mode routing, forward only
    flops_seq_len: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    decode_batch: int
    prompt_tokens: int
    new_tokens: int
    kv_cache_bytes: int
    kv_cache_bytes_vanilla: int
    kv_ratio: float
    peak_memory_bytes: int
    peak_memory_kind: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(metric, formatted value) for a printed table."""
        mb = lambda b: f"{b / 2**20:.3f} MiB"  # noqa: E731
        return [
            ("unique parameters", f"{self.unique_params:,}"),
            ("effective parameters", f"{self.effective_params:,}"),
            ("parameter memory", mb(self.param_bytes)),
            (f"training FLOPs / token (T={self.flops_seq_len})", f"{self.train_flops_per_token:.4g}"),
            (f"decode tokens/s (batch {self.decode_batch})", f"{self.decode_tokens_per_s:.1f}"),
            ("prefill tokens/s", f"{self.prefill_tokens_per_s:.1f}"),
            (f"KV cache ({self.prompt_tokens}+{self.new_tokens} tokens x {self.decode_batch})", mb(self.kv_cache_bytes)),
            ("KV cache if every token ran every layer", mb(self.kv_cache_bytes_vanilla)),
            ("KV ratio", f"{self.kv_ratio:.4f}"),
            (f"peak memory ({self.peak_memory_kind})", mb(self.peak_memory_bytes)),
        ]


def _vanilla_kv_bytes(model: torch.nn.Module, tokens: int, element_size: int) -> int:
    """Keys/values of `tokens` tokens in every attention application (no routing, no sharing)."""
    cfg = model.cfg
    n_attn = sum(model.layers[i].mixer.cache_kind == "kv" for i, _ in model.order)  # layers keeping keys/values
    return n_attn * 2 * cfg.kv_heads * cfg.head_dim * element_size * tokens


@torch.no_grad()
def efficiency_report(model: torch.nn.Module, ids: torch.Tensor | None = None, seq_len: int | None = None,
                      batch: int = 4, decode_batch: int = 1, prompt_tokens: int | None = None,
                      new_tokens: int = 64) -> EfficiencyReport:
    """Measure `model` (a HaipaiModel). ids (N,): real tokens for the FLOP count's routing and the prompt."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    T = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    n = model.num_parameters()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def tokens(b: int, t: int, offset: int = 0) -> torch.Tensor:
        if ids is not None and ids.numel() >= offset + b * t:
            return ids[offset : offset + b * t].view(b, t).to(dev)
        return torch.randint(0, cfg.vocab_size, (b, t), device=dev, generator=torch.Generator(dev).manual_seed(0))

    # training FLOPs: routers decide as in training (top-k capacities), so run in train mode -- on a
    # copy: a train-mode forward moves state (a token-choice MoE's loss-free balancing bias)
    was_training = model.training
    x = tokens(batch, T)
    with torch.no_grad():
        records = copy.deepcopy(model).train()(x).records
    train_f = training_flops(model, records, batch, T) / (batch * T)
    fwd_f = forward_flops(model, records, batch, T) / (batch * T)
    model.eval()

    new = max(1, min(new_tokens, cfg.max_seq_len // 2))
    P = max(1, min(prompt_tokens or cfg.max_seq_len // 4, cfg.max_seq_len - new))
    prompt = tokens(decode_batch, P)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)

    def decode(steps: int) -> tuple[float, float, Any]:
        cache = model.new_cache(P + steps)
        t0 = time.perf_counter()
        nxt = model(prompt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)  # (b, 1)
        if dev.type == "cuda":  # the prefill's kernels end before the decode clock starts
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        for _ in range(steps):
            nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return t1 - t0, time.perf_counter() - t1, cache

    decode(min(4, new))  # warm-up: first-call allocations and lazy initialisation
    t_pre, t_dec, cache = decode(new)
    model.train(was_training)
    kv = cache.nbytes()
    elt = next(model.parameters()).element_size()
    vanilla = _vanilla_kv_bytes(model, decode_batch * (P + new), elt)
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "CUDA allocated"
    else:  # Linux reports KiB, macOS bytes
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, kind = rss if sys.platform == "darwin" else rss * 1024, "process peak RSS"
    return EfficiencyReport(
        unique_params=n["unique"], effective_params=n["effective"], param_bytes=param_bytes,
        train_flops_per_token=train_f, forward_flops_per_token=fwd_f, flops_seq_len=T,
        decode_tokens_per_s=decode_batch * new / t_dec, prefill_tokens_per_s=decode_batch * P / t_pre,
        decode_batch=decode_batch, prompt_tokens=P, new_tokens=new, kv_cache_bytes=kv,
        kv_cache_bytes_vanilla=vanilla, kv_ratio=kv / vanilla if vanilla else float("nan"),
        peak_memory_bytes=int(peak), peak_memory_kind=kind,
    )
