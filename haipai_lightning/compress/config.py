"""Typed configuration and telemetry records of context compression (issue #21).

One `CompressConfig` names the method and the KV budget; the method-specific knobs sit beside it
with defaults. `CompressionRecord` is what a compressed prefill reports (kept tokens per layer
application, merge ratios, timings, KV bytes) for telemetry and the benchmark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from haipai_lightning.config import ConfigError

METHODS = ("ehpc", "reform", "merge", "recent", "random")


@dataclass
class CompressConfig:
    """Args:
        method: ehpc (evaluator heads, arXiv 2501.12959), reform (recurrent chunked prefill + gather +
            recompute, arXiv 2506.01215), merge (token merging in prefill, arXiv 2508.13204 / 2509.09168),
            recent (StreamingLLM sink + window, arXiv 2309.17453) or random (baseline).
        budget: KV budget: a fraction of the prompt (<= 1.0) or a number of tokens (> 1).
        sink: first tokens always kept (attention sinks).
        window: last prompt tokens always kept (the question; the "observation window" whose queries score).
        pool: max-pool kernel over token scores (SnapKV-style), so a kept token brings its neighbours.
        mode: recompute (run the model on the kept tokens only: prefill saving) or evict (full prefill,
            then drop the other tokens' keys/values from every layer application's cache).
        evaluator_apps: layer applications the evaluator pass runs (EHPC: early layers only).
        heads: evaluator heads as (application, query head) pairs; None = every head of evaluator_apps
            (`evaluator.calibrate_heads` picks them on calibration data).
        chunk: REFORM chunk length in tokens.
        embed_app: REFORM: the application whose output hidden states are the token embeddings for the
            cosine-similarity gather (the recurrent pass exits early after it).
        merge_ratios: per layer application, the fraction of its (unprotected) tokens merged away before it
            (None: all 0, nothing merged; `merge_tune.tune_ratios` chooses them with optuna).
        seed: random baseline's seed.
    """

    method: str = "ehpc"
    budget: float = 0.25
    sink: int = 4
    window: int = 16
    pool: int = 7
    mode: str = "recompute"
    evaluator_apps: int = 2
    heads: list[tuple[int, int]] | None = None
    chunk: int = 256
    embed_app: int = 0
    merge_ratios: list[float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"compress.method={self.method!r}: use one of {', '.join(METHODS)}")
        if not self.budget > 0:
            raise ConfigError(f"compress.budget={self.budget} must be > 0 (a fraction <= 1 or a number of tokens)")
        if self.mode not in ("recompute", "evict"):
            raise ConfigError(f"compress.mode={self.mode!r}: use recompute or evict")
        if self.sink < 0 or self.window < 1:
            raise ConfigError(f"compress.sink={self.sink} must be >= 0 and compress.window={self.window} >= 1")
        if self.chunk < 1 or self.pool < 1 or self.evaluator_apps < 1:
            raise ConfigError("compress.chunk, compress.pool and compress.evaluator_apps must be >= 1")
        if self.merge_ratios is not None and not all(0.0 <= r < 1.0 for r in self.merge_ratios):
            raise ConfigError(f"compress.merge_ratios={self.merge_ratios}: each ratio must be in [0, 1)")

    def keep_tokens(self, T: int) -> int:
        """Tokens of a T-token prompt the budget keeps (at least the window, at most T)."""
        k = round(self.budget * T) if self.budget <= 1.0 else int(self.budget)
        return max(min(k, T), min(self.window, T))


@dataclass
class CompressionRecord:
    """Telemetry of one compressed prefill."""

    method: str
    context: int  # prompt tokens
    kept: list[int] = field(default_factory=list)  # cache entries per layer application (row 0)
    kept_fraction: float = 1.0  # mean over applications of kept / context
    merge_ratios: list[float] = field(default_factory=list)  # merge: tokens merged away before each application
    prefill_seconds: float = 0.0
    kv_bytes: int = 0  # keys/values stored after the prefill
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
