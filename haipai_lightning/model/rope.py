"""Small building blocks shared by every component: RoPE tables and rotation."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE cos/sin tables, looked up by absolute token position.

    Lookup by position (not by slice) is what lets routed tokens that were gathered
    out of a sequence keep their original positions.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._build(max_seq_len)

    def _build(self, n: int) -> None:
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        ang = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (n, hd/2)
        # not persistent: derived data, rebuilt on load, never stale in a checkpoint
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) or (T,) int64 -> cos, sin broadcastable to (B, T, H, hd/2)."""
        # The friendly check syncs with the host, and under torch.compile that .item() would split the
        # graph at every layer group (3 graph breaks per forward); compiled code keeps inductor's own
        # bounds check on the index instead.
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.cos.size(0):
            raise ValueError(
                f"position {int(positions.max())} is beyond model.config.max_seq_len={self.cos.size(0)}; "
                "raise max_seq_len or use a shorter prompt / fewer new tokens"
            )
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd); rotate the two halves of each head (the Llama/HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
