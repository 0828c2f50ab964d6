"""ModelConfig: the typed description of a Haipai decoder, plus named size presets.

The numbers describe the *effective* (unrolled) model: `n_layers` is the depth a
token travels when it runs every recursion. Parameter sharing then decides how
many of those layers are unique (see `model/schedule.py`).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

Sharing = Literal["cycle", "sequence", "middle_cycle", "middle_sequence"]
SHARING_STRATEGIES: tuple[str, ...] = ("cycle", "sequence", "middle_cycle", "middle_sequence")
KVMode = Literal["recursion_wise", "shared"]
MIXER_LETTERS: dict[str, str] = {"A": "attention", "M": "Mamba"}


class ConfigError(ValueError):
    """A user-fixable configuration mistake; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Architecture of a Llama-style recursive decoder."""

    vocab_size: int = 8192
    """Vocabulary size of the embedding and output head (linked to data.vocab_size by the CLI)."""
    d_model: int = 256
    """Hidden size."""
    n_layers: int = 5
    """Effective depth: layers a token passes through when it runs every recursion."""
    n_heads: int = 4
    """Attention query heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (None = n_heads); must divide n_heads."""
    ffn_hidden: int | None = None
    """SwiGLU hidden size (None = 8/3 * d_model rounded up to a multiple of 64)."""
    max_seq_len: int = 256
    """Longest sequence RoPE tables are built for (training blocks and generation)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    sharing: Sharing = "middle_cycle"
    """Parameter sharing across recursions: cycle, sequence, middle_cycle or middle_sequence."""
    n_recursions: int = 1
    """Recursion count Nr in 1..4 (1 = vanilla Transformer, no sharing)."""
    kv_mode: KVMode = "recursion_wise"
    """MoR attention across recursion steps: recursion_wise (step r attends among the tokens active at r)
    or shared (steps r>1 reuse step 1's keys/values of all tokens; only active tokens form queries)."""
    mod_capacity: float = 0.0
    """Mixture-of-Depths on the unshared layers: fraction of tokens each MoD layer processes (0 = off)."""
    mod_every: int = 2
    """Every mod_every-th unshared layer (the 2nd, 4th, ...) is a Mixture-of-Depths layer."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    mixer_pattern: str | None = None
    """Hybrid stack: one letter per unique layer, cycled (A = attention / the injected mixer, M = Mamba),
    e.g. "AAM"; shared layers keep their mixer at every recursion step (None = every layer A)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def mixer_letter(self, layer: int) -> str:
        """Mixer of unique layer `layer`: mixer_pattern cycled over the unique layers ("A" without a pattern)."""
        return self.mixer_pattern[layer % len(self.mixer_pattern)] if self.mixer_pattern else "A"

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 64 * -(-int(8 * self.d_model / 3) // 64)  # ceil to a multiple of 64

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError (one line, naming the field and the fix) for impossible shapes."""
        for f in fields(self):  # types first: a config read from a file may hold anything
            v, t = getattr(self, f.name), str(f.type)
            ok = (v is None and "None" in t) or (
                isinstance(v, numbers.Integral) and not isinstance(v, bool) if t.startswith("int") else
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) if t.startswith("float") else
                isinstance(v, bool) if t.startswith("bool") else isinstance(v, str))
            if not ok:
                raise ConfigError(f"model.config.{f.name}={v!r} must be of type {t}")
        if self.n_heads < 1 or self.d_model % self.n_heads:
            raise ConfigError(
                f"model.config.n_heads={self.n_heads} does not divide model.config.d_model={self.d_model}; "
                f"choose n_heads among the divisors of d_model (e.g. {_divisors_near(self.d_model, self.n_heads)})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"model.config.d_model/n_heads = {self.head_dim} is odd; RoPE needs an even head_dim: "
                "change d_model or n_heads"
            )
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.config.n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                "use a divisor of n_heads (or null for n_heads)"
            )
        if self.sharing not in SHARING_STRATEGIES:
            raise ConfigError(
                f"model.config.sharing={self.sharing!r} is unknown; use one of {', '.join(SHARING_STRATEGIES)}"
            )
        if not 1 <= self.n_recursions <= 4:
            raise ConfigError(f"model.config.n_recursions={self.n_recursions} must be in 1..4")
        middle = self.sharing.startswith("middle")
        shareable = self.n_layers - 2 if middle and self.n_recursions > 1 else self.n_layers
        if self.n_layers < 1 or shareable < self.n_recursions or shareable % self.n_recursions:
            need = "n_layers - 2" if middle and self.n_recursions > 1 else "n_layers"
            ok = [n for n in range(max(1, self.n_layers - 6), self.n_layers + 7)
                  if (n - 2 if middle else n) >= self.n_recursions and (n - 2 if middle else n) % self.n_recursions == 0]
            raise ConfigError(
                f"model.config.n_layers={self.n_layers} cannot hold n_recursions={self.n_recursions} with "
                f"sharing={self.sharing}: {need} must be a positive multiple of n_recursions; "
                f"use n_layers in {ok[:4]} or change n_recursions"
            )
        if self.kv_mode not in ("recursion_wise", "shared"):
            raise ConfigError(f"model.config.kv_mode={self.kv_mode!r}: use recursion_wise or shared")
        if not 0.0 <= self.mod_capacity <= 1.0 or self.mod_every < 1:
            raise ConfigError(
                f"model.config.mod_capacity={self.mod_capacity} must be in [0, 1] and mod_every={self.mod_every} >= 1"
            )
        if self.mixer_pattern is not None and (not self.mixer_pattern or set(self.mixer_pattern) - set(MIXER_LETTERS)):
            raise ConfigError(
                f"model.config.mixer_pattern={self.mixer_pattern!r} must be a non-empty string of the letters "
                f"{', '.join(f'{k} ({v})' for k, v in MIXER_LETTERS.items())}, e.g. \"AAM\" (or null)"
            )
        for name in ("vocab_size", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.config.{name} must be positive, got {getattr(self, name)}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ConfigError(f"model.config.ffn_hidden={self.ffn_hidden} must be >= 1 (null = 8/3 d_model rounded "
                              "up to a multiple of 64)")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.config.{name}={getattr(self, name)} must be > 0")

    # ------------------------------------------------------------ presets & io
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"model.config must be a mapping of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model.config keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(**d)


def _divisors_near(n: int, k: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - k))[:3]


# Presets. `tiny` is the CPU quickstart; `135m` and `360m` are the SmolLM shapes the
# MoR paper starts from (vanilla, Nr=1: set n_recursions and sharing on top).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=4096, d_model=192, n_layers=5, n_heads=4, n_kv_heads=2,
                        ffn_hidden=512, max_seq_len=256, n_recursions=3, sharing="middle_cycle"),
    "135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                        ffn_hidden=1536, max_seq_len=2048, rope_theta=10000.0),
    "360m": ModelConfig(vocab_size=49152, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5,
                        ffn_hidden=2560, max_seq_len=2048, rope_theta=10000.0),
}


class TrainingDiverged(ConfigError):
    """The training loss or gradients became NaN / inf; the message names the step and what to try."""
