"""Dense SwiGLU MLP (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ModelConfig


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); hidden size from `ModelConfig.ffn_dim` unless given."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            hidden: hidden size override (None = cfg.ffn_dim).
        """
        super().__init__()
        h = hidden or cfg.ffn_dim
        self.w1 = nn.Linear(cfg.d_model, h, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, h, bias=False)  # up
        self.w2 = nn.Linear(h, cfg.d_model, bias=False)  # down
        self.w2.is_residual_out = True  # scaled init, see HaipaiModel._init

    def stream_io(self) -> tuple[list[nn.Linear], list[nn.Linear]]:
        """(linears reading the normed residual stream, linears writing it)."""
        return [self.w1, self.w3], [self.w2]

    @classmethod
    def widened_init_args(cls, init_args: dict, factor: int) -> dict:
        """init_args for a model widened `factor` times (HyperCloning)."""
        out = dict(init_args)
        if out.get("hidden"):
            out["hidden"] = factor * out["hidden"]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        if torch.is_grad_enabled() and type(self.w1) is nn.Linear and type(self.w3) is nn.Linear:
            # training: gate and up in one matmul (one GEMM, one gradient sum for x instead of two);
            # plain nn.Linear only, see Attention._qkv
            gate, up = F.linear(x, torch.cat([self.w1.weight, self.w3.weight])).split(
                [self.w1.out_features, self.w3.out_features], dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)
