"""Portable architecture specs and safe checkpoint loading.

A checkpoint carries `checkpoint["haipai"]`: the model config, the class paths and
init args of the injected components, the growth log and the tokenizer. That is
enough to rebuild the model without the YAML that trained it, and it holds only
plain types, so every load uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from haipai_lightning.config import ConfigError

CHECKPOINT_KEY = "haipai"


def component_spec(factory: Any) -> dict[str, Any] | None:
    """class / functools.partial (incl. jsonargparse's callables) / spec dict -> {class_path, init_args}."""
    if factory is None:
        return None
    if isinstance(factory, dict):
        return {"class_path": factory["class_path"], "init_args": dict(factory.get("init_args") or {})}
    init_args: dict[str, Any] = {}
    if isinstance(factory, functools.partial):
        init_args = dict(factory.keywords)
        # jsonargparse wraps a class as partial(call_without_instantiate_context, instantiator, cls, **kw)
        cls = next((a for a in (factory.func, *factory.args) if isinstance(a, type)), None)
    else:
        cls = factory if isinstance(factory, type) else None
    if cls is None:
        raise ConfigError(
            f"cannot record component {factory!r} in the checkpoint: pass a class, a functools.partial "
            "of a class, or a class_path/init_args spec"
        )
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_component(spec: dict[str, Any] | None) -> Callable | None:
    if spec is None:
        return None
    module, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"component class_path {spec['class_path']!r} cannot be imported: {e}") from e
    return functools.partial(cls, **spec.get("init_args", {}))


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO (fsspec transaction: temp file + rename) that always loads with weights_only=True."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):  # type: ignore[override]
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True) with one-line errors for a missing or damaged file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ckpt_path {str(path)!r} does not exist; pass the path of a .ckpt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise ConfigError(
            f"checkpoint {str(path)!r} cannot be read safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is damaged or not a Haipai checkpoint"
        ) from e


def arch_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two architecture specs."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "config":
            diffs += [f"model.config.{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"model.{key}: checkpoint {a!r} vs now {b!r}")
    return diffs
