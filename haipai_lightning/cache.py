"""Key/value caches for decoding: one cache per layer *application*.

A shared layer applied at recursion steps 1..Nr sees different hidden states at
each step, so its keys/values differ per step: the cache is indexed by the
position of the application in the execution order (`Schedule.order()`), not by
the unique layer.
"""

from __future__ import annotations

import torch


class LayerKV:
    """Preallocated (B, Hkv, max_len, hd) key and value buffers for one layer application."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T, hd); return all cached keys/values (B, Hkv, S, hd)."""
        B, H, T, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, self.max_len, hd)
            self.v = v.new_zeros(B, H, self.max_len, hd)
        if self.length + T > self.k.size(2):
            raise ValueError(f"KV cache is full ({self.k.size(2)} positions); raise max_seq_len")
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class KVCache:
    """All layer applications' caches plus the number of positions already seen."""

    def __init__(self, n_applications: int, max_len: int) -> None:
        self.layers = [LayerKV(max_len) for _ in range(n_applications)]
        self.max_len = max_len
        self.seen = 0  # tokens processed so far (the next token's position)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for l in self.layers for t in (l.k, l.v) if t is not None)
