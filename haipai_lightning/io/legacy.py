"""Paths of the flat layout (before 0.2) that keep working: old checkpoints, exports and YAML files.

Old module -> the new modules that now hold its names. `import haipai_lightning.routers` (a YAML
`class_path: haipai_lightning.routers.ExpertChoiceRouter`, an old export's custom code) gets a
module whose attributes are those names: the very same classes, so isinstance holds. Old component
class paths in checkpoints resolve through the allowlist (io/spec.py) by LEGACY_CLASS_PATHS.

    old                                      new
    haipai_lightning.model                   haipai_lightning.model (package; HaipaiModel, Block, ModelOutput)
    haipai_lightning.routers                 haipai_lightning.model.routing
    haipai_lightning.mixers[.attention|...]  haipai_lightning.model.mixers[...]
    haipai_lightning.mlps[.moe|...]          haipai_lightning.model.mlps[...]
    haipai_lightning.optim / optimizers      haipai_lightning.train.schedules / train.optimizers
    haipai_lightning.generation              decode.sampling, decode.generate, decode.speculative, io.loader
    ... (the table below)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

_H = "haipai_lightning."
LEGACY_MODULES: dict[str, tuple[str, ...]] = {
    "recursion": ("model.schedule", "model.routing.selection"),
    "routers": ("model.routing",),
    "layers": ("model.rope",),
    "cache": ("model.cache",),
    "checkpointing": ("model.activation_checkpointing",),
    "mixers": ("model.mixers",),
    "mixers.attention": ("model.mixers.attention",),
    "mixers.mamba": ("model.mixers.mamba",),
    "mixers.scan": ("model.mixers.scan",),
    "mixers.triton_scan": ("model.mixers.triton_scan",),
    "mlps": ("model.mlps",),
    "mlps.dense": ("model.mlps.dense",),
    "mlps.experts": ("model.mlps.experts", "model.routing.losses"),
    "mlps.moe": ("model.mlps.moe",),
    "mlps.mot": ("model.mlps.mot",),
    "module": ("train.module",),
    "optim": ("train.schedules",),
    "optimizers": ("train.optimizers",),
    "generation": ("decode.sampling", "decode.generate", "decode.speculative", "io.loader"),
    "engine": ("decode.engine",),
    "growth": ("grow.ops",),
    "growth_arch": ("grow.arch", "io.arch"),
    "quantization": ("quant.methods",),
    "qtensor": ("quant.qtensor",),
    "qlayers": ("quant.layers",),
    "hadamard": ("quant.hadamard",),
    "rotation": ("quant.rotation",),
    "kv_quant": ("quant.kv_cache",),
    "checkpoint": ("io.checkpoint", "io.spec"),
    "export": ("io.export",),
    "flops": ("analysis.flops",),
    "telemetry": ("analysis.telemetry",),
    "depth_picture": ("analysis.depth_picture",),
    "efficiency": ("analysis.efficiency",),
    "evaluation": ("eval.perplexity",),
    "lm_eval_adapter": ("eval.lm_eval_adapter",),
    "quant_report": ("eval.quant_report",),
    "eval_command": ("cli.eval",),
    "quant_commands": ("cli.quantize", "cli.export"),
}
_PACKAGES = {"mixers", "mlps"}
# component class paths written by the flat layout -> their public names
LEGACY_CLASS_PATHS: dict[str, str] = {
    **{f"{_H}routers.{n}": f"{_H}{n}" for n in ("FullRecursion", "ExpertChoiceRouter", "TokenChoiceRouter")},
    **{f"{_H}mixers{sub}.{n}": f"{_H}{n}" for n, sub in (("Attention", ""), ("Attention", ".attention"),
                                                           ("Mamba", ""), ("Mamba", ".mamba"))},
    **{f"{_H}mlps{sub}.{n}": f"{_H}{n}" for n, subs in (
        ("SwiGLU", ("", ".dense")), ("TokenChoiceMoE", ("", ".moe")), ("ExpertChoiceMoE", ("", ".moe")),
        ("AdaptiveTopPMoE", ("", ".moe")), ("MixtureOfTokens", ("", ".mot"))) for sub in subs},
}


class _LegacyLoader(importlib.abc.Loader):
    def create_module(self, spec):  # noqa: D102
        return None  # a plain new module, filled below

    def exec_module(self, module: types.ModuleType) -> None:  # noqa: D102
        old = module.__name__.removeprefix(_H)
        for target in LEGACY_MODULES[old]:
            new = importlib.import_module(_H + target)
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
        module.__doc__ = f"Moved: {module.__name__} is now " + ", ".join(_H + t for t in LEGACY_MODULES[old])


class _LegacyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if not fullname.startswith(_H) or fullname.removeprefix(_H) not in LEGACY_MODULES:
            return None
        old = fullname.removeprefix(_H)
        return importlib.machinery.ModuleSpec(fullname, _LegacyLoader(), is_package=old in _PACKAGES)


def install() -> None:
    """Put the finder last on sys.meta_path (real modules always win)."""
    if not any(isinstance(f, _LegacyFinder) for f in sys.meta_path):
        sys.meta_path.append(_LegacyFinder())
