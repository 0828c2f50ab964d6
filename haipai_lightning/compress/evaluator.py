"""Evaluator-head prompt/KV compression (EHPC, Fei et al., arXiv 2501.12959).

EHPC's observation: a few heads of the *early* layers already attend, from the end of the prompt,
to the tokens the whole model will need ("evaluator heads"). So:

1. `calibrate_heads`: on calibration prompts with known important tokens (a needle's key and value;
   without labels, the tokens the model's last layer application attends to), rank every head of the
   first `evaluator_apps` layer applications by the attention mass its last-window queries put on
   the important tokens (EHPC section 3.2 ranks heads the same way on needle-in-a-haystack data),
   and keep the top ones.
2. `ehpc_scores`: score a prompt by a forward of the first `evaluator_apps` applications only (the
   rest of the model never runs), summing the chosen heads' attention from the last `window` queries.
3. The top tokens are kept (kv_ops.select_keep) and the model is recomputed on them, so every later
   layer application -- for MoR every recursion step -- caches only the budget's tokens (or, mode
   evict, a full prefill's caches are pruned to them).
"""

from __future__ import annotations

import torch

from haipai_lightning.config import ConfigError
from haipai_lightning.compress.config import CompressConfig
from haipai_lightning.compress.probe import window_attention


def _apps_needed(cfg: CompressConfig, n_apps: int) -> int:
    need = cfg.evaluator_apps if cfg.heads is None else max(a for a, _ in cfg.heads) + 1
    if need > n_apps:
        raise ConfigError(f"compress.evaluator_apps / heads reach application {need - 1}, the model has {n_apps}")
    return need


@torch.no_grad()
def ehpc_scores(model: torch.nn.Module, ids: torch.Tensor, cfg: CompressConfig) -> torch.Tensor:
    """ids (B, T) -> token scores (B, T): the evaluator heads' attention from the last window queries."""
    n = _apps_needed(cfg, len(model.order))
    att = window_attention(model, ids, n, cfg.window).mean(3)  # (n, B, H, T): mean over window queries
    if cfg.heads is None:
        return att.sum((0, 2))
    return sum(att[a, :, h] for a, h in cfg.heads)


@torch.no_grad()
def calibrate_heads(model: torch.nn.Module, ids: torch.Tensor, important: torch.Tensor | None, cfg: CompressConfig,
                    n_heads: int = 4) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Pick the evaluator heads on calibration prompts ids (N, T).

    important (N, T) bool: the tokens that matter (e.g. the needle); None = the top 5% of tokens by the
    last layer application's head-mean attention from the last window queries (self-distillation).
    Returns ([(application, head)] best first, the per-head scores (evaluator_apps, H)).
    """
    n = cfg.evaluator_apps
    if important is None:
        last = len(model.order)
        tgt = window_attention(model, ids, last, cfg.window)[-1].mean((1, 2))  # (N, T)
        k = max(1, ids.size(1) // 20)
        important = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, tgt.topk(k, 1).indices, True)
    if important.shape != ids.shape or not bool(important.any(1).all()):
        raise ConfigError("calibrate_heads: important must be a (N, T) bool mask with at least one token per prompt")
    att = window_attention(model, ids, n, cfg.window).mean(3)  # (n, N, H, T)
    mass = (att * important[None, :, None, :]).sum(-1).mean(1)  # (n, H): attention mass on the important tokens
    order = mass.flatten().argsort(descending=True)[:n_heads]
    H = mass.size(1)
    return [(int(i) // H, int(i) % H) for i in order], mass
