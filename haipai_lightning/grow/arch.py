"""What a growth op does to the *architecture* (config + component specs), without weights.

An architecture is the dict a checkpoint stores under `haipai.arch`:
`{"config": ModelConfig dict, "mixer" / "mlp" / "router": {class_path, init_args} or None}`.
A grown model's architecture is `replay_arch(base arch, growth log)`: loading a checkpoint
replays its log on the base architecture, builds that model, then loads the state dict, so a
grown checkpoint loads with one call (`load_from_checkpoint`, `haipai generate`, resume).

The weight side of each op lives in `grow/ops.py`; both share `grow_arch` so a replay can never
build another shape than the op did.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from haipai_lightning.io.spec import public_name, resolve_class
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.model.mlps.moe import AdaptiveTopPMoE, TokenChoiceMoE
from haipai_lightning.model.schedule import make_schedule

Arch = dict[str, Any]
# args that only change how weights are initialised, never the shape (ignored by the replay)
WEIGHT_ONLY_ARGS = {
    "upcycle_to_moe": {"router_std", "seed"},
    "hyperclone": {"noise_snr_db", "seed"},
    "gstack": {"how"},
    "lesa": {"hidden", "steps", "seed"},
}
OPS = tuple(WEIGHT_ONLY_ARGS)


def _cls(spec: dict | None, default: type) -> type:
    return default if spec is None else resolve_class(spec["class_path"])


def check_op(op: str, args: dict[str, Any], where: str = "growth op") -> None:
    """Fail fast on an unknown op or argument (before any training)."""
    if op not in OPS:
        raise ConfigError(f"{where}: op={op!r} is unknown; use one of {', '.join(OPS)}")
    fn = _FNS[op]
    params = inspect.signature(fn).parameters
    if op == "upcycle_to_moe":  # its **moe_args go to TokenChoiceMoE: check them against its signature now
        known = (set(inspect.signature(TokenChoiceMoE).parameters) - {"cfg", "expert_hidden"}) | WEIGHT_ONLY_ARGS[op]
        if set(args) - known:
            raise ConfigError(f"{where}: upcycle_to_moe has no argument(s) {sorted(set(args) - known)}; "
                              f"valid: {sorted(known)}")
    elif not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = set(args) - set(params) - WEIGHT_ONLY_ARGS[op]
        if unknown:
            known = sorted((set(params) - {"arch"}) | WEIGHT_ONLY_ARGS[op])
            raise ConfigError(f"{where}: {op} has no argument(s) {sorted(unknown)}; valid: {known}")


def grow_arch(arch: Arch, op: str, args: dict[str, Any]) -> Arch:
    """The architecture after `op(**args)` (pure: `arch` is not modified)."""
    check_op(op, args)
    shape_args = {k: v for k, v in args.items() if k not in WEIGHT_ONLY_ARGS[op]}
    fn = _FNS[op]
    new = fn(copy.deepcopy(arch), **shape_args)
    ModelConfig.from_dict(new["config"])  # validates
    return new


def replay_arch(arch: Arch, log: list[dict[str, Any]]) -> Arch:
    """Apply a checkpoint's growth log (entries {"op", "args", ...}) to its base architecture."""
    for entry in log:
        arch = grow_arch(arch, entry["op"], entry.get("args") or {})
    return arch


# ------------------------------------------------------------------------------ the ops
def _upcycle(arch: Arch, n_experts: int = 8, top_k: int = 2, **moe_args: Any) -> Arch:
    if not _issub(_cls(arch["mlp"], SwiGLU), SwiGLU):
        raise ConfigError(f"upcycle_to_moe needs a dense SwiGLU MLP; this model's model.mlp is "
                          f"{arch['mlp']['class_path']} (upcycle before any MoE growth)")
    if not 1 <= top_k <= n_experts:
        raise ConfigError(f"upcycle_to_moe: top_k={top_k} must be in 1..n_experts={n_experts}")
    if "expert_hidden" in moe_args:
        raise ConfigError("upcycle_to_moe: expert_hidden is the dense MLP's hidden size (every expert is a copy); "
                          "drop it from the args")
    known = set(inspect.signature(TokenChoiceMoE).parameters) - {"cfg", "n_experts", "top_k"}
    if set(moe_args) - known:
        raise ConfigError(f"upcycle_to_moe: unknown argument(s) {sorted(set(moe_args) - known)}; valid: "
                          f"n_experts, top_k, router_std, seed and TokenChoiceMoE's {sorted(known)}")
    cfg = ModelConfig.from_dict(arch["config"])
    hidden = ((arch["mlp"] or {}).get("init_args") or {}).get("hidden") or cfg.ffn_dim
    arch["mlp"] = {"class_path": public_name(TokenChoiceMoE),
                   "init_args": {"n_experts": int(n_experts), "top_k": int(top_k), "expert_hidden": int(hidden),
                                 **moe_args}}
    return arch


def _hyperclone(arch: Arch, width_factor: int = 2) -> Arch:
    n = width_factor
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ConfigError(f"hyperclone: width_factor={n!r} must be an integer >= 2 (weights are tiled, "
                          "tensor.repeat needs whole copies)")
    cfg = ModelConfig.from_dict(arch["config"])
    if cfg.mixer_pattern and "M" in cfg.mixer_pattern or not _issub(_cls(arch["mixer"], Attention), Attention):
        raise ConfigError("hyperclone widens attention mixers only; this model has Mamba layers "
                          "(model.config.mixer_pattern / model.mixer)")
    c = arch["config"]
    old_ffn = cfg.ffn_dim
    c.update(d_model=n * cfg.d_model, n_heads=n * cfg.n_heads, ffn_hidden=n * old_ffn,
             n_kv_heads=None if cfg.n_kv_heads is None else n * cfg.n_kv_heads)
    if cfg.tie_embeddings:
        # tied head = embedding: the residual stream becomes (1/n) [x, .., x] (see growth.hyperclone), and
        # RMSNorm's eps scales with the square of that factor so every norm gives exactly its old output
        c["norm_eps"] = cfg.norm_eps / n**2
    mlp = arch["mlp"]
    if mlp is not None:
        ia = mlp.setdefault("init_args", {})
        cls = _cls(mlp, SwiGLU)
        if hasattr(cls, "widened_init_args"):  # the component says how its sizes scale (SwiGLU: hidden)
            mlp["init_args"] = cls.widened_init_args(ia, n)
        elif "n_experts" in inspect.signature(cls).parameters:  # MoE / MoT: widen every expert
            ia["expert_hidden"] = n * (ia.get("expert_hidden") or old_ffn)
    router = arch["router"]
    if router is not None:  # the router's contract (routing/base.py): e.g. token-choice widens its MLP
        router["init_args"] = _cls(router, object).widened_init_args(router.get("init_args") or {}, n)
    return arch


def gstack_layer_map(cfg: ModelConfig, extra_layers: int | None, factor: int | None) -> tuple[ModelConfig, list[int]]:
    """The grown config and, for every new unique layer, the old unique layer it is a copy of.

    The shared block grows (for Nr=1 that is the whole stack): `extra_layers` copies of its last
    layer after it (depth up-scaling, SOLAR, arXiv 2312.15166), or the block stacked `factor` times (Gstack); prelude and coda keep
    their layers.
    """
    if (extra_layers is None) == (factor is None):
        raise ConfigError("gstack: give exactly one of extra_layers (copies of the last shared layer) or factor "
                          "(stack the shared block factor times)")
    for name, v in (("extra_layers", extra_layers), ("factor", factor)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "extra_layers" else 2)):
            raise ConfigError(f"gstack: {name}={v!r} must be an integer >= {1 if name == 'extra_layers' else 2}")
    s = make_schedule(cfg)
    k = len(s.shared)
    new_shared = [s.shared[-1]] * extra_layers if extra_layers is not None else list(s.shared) * (factor - 1)
    src = list(s.prelude) + list(s.shared) + new_shared + list(s.coda)
    new_cfg = ModelConfig.from_dict({**cfg.to_dict(), "n_layers": cfg.n_layers + len(new_shared) * s.n_recursions})
    assert make_schedule(new_cfg).n_unique == len(src) and len(make_schedule(new_cfg).shared) == k + len(new_shared)
    if cfg.mixer_pattern:  # every new layer keeps the mixer of the layer it copies
        new_cfg.mixer_pattern = "".join(cfg.mixer_letter(i) for i in src)
    return new_cfg, src


def _gstack(arch: Arch, extra_layers: int | None = None, factor: int | None = None) -> Arch:
    cfg = ModelConfig.from_dict(arch["config"])
    new_cfg, src = gstack_layer_map(cfg, extra_layers, factor)
    arch["config"] = new_cfg.to_dict()
    mlp = arch["mlp"]
    if mlp is not None and _issub(_cls(mlp, SwiGLU), AdaptiveTopPMoE):
        th = (mlp.get("init_args") or {}).get("threshold")
        if isinstance(th, (list, tuple)) and len(th) > 1:  # one p per unique layer: copies keep their source's p
            mlp["init_args"]["threshold"] = [th[i] for i in src]
    return arch


def _lesa(arch: Arch, extra_layers: int = 1) -> Arch:
    """LESA inserts `extra_layers` predicted layers after the shared block's last one: gstack's shape."""
    return _gstack(arch, extra_layers=extra_layers)


_FNS = {"upcycle_to_moe": _upcycle, "hyperclone": _hyperclone, "gstack": _gstack, "lesa": _lesa}


def _issub(a: Any, b: type) -> bool:
    return isinstance(a, type) and issubclass(a, b)
