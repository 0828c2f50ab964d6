"""Component specs ({class_path, init_args}) and the allowlist that resolves them.

A checkpoint or an export records the model's injected components (mixer, MLP, router) as specs.
Resolving a spec read from a file NEVER imports or calls what the file names: the class path is
looked up in a registry of Haipai's own component classes (their public name
`haipai_lightning.ExpertChoiceRouter`, their module path, and the paths of the flat layout before
0.2) and of classes a user registered explicitly:

    from haipai_lightning import register_component
    register_component(MyRouter)            # or the entry point group "haipai_lightning.components"

Anything else is refused with one line naming the spec. init_args must be plain data
(None, bool, int, float, str, lists and dicts of them).
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any, Callable

from haipai_lightning.config import ConfigError

ENTRY_POINT_GROUP = "haipai_lightning.components"
# public component classes: their modules (imported lazily, on the first lookup)
_BUILTIN_MODULES = (
    "haipai_lightning.model.routing", "haipai_lightning.model.mixers", "haipai_lightning.model.mlps",
)
_BUILTIN_NAMES = (
    "FullRecursion", "ExpertChoiceRouter", "TokenChoiceRouter", "Attention", "Mamba",
    "SwiGLU", "TokenChoiceMoE", "ExpertChoiceMoE", "AdaptiveTopPMoE", "MixtureOfTokens",
    "MixtureOfHeadsAttention", "AdaptiveSpanAttention", "DTRNetAttention", "CoPEAttention",
    "CoreContextAttention", "MindSkipAttention",
    "AdaptiveComputationModule",  # model/mlps/acm.py (issue 20)
)
_registry: dict[str, type] = {}  # any accepted class path -> class
_public: dict[type, str] = {}  # class -> the path recorded in new checkpoints
_loaded = False


def register_component(cls: type, name: str | None = None) -> type:
    """Allow `cls` in component specs read from checkpoints and exports (usable as a decorator).

    It is then recorded and resolved as `name` (default: its module path `pkg.module.Class`)."""
    if not isinstance(cls, type):
        raise TypeError(f"register_component takes a class, got {cls!r}")
    path = name or f"{cls.__module__}.{cls.__qualname__}"
    _registry[path] = cls
    _registry[f"{cls.__module__}.{cls.__qualname__}"] = cls
    _public.setdefault(cls, path)
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    from haipai_lightning.io.legacy import LEGACY_CLASS_PATHS

    for mod in _BUILTIN_MODULES:
        m = importlib.import_module(mod)
        for n in _BUILTIN_NAMES:
            if hasattr(m, n):
                register_component(getattr(m, n), f"haipai_lightning.{n}")
    for old, new in LEGACY_CLASS_PATHS.items():
        _registry[old] = _registry[new]
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):  # installed packages that register components
        register_component(ep.load(), ep.value.replace(":", "."))


def registered() -> dict[str, type]:
    """Every accepted class path -> class."""
    _load_builtins()
    return dict(_registry)


def resolve_class(class_path: str, where: str = "component") -> type:
    """The class a spec names, from the allowlist only (nothing is imported)."""
    _load_builtins()
    cls = _registry.get(class_path) if isinstance(class_path, str) else None
    if cls is None:
        raise ConfigError(
            f"{where} class_path {class_path!r} is not a Haipai component and is not registered; loading a file "
            "never imports what it names: register your class with haipai_lightning.register_component (or the "
            f"'{ENTRY_POINT_GROUP}' entry point group) before loading"
        )
    return cls


def public_name(cls: type) -> str:
    """The class path a checkpoint records for `cls` (its registered name, else its module path)."""
    _load_builtins()
    return _public.get(cls, f"{cls.__module__}.{cls.__qualname__}")


def _check_plain(v: Any, where: str) -> None:
    if v is None or isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, (list, tuple)):
        for x in v:
            _check_plain(x, where)
        return
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        for x in v.values():
            _check_plain(x, where)
        return
    raise ConfigError(f"{where}: init_args hold {type(v).__name__} {v!r}; only plain values (numbers, strings, "
                      "lists, dicts) are allowed in a component spec")


def component_spec(factory: Any) -> dict[str, Any] | None:
    """class / functools.partial (incl. jsonargparse's callables) / spec dict -> {class_path, init_args}."""
    if factory is None:
        return None
    if isinstance(factory, dict):
        if not isinstance(factory.get("class_path"), str):
            raise ConfigError(f"component spec {factory!r} needs a string class_path")
        path = factory["class_path"]
        _load_builtins()
        cls = _registry.get(path)
        return {"class_path": public_name(cls) if cls is not None else path,
                "init_args": dict(factory.get("init_args") or {})}
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
    _load_builtins()
    if cls not in _public:
        # a class object handed over by the program or its YAML config (already imported, so nothing new
        # runs): allowed in this process, so its specs rebuild here (growth, resume); another process that
        # loads the checkpoint must register it itself
        register_component(cls)
    return {"class_path": public_name(cls), "init_args": init_args}


def build_component(spec: dict[str, Any] | None, where: str = "component") -> Callable | None:
    """A factory (functools.partial of an allowlisted class) from a spec; None stays None."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ConfigError(f"{where} spec {spec!r} is malformed: it needs a string class_path")
    cls = resolve_class(spec["class_path"], where)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ConfigError(f"{where} spec {spec['class_path']!r}: init_args must be a mapping, got {init_args!r}")
    _check_plain(init_args, f"{where} {spec['class_path']!r}")
    return functools.partial(cls, **init_args)
