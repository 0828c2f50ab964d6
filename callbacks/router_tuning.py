"""RouterTuning: freeze a trained model and train only its routers (Router-Tuning, arXiv 2410.13184).

    model:
      mixer: {class_path: haipai_lightning.MindSkipAttention, init_args: {capacity: 0.5}}
      # config, mlp, router: the base checkpoint's
    trainer:
      callbacks:
        - class_path: callbacks.RouterTuning
          init_args: {base_ckpt_path: runs/base/checkpoints/last.ckpt}

At `setup` (before the optimizer is built, before a resumed checkpoint is restored) the callback

1. loads the base checkpoint's weights into the model, weights only (read with weights_only=True,
   nothing it names is imported). The base must have the same config, MLP and depth router; its
   mixer may differ from the routed one only by the routers (MindSkipAttention subclasses Attention:
   same projections). Every parameter of the model except the routers must come from the file, and
   the file may hold nothing the model lacks. Skipped when Lightning resumes (`--ckpt_path`): the
   resumed checkpoint already holds the tuned routers and the same frozen base.
2. freezes every parameter whose name does not match `trainable` (default: the MindSkip routers,
   `skip_router`), so the optimizer (train/schedules.param_groups skips frozen parameters) sees only
   the routers, and the base weights stay bitwise what the file held.

The tuned checkpoint is an ordinary Haipai checkpoint of the routed architecture: generate, eval,
serve and export load it as any other.
"""

from __future__ import annotations

import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from haipai_lightning.config import ConfigError
from haipai_lightning.io.arch import arch_diff
from haipai_lightning.io.checkpoint import load_checkpoint_file
from haipai_lightning.io.loader import checkpoint_meta, grown_arch


class RouterTuning(L.Callback):
    def __init__(self, base_ckpt_path: str | None = None, trainable: str = r"\.skip_router\.") -> None:
        """Args:
            base_ckpt_path: the trained checkpoint to tune (None: the model's weights as they are, e.g. a
                Python caller that loaded them itself).
            trainable: regular expression; parameters whose name matches train, all others are frozen.
        """
        try:
            self.trainable = re.compile(trainable)
        except re.error as e:
            raise ConfigError(f"callbacks.RouterTuning trainable={trainable!r} is not a regular expression ({e})") from e
        self.base_ckpt_path = base_ckpt_path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = pl_module.model
        if self.base_ckpt_path is not None and getattr(trainer, "ckpt_path", None) is None:
            load_base(model, pl_module.arch, self.base_ckpt_path, self.trainable)
        n = freeze_all_but(model, self.trainable)
        rank_zero_info(f"RouterTuning: {n} trainable router parameters; every other parameter is frozen")


def freeze_all_but(model: torch.nn.Module, trainable: re.Pattern) -> int:
    """requires_grad only for parameters matching `trainable`; returns how many elements train."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(bool(trainable.search(name)))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ConfigError(f"callbacks.RouterTuning: no parameter matches trainable={trainable.pattern!r}; give the model "
                          "routers to tune (model.mixer: haipai_lightning.MindSkipAttention)")
    return n


def load_base(model: torch.nn.Module, arch: dict[str, Any], path: str, trainable: re.Pattern) -> None:
    """Copy a base checkpoint's weights into `model` (whose extra parameters are the routers)."""
    ckpt = load_checkpoint_file(path)  # weights_only=True; one line for a missing or damaged file
    base_arch = grown_arch(checkpoint_meta(ckpt, path))
    diffs = [d for d in arch_diff({k: v for k, v in base_arch.items() if k != "mixer"},
                                  {k: v for k, v in arch.items() if k != "mixer"})]
    if diffs:
        raise ConfigError(f"callbacks.RouterTuning base_ckpt_path={path!r} has another architecture: "
                          + "; ".join(diffs[:3]) + " -- keep the base's model.config, mlp and router")
    sd = {k.removeprefix("model."): v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not trainable.search("." + k)]
    if bad or unexpected:
        raise ConfigError(f"callbacks.RouterTuning base_ckpt_path={path!r} does not fit the model: missing "
                          f"{bad[:3]}, unexpected {list(unexpected)[:3]}; the base's mixer must be Attention and "
                          "only the routers may be new")
