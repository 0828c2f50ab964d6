"""One loader: a Haipai checkpoint -> (HaipaiModel, tokenizer), growth log replayed.

Used by `haipai generate / eval / export / quantize / visualize`, the Lightning module (resume,
`load_from_checkpoint`) and Python users. Nothing in the file is executed: torch.load with
weights_only=True, component specs through the allowlist (io/spec.py).
"""

from __future__ import annotations

from typing import Any


from haipai_lightning.config import ConfigError
from haipai_lightning.grow.arch import replay_arch
from haipai_lightning.io.arch import Arch, build_model, normalize_arch
from haipai_lightning.io.checkpoint import CHECKPOINT_KEY, load_checkpoint_file
from haipai_lightning.model.decoder import HaipaiModel


def checkpoint_meta(ckpt: dict[str, Any], path: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint's `haipai` section, checked: its architecture normalized, its growth log a list."""
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path!r} is not a Haipai checkpoint (no 'haipai' section); pass a .ckpt written by haipai fit")
    log = meta.get("growth") or []
    if not isinstance(log, list) or not all(isinstance(e, dict) and isinstance(e.get("op"), str) for e in log):
        raise ConfigError(f"{path!r}: its growth log is malformed; the checkpoint is damaged")
    tok = meta.get("tokenizer")
    if tok is not None and not isinstance(tok, str):
        raise ConfigError(f"{path!r}: its tokenizer is not a JSON string; the checkpoint is damaged")
    return {**meta, "arch": normalize_arch(meta.get("arch"), f"checkpoint {path!r}"), "growth": log}


def grown_arch(meta: dict[str, Any]) -> Arch:
    """The architecture of the model the checkpoint holds: its base one with the growth log replayed."""
    return replay_arch(meta["arch"], meta["growth"])


def load_model(ckpt_path: str, map_location: str = "cpu") -> tuple[HaipaiModel, Any]:
    """Rebuild a HaipaiModel (and its tokenizer, if saved) from a Haipai checkpoint."""
    ckpt = load_checkpoint_file(ckpt_path, map_location)
    meta = checkpoint_meta(ckpt, str(ckpt_path))
    model = build_model(grown_arch(meta))
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise ConfigError(f"{ckpt_path!r} has no state_dict; the checkpoint is damaged")
    state = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{ckpt_path!r}: its weights do not fit its architecture ({str(e).splitlines()[0][:200]}); "
                          "the checkpoint is damaged") from e
    tokenizer = None
    if meta.get("tokenizer"):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(meta["tokenizer"])
    return model.eval(), tokenizer


__all__ = ["checkpoint_meta", "grown_arch", "load_model"]
