"""Haipai: train small language models that spend compute only where tokens need it.

The front door: `from haipai_lightning import HaipaiModel, ExpertChoiceRouter, Engine, ...`, and short
YAML class paths (`class_path: haipai_lightning.ExpertChoiceRouter`) wherever a class lives. Names
resolve lazily (PEP 562), so `import haipai_lightning` stays cheap.

Layout (a folder per stage of a model's life):
    model/     one forward pass: decoder, sharing schedule, routing, RoPE, KV cache, mixers, MLPs
    train/     the Lightning module, parameter groups and LR schedules, memory-lean optimizers
    decode/    sampling, generation, speculative decoding, the depth-wise batching engine
    grow/      growth ops (upcycling, HyperCloning, Gstack) and what they do to the architecture
    quant/     low-bit codec, quantized layers, rotations, KV quantization, the methods
    io/        checkpoint loading (allowlisted), the architecture object, exports
    analysis/  FLOPs, telemetry maths, depth pictures, the efficiency report
    eval/      perplexity, the lm-eval adapter and local tasks, the quantization report
    cli/       `haipai`: LightningCLI plus one module per extra subcommand
"""

from __future__ import annotations

import importlib
from typing import Any

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.io.legacy import install as _install_legacy_paths
from haipai_lightning.io.spec import register_component

_install_legacy_paths()

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # the model and its components
    "HaipaiModel": "model.decoder", "Block": "model.decoder", "ModelOutput": "model.decoder",
    "KVCache": "model.cache",
    "Router": "model.routing.base", "FullRecursion": "model.routing.base",
    "ExpertChoiceRouter": "model.routing.expert_choice", "TokenChoiceRouter": "model.routing.token_choice",
    "TopKGate": "model.routing.gate", "RouterRecord": "model.routing.record", "Selection": "model.routing.selection",
    "Attention": "model.mixers.attention", "Mamba": "model.mixers.mamba",
    "MixtureOfHeadsAttention": "model.mixers.moh", "AdaptiveSpanAttention": "model.mixers.adaptive_span",
    "DTRNetAttention": "model.mixers.dtrnet", "CoPEAttention": "model.mixers.cope",
    "CoreContextAttention": "model.mixers.cca", "MindSkipAttention": "model.mixers.mindskip",
    "BudgetHead": "model.budget",
    "SwiGLU": "model.mlps.dense", "TokenChoiceMoE": "model.mlps.moe", "ExpertChoiceMoE": "model.mlps.moe",
    "AdaptiveTopPMoE": "model.mlps.moe", "MixtureOfTokens": "model.mlps.mot",
    "AdaptiveComputationModule": "model.mlps.acm", "acmize": "train.acm",
    # training
    "MoRLightningModule": "train.module", "TrapezoidLR": "train.schedules", "param_groups": "train.schedules",
    "GaLoreAdamW": "train.optimizers", "QGaLoreAdamW": "train.optimizers", "AdamW8bit": "train.optimizers",
    # decoding
    "SamplingConfig": "decode.sampling", "generate": "decode.generate",
    "speculative_generate": "decode.speculative", "Engine": "decode.engine", "Request": "decode.engine",
    # growth
    # (the dispatcher grow(model, op, args) is haipai_lightning.grow.ops.grow: `grow` names the subpackage)
    "upcycle_to_moe": "grow.ops", "hyperclone": "grow.ops", "gstack": "grow.ops", "lesa": "grow.ops",
    # quantization, files
    "QuantSpec": "quant.methods", "quantize_model": "quant.methods",
    "load_model": "io.loader", "save_pretrained": "io.export", "load_pretrained": "io.export",
    # analysis
    "forward_flops": "analysis.flops", "training_flops": "analysis.flops", "flops_per_token": "analysis.flops",
}

__all__ = ["ConfigError", "ModelConfig", "register_component", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"haipai_lightning.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'haipai_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
