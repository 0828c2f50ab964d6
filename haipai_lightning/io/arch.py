"""The architecture of a model: one object, assembled in one place.

    {"config": ModelConfig dict, "mixer" / "mlp" / "router": {class_path, init_args} or None}

A checkpoint stores it under `haipai.arch` (with the growth log beside it: the architecture of a
grown model is the base one with the log replayed, grow/arch.py), an export in config.json. It
holds only plain data; `build_model` resolves its specs through the allowlist (io/spec.py).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.io.spec import build_component, component_spec, resolve_class
from haipai_lightning.model.decoder import HaipaiModel

Arch = dict[str, Any]
COMPONENTS = ("mixer", "mlp", "router")


def make_arch(config: ModelConfig | dict[str, Any], mixer: Any = None, mlp: Any = None, router: Any = None) -> Arch:
    """The architecture of a config and its component factories (classes, partials or spec dicts)."""
    cfg = config.to_dict() if isinstance(config, ModelConfig) else dict(config or {})
    return {"config": cfg, **{k: component_spec(v) for k, v in zip(COMPONENTS, (mixer, mlp, router))}}


def normalize_arch(arch: Any, where: str = "checkpoint") -> Arch:
    """An architecture read from a file, checked: known keys, a config dict, allowlisted specs (old class
    paths become today's public names). Raises ConfigError naming what is wrong."""
    if not isinstance(arch, dict) or not isinstance(arch.get("config"), dict):
        raise ConfigError(f"the {where}'s architecture is malformed (no config mapping); it is not a Haipai file")
    for k in COMPONENTS:
        if arch.get(k) is not None:
            build_component(arch[k], f"{where} model.{k}")  # refuses anything not allowlisted
    return make_arch(arch["config"], *(arch.get(k) for k in COMPONENTS))


def arch_of(model: HaipaiModel) -> Arch:
    """The architecture spec of a built model (its config and the factories it was built with)."""
    f = getattr(model, "factories", None) or {}
    return make_arch(model.cfg, *(f.get(k) for k in COMPONENTS))


def build_model(arch: Arch, device: torch.device | str | None = None) -> HaipaiModel:
    """HaipaiModel of an architecture spec. Its random init does not touch the global RNG
    (a growth op or a checkpoint load in the middle of training must not shift the data order)."""
    dev = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
        return HaipaiModel(ModelConfig.from_dict(arch["config"]),
                           *(build_component(arch[k], f"model.{k}") for k in COMPONENTS))


def _without_defaults(spec: Any) -> Any:
    """A component spec minus the init_args equal to its class's defaults: a checkpoint written before an
    argument existed (the CLI records every argument) still matches a config that leaves it at its default."""
    if not isinstance(spec, dict) or not isinstance(spec.get("init_args"), dict):
        return spec
    try:
        params = inspect.signature(resolve_class(spec.get("class_path"))).parameters
    except (ConfigError, TypeError, ValueError):
        return spec

    def default(k: str, v: Any) -> bool:
        d = params[k].default if k in params else inspect.Parameter.empty
        if d is inspect.Parameter.empty:
            return False
        return list(v) == list(d) if isinstance(v, (list, tuple)) and isinstance(d, (list, tuple)) else v == d

    return {**spec, "init_args": {k: v for k, v in spec["init_args"].items() if not default(k, v)}}


def arch_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two architecture specs (component arguments at their defaults
    count as absent)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key in COMPONENTS:
            a, b = _without_defaults(a), _without_defaults(b)
        if isinstance(a, dict) and isinstance(b, dict) and key == "config":
            diffs += [f"model.config.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"model.{key}: checkpoint {a!r} vs now {b!r}")
    return diffs
