"""Next-token sampling: temperature, top-k and top-p (nucleus, Holtzman et al. 2019, arXiv 1904.09751)."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from haipai_lightning.config import ConfigError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50  # None or 0 = every token
    top_p: float | None = 0.95  # None or 1 = off; in (0, 1]
    seed: int | None = 0

    def __post_init__(self) -> None:
        def bad(field: str, value: object, rule: str) -> ConfigError:
            return ConfigError(f"--{field} {value!r} {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 = greedy)")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise bad("top_k", self.top_k, "must be an integer >= 1 (null or 0 = every token)")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise bad("top_p", self.top_p, "must be in (0, 1] (null or 1 = off); 0 would keep no token")


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
