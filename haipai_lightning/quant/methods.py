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
decisions are thresholds), Mamba's dt / A / D / conv. Routed MLPs' experts (MoE / MoT: stacked
(E, D, H) parameters, not linears) become QExperts, one QLinear per expert matrix (qexperts.py).

Calibrated methods (`solver`, calibrated.py): "gptq" (GPTQ, arXiv 2210.17323: Hessians of every
linear's real inputs over calibration batches, column-by-column error compensation) and "guided"
(GuidedQuant, arXiv 2505.07004: the same solver under end-loss-gradient-weighted Hessians). They
store the same formats as round-to-nearest and also quantize routed MLPs' experts (QExperts, one
Hessian per expert from the rows routed to it). `code_bits` = 3 or 2 stores int3 / int2 codes in the
int4 nibble container (fewer levels; the bytes on disk are the int4 ones); the embedding table and
the head then stay int4 (round-to-nearest). "lnq" (GuidedQuant's LNQ, lnq.py) stores non-uniform
per-row codebooks of 2^bits levels, solved under the guided objective (experts: GPTQ, uniform). `rotation="spinquant"` learns the rotation (SpinQuant,
arXiv 2405.16406; spinquant.py) instead of drawing a random Hadamard. Calibration batches come from
`quantize_model(..., calib=batches)`; without them sequences sampled from the model itself are used.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from haipai_lightning.config import ConfigError
from haipai_lightning.model.mlps.experts import Experts
from haipai_lightning.quant.kv_cache import QuantKVCacheFactory
from haipai_lightning.quant.layers import QEmbedding, QLinear
from haipai_lightning.quant.qtensor import QuantizedWeight
from haipai_lightning.quant.rotation import check_supported, fuse_norm_gains, rotate_model
from haipai_lightning.quant.calibrated import (online_hadamard_for, qlinear_rtn, quantize_calibrated,
                                               quantize_experts_rtn)
from haipai_lightning.quant.calibration import sample_calibration
from haipai_lightning.quant.spinquant import apply_rotation, learn_rotation


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
    solver: str = "rtn"
    """How weights are rounded: rtn (round-to-nearest), gptq, guided or lnq (calibrated; see the module docstring)."""
    rotation: str = "hadamard"
    """With rotate: hadamard (a seeded random Hadamard) or spinquant (learned by Cayley SGD from it)."""
    code_bits: int | None = None
    """Levels of the int4 container: 3 or 2 stores int3 / int2 codes (2^bits levels) in weights=4's layout."""

    @property
    def weight_bits(self) -> int | None:
        """The bits of the weight codes (code_bits inside the int4 container, else weights)."""
        return self.code_bits or self.weights

    def __post_init__(self) -> None:
        for name, ok in (("weights", (None, 4, 8)), ("activations", (None, 4, 8)), ("kv", (None, 4, 8))):
            if getattr(self, name) not in ok:
                raise ConfigError(f"quantization {name}={getattr(self, name)!r}: use 8, 4 or null")
        if self.code_bits not in (None, 2, 3, 4) or (self.code_bits is not None and self.weights != 4):
            raise ConfigError(f"quantization code_bits={self.code_bits!r}: use 4, 3 or 2 (or null), with weights=4")
        if self.solver not in ("rtn", "gptq", "guided", "lnq"):
            raise ConfigError(f"quantization solver={self.solver!r}: use rtn, gptq, guided or lnq")
        if self.solver == "lnq" and self.weights != 4:
            raise ConfigError("quantization solver=lnq stores codebooks in the int4 container: set weights=4")
        if self.rotation not in ("hadamard", "spinquant"):
            raise ConfigError(f"quantization rotation={self.rotation!r}: use hadamard or spinquant")
        if self.solver != "rtn" and self.weights is None:
            raise ConfigError(f"quantization solver={self.solver} quantizes weights: set weights")
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
    "int3_rtn": QuantSpec(weights=4, code_bits=3),
    "int4_gptq": QuantSpec(weights=4, solver="gptq"),
    "int3_gptq": QuantSpec(weights=4, code_bits=3, solver="gptq"),
    "int4_guided": QuantSpec(weights=4, solver="guided"),
    "int3_guided": QuantSpec(weights=4, code_bits=3, solver="guided"),
    "int4_lnq": QuantSpec(weights=4, solver="lnq"),
    "int3_lnq": QuantSpec(weights=4, code_bits=3, solver="lnq"),
    "w4a4kv4_spinquant": QuantSpec(weights=4, activations=4, kv=4, rotate=True, rotation="spinquant"),
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
                   structure_only: bool = False, calib: list[dict] | None = None) -> nn.Module:
    """Return `model` quantized by `spec` (a copy unless inplace), in eval mode.

    structure_only: build the quantized modules without rotating or calibrating (for loading an
    export whose stored weights are already rotated and quantized; the state dict is loaded afterwards).
    calib: calibration batches ({"input_ids", "labels"}) for the calibrated solvers and SpinQuant
    (default: sequences sampled from the model, calibration.sample_calibration).
    """
    spec = get_method(spec)
    m = model if inplace else copy.deepcopy(model)
    needs_data = not structure_only and (spec.solver != "rtn" or (spec.rotate and spec.rotation == "spinquant"))
    if needs_data and calib is None:
        calib = sample_calibration(m.eval())
    if spec.rotate:
        check_supported(m)
        if structure_only:
            m.cfg.tie_embeddings = False
            if m.head.weight is m.embed.weight:
                m.head.weight = nn.Parameter(m.embed.weight.detach().clone())
        elif spec.rotation == "spinquant":
            fuse_norm_gains(m)
            Q, R = learn_rotation(m, calib, spec.weight_bits, spec.activations, spec.kv, spec.group_size, seed=spec.seed)
            apply_rotation(m, Q, R)
        else:
            rotate_model(m, seed=spec.seed, heads=True)
    if spec.weights is not None:
        bits, gs = spec.weight_bits, spec.group_size
        if spec.solver != "rtn" and not structure_only:
            quantize_calibrated(m, calib, bits, gs, spec.activations, spec.solver, spec.rotate)
        else:
            for layer in m.layers:
                for part in (layer.mixer, layer.mlp):
                    if isinstance(getattr(part, "experts", None), Experts):  # MoE / MoT: one QLinear per expert matrix
                        part.experts = quantize_experts_rtn(part.experts, bits, gs, spec.activations)
                        continue  # its router / gate linears stay fp32 (decisions are thresholds)
                    for parent, name, lin in _linears(part):
                        # QuaRot: the down projection's input (the SwiGLU hidden) gets an online Hadamard
                        online = online_hadamard_for(parent, name, lin, spec.rotate, spec.activations)
                        setattr(parent, name, qlinear_rtn(lin, bits, gs, spec.activations, online,
                                                          codebook=spec.solver == "lnq"))
        if spec.embeddings:
            ebits = spec.weights  # int3 / int2 codes: the table and the head stay int4
            D = m.cfg.d_model
            g = gs if D % gs == 0 else D
            tied = m.head.weight is m.embed.weight
            table = QuantizedWeight.from_float(m.embed.weight, ebits, g)
            m.embed = QEmbedding(table)
            m.head = QLinear(table if tied else QuantizedWeight.from_float(m.head.weight, ebits, g))
    m.kv_cache_factory = QuantKVCacheFactory(spec.kv, hadamard=True) if spec.kv is not None else None
    m.quant_spec = spec
    return m.eval()
