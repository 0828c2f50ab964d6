"""Post-training quantization of a HaipaiModel: methods, and the one function that applies them.

A method is a `QuantSpec`: weight bits (int8 per-channel / int4 group-wise, round-to-nearest,
really stored low-bit: see qtensor.py), activation bits (8 = real dynamic int8 x int8 matmuls;
4 = per-token fake quantization, W4A4 as in QuaRot, arXiv 2404.00456, simulated), KV-cache bits (kv_cache.py),
and whether the weights are first rotated (rotation.py: norm gains fused, randomised Hadamard
rotation of the residual stream and of values per head; with 4-bit activations also QuaRot's
online Hadamard before every SwiGLU down projection).

Quantized: every nn.Linear of every block's mixer and MLP (attention q/k/v/o, SwiGLU, Mamba's
projections) and, with `embeddings`, the embedding table and the head (one shared low-bit table
when they are tied). Kept in fp32: norms, routers and MoD gates (a few D-vectors whose
decisions are thresholds), Mamba's dt / A / D / conv. Refused: routed MLPs (MoE / MoT experts
are stacked (E, D, H) parameters, not linears).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from haipai_lightning.config import ConfigError
from haipai_lightning.quant.hadamard import has_hadamard
from haipai_lightning.quant.kv_cache import QuantKVCacheFactory
from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.quant.layers import QEmbedding, QLinear
from haipai_lightning.quant.qtensor import QuantizedWeight
from haipai_lightning.quant.rotation import check_supported, rotate_model


@dataclass
class QuantSpec:
    """What to quantize and how (see the module docstring)."""

    weights: int | None = None
    """Weight bits: 8 (per-channel symmetric), 4 (group-wise asymmetric) or None (fp32)."""
    activations: int | None = None
    """Activation bits at every quantized linear's input: 8 (dynamic int8, needs weights=8), 4 (simulated)."""
    kv: int | None = None
    """KV-cache bits: 8, 4 or None."""
    rotate: bool = False
    """Fuse norms and rotate (QuaRot / SpinQuant style randomised Hadamard) before quantizing."""
    group_size: int = 32
    """Input channels per int4 scale/zero group."""
    embeddings: bool = True
    """Quantize the embedding table and the head as well."""
    seed: int = 0
    """Seed of the random Hadamard signs."""

    def __post_init__(self) -> None:
        for name, ok in (("weights", (None, 4, 8)), ("activations", (None, 4, 8)), ("kv", (None, 4, 8))):
            if getattr(self, name) not in ok:
                raise ConfigError(f"quantization {name}={getattr(self, name)!r}: use 8, 4 or null")
        if self.activations is not None and self.weights is None:
            raise ConfigError("quantization activations needs weights too (W8A8 or W4A4): set weights")
        if self.activations == 8 and self.weights != 8:
            raise ConfigError("quantization activations=8 runs int8 x int8 matmuls: it needs weights=8")
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"quantization group_size={self.group_size} must be an even number >= 2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ConfigError(f"unknown quantization keys {sorted(set(d) - known)}; valid: {sorted(known)}")
        return cls(**d)


METHODS: dict[str, QuantSpec] = {
    "fp32": QuantSpec(),
    "int8": QuantSpec(weights=8),
    "int8_dynamic": QuantSpec(weights=8, activations=8),
    "int4": QuantSpec(weights=4),
    "int4_rotated": QuantSpec(weights=4, rotate=True),
    "kv8": QuantSpec(kv=8),
    "kv4": QuantSpec(kv=4),
    "w4a4": QuantSpec(weights=4, activations=4),
    "w4a4_rotated": QuantSpec(weights=4, activations=4, rotate=True),
    "w4a4kv4": QuantSpec(weights=4, activations=4, kv=4, rotate=True),
}
"""Named methods (`haipai quantize --method NAME`)."""


def get_method(name: str | QuantSpec) -> QuantSpec:
    if isinstance(name, QuantSpec):
        return name
    if name not in METHODS:
        raise ConfigError(f"--method {name!r} is unknown; choose one of {', '.join(METHODS)} (or 'all')")
    return METHODS[name]


def _linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside `module`."""
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


def quantize_model(model: nn.Module, spec: QuantSpec | str, inplace: bool = False,
                   structure_only: bool = False) -> nn.Module:
    """Return `model` quantized by `spec` (a copy unless inplace), in eval mode.

    structure_only: build the quantized modules without rotating (for loading an export whose
    stored weights are already rotated and quantized; the state dict is loaded afterwards).
    """
    spec = get_method(spec)
    m = model if inplace else copy.deepcopy(model)
    if spec.weights is not None:
        routed = [i for i, layer in enumerate(m.layers) if getattr(layer.mlp, "routed", False)]
        if routed:
            raise ConfigError(
                f"weight quantization does not support routed MLPs (MoE / Mixture-of-Tokens in layers {routed}): "
                "their experts are stacked (E, D, H) parameters, not nn.Linear; use --method kv8 or kv4, "
                "or quantize a dense-MLP model"
            )
    if spec.rotate:
        check_supported(m)
        if not structure_only:
            rotate_model(m, seed=spec.seed, heads=True)
        else:
            m.cfg.tie_embeddings = False
            if m.head.weight is m.embed.weight:
                m.head.weight = nn.Parameter(m.embed.weight.detach().clone())
    if spec.weights is not None:
        bits, gs = spec.weights, spec.group_size
        for layer in m.layers:
            for part in (layer.mixer, layer.mlp):
                for parent, name, lin in _linears(part):
                    # QuaRot: the down projection's input (the SwiGLU hidden) gets an online Hadamard
                    online = (spec.rotate and spec.activations is not None and isinstance(parent, SwiGLU)
                              and name == "w2" and has_hadamard(lin.in_features))
                    g = gs if lin.in_features % gs == 0 else lin.in_features  # one group per row otherwise
                    setattr(parent, name, QLinear.from_linear(lin, bits, g, spec.activations, online))
        if spec.embeddings:
            D = m.cfg.d_model
            g = gs if D % gs == 0 else D
            tied = m.head.weight is m.embed.weight
            table = QuantizedWeight.from_float(m.embed.weight, bits, g)
            m.embed = QEmbedding(table)
            m.head = QLinear(table if tied else QuantizedWeight.from_float(m.head.weight, bits, g))
    m.kv_cache_factory = QuantKVCacheFactory(spec.kv, hadamard=True) if spec.kv is not None else None
    m.quant_spec = spec
    return m.eval()
