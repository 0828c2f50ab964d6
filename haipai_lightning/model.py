"""HaipaiModel: embedding -> recursion stack (prelude, Nr shared steps, coda) -> head.

Components are injected as factories `Callable[[ModelConfig], nn.Module]`: the
mixer (attention, later Mamba), the MLP (SwiGLU, later MoE / MoT) and the depth
router. The model returns logits, the auxiliary losses and the routing records;
it never logs and never touches a trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from haipai_lightning.cache import KVCache, LayerKV
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.layers import RotaryEmbedding
from haipai_lightning.mixers.attention import Attention
from haipai_lightning.mlps.dense import SwiGLU
from haipai_lightning.recursion import make_schedule
from haipai_lightning.routers import FullRecursion, RouterRecord

Factory = Callable[[ModelConfig], nn.Module]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, name -> scalar
    records: list[RouterRecord] = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mixer: Factory, mlp: Factory) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = mlp(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cos, sin, kv)
        return x + self.mlp(self.mlp_norm(x))


class HaipaiModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        mixer: Factory | None = None,
        mlp: Factory | None = None,
        router: Factory | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = make_schedule(cfg)
        self.order = self.schedule.order()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # One module per *unique* layer; the schedule applies shared ones several times,
        # so their weights really are one storage.
        self.layers = nn.ModuleList(
            Block(cfg, mixer or Attention, mlp or SwiGLU) for _ in range(self.schedule.n_unique)
        )
        self.router = (router or FullRecursion)(cfg)
        if not self.schedule.cycle and not isinstance(self.router, FullRecursion):
            raise ConfigError(
                f"model.router {type(self.router).__name__} needs a cycle strategy; "
                f"set model.config.sharing to cycle or middle_cycle (got {cfg.sharing})"
            )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, nn.Linear):
            # GPT-2 / nanoGPT: residual output projections scaled by depth, so the
            # residual stream's variance does not grow with the (effective) depth.
            s = std / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "is_residual_out", False) else std
            nn.init.normal_(m.weight, 0.0, s)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    # ----------------------------------------------------------------- counts
    def num_parameters(self) -> dict[str, int]:
        """unique: stored parameters; effective: parameters a token meets with every recursion."""
        unique = sum(p.numel() for p in self.parameters())
        shared = sum(p.numel() for i in self.schedule.shared for p in self.layers[i].parameters())
        return {"unique": unique, "effective": unique + (self.schedule.n_recursions - 1) * shared}

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(len(self.order), max_len or self.cfg.max_seq_len)

    # ---------------------------------------------------------------- forward
    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput(logits (B, T, V)). With a cache, T new tokens follow `cache.seen`."""
        B, T = input_ids.shape
        if positions is None:
            start = cache.seen if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
        records: list[RouterRecord] = []
        h = self.embed(input_ids)  # (B, T, D)

        def apply(h: torch.Tensor, pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            cos, sin = self.rope(pos)
            for a in range(lo, hi):
                h = self.layers[self.order[a][0]](h, cos, sin, cache[a] if cache is not None else None)
            return h

        n_pre = len(self.schedule.prelude)
        h = apply(h, positions, 0, n_pre)
        if self.schedule.cycle:
            for r, (lo, hi) in enumerate(self.schedule.step_slices()):
                h = self.router.step(r, h, lambda x, p, lo=lo, hi=hi: apply(x, p, lo, hi), positions, records)
            end = self.schedule.step_slices()[-1][1] if self.schedule.shared else n_pre
        else:
            end = n_pre + len(self.schedule.shared) * self.schedule.n_recursions
            h = apply(h, positions, n_pre, end)
        h = apply(h, positions, end, len(self.order))
        if cache is not None:
            cache.seen += T
        logits = self.head(self.norm(h))
        aux = {
            f"{rec.name}/{k}": rec.aux_weights.get(k, 1.0) * v for rec in records for k, v in rec.aux_losses.items()
        }
        return ModelOutput(logits=logits, aux_losses=aux, records=records)
