"""Reading checkpoints safely.

A checkpoint carries `checkpoint["haipai"]`: the architecture (io/arch.py), the growth log and
the tokenizer. That is enough to rebuild the model without the YAML that trained it, and it holds
only plain types, so every load uses `torch.load(weights_only=True)`; the component specs in it
resolve through the allowlist of io/spec.py.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from haipai_lightning.config import ConfigError

CHECKPOINT_KEY = "haipai"


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
