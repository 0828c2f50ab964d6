"""Low-bit weight storage (round-to-nearest) and fake quantization.

`QuantizedWeight` holds a (N, K) matrix really stored low-bit, as buffers that go into the
state dict (so a safetensors export shrinks):

- int8: per-output-channel symmetric, codes in [-127, 127]: `qweight` int8 (N, K), `scale` (N,).
- int4: group-wise asymmetric over `group_size` consecutive input channels (the GPTQ / torchao
  int4 weight-only layout), codes in [0, 15] packed two per byte: `qweight` uint8 (N, K/2),
  `scale`, `zero` (N, K/group) with w ~= q * scale + zero.

Why our own round-to-nearest rather than torchao: torchao 0.18 (the current release) on this
torch 2.13 CPU build quantizes int8 fine, but its int4 weight-only path fails on fp32 CPU
("Requires mslk >= 1.0.0" for the plain layout, bf16-only for tile_packed_to_4d), and bf16 runs
~34x slower here (shared/MACHINE.md). The kernels torchao's CPU path calls are aten ops that
torch ships itself, so we call them directly (`layers.py`) and keep no extra dependency.
"""

from __future__ import annotations

import torch
from torch import nn

from haipai_lightning.quant.codec import absmax_quantize, pack_nibbles, unpack_nibbles


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (codes int8 (N, K), scale (N,)): symmetric absmax per row."""
    q, scale = absmax_quantize(w, 8, dim=1)
    return q, scale[:, 0]


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> (codes uint8 (N, K) in [0, 15], scale (N, K/g), zero (N, K/g)): asymmetric min-max per group."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range holds 0: zeros stay exact
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scale, lo


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K/2) uint8: element 2j in the low nibble, 2j+1 in the high one."""
    return pack_nibbles(q)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    return unpack_nibbles(p)


def fake_quant_tokens(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """Symmetric per-token (last dim) quantize-dequantize, as a W?A{bits} kernel would see x (..., K)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(-1, keepdim=True) * clip).clamp(min=1e-12) / qmax
    return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale


def quantize_int8_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (codes int8 (M, K), scale (M, 1)): dynamic symmetric per-token activation quantization."""
    return absmax_quantize(x, 8, dim=-1)


class QuantizedWeight(nn.Module):
    """A (N, K) weight stored in int8 (per-channel) or int4 (group-wise); see the module docstring."""

    def __init__(self, n: int, k: int, bits: int, group_size: int = 32, codebook: int = 0) -> None:
        """codebook > 0 (int4 container only): each row's codes index its own `codebook` float values
        (LNQ's non-uniform levels, lnq.py) instead of the group-wise scale / zero."""
        super().__init__()
        if codebook and (bits != 4 or not 2 <= codebook <= 16):
            raise ValueError(f"codebook={codebook}: needs bits=4 and 2..16 levels")
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: only 8 and 4 are supported")
        if codebook and k % 2:
            raise ValueError(f"a codebook weight packs two codes a byte: the input size {k} must be even")
        if bits == 4 and not codebook and k % group_size:
            raise ValueError(f"int4 needs the input size {k} to be a multiple of group_size={group_size}")
        self.n, self.k, self.bits, self.group_size = n, k, bits, group_size
        self.codebook_size = codebook
        if codebook:
            self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))
            self.register_buffer("codebook", torch.zeros(n, codebook))  # (N, levels) per-row values
        elif bits == 8:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(n))
        else:
            self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(n, k // group_size))
            self.register_buffer("zero", torch.zeros(n, k // group_size))

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int = 32) -> "QuantizedWeight":
        qw = cls(w.size(0), w.size(1), bits, group_size)
        with torch.no_grad():
            if bits == 8:
                q, s = quantize_int8_rows(w.detach().float())
                qw.qweight.copy_(q)
                qw.scale.copy_(s)
            else:
                q, s, z = quantize_int4_groups(w.detach().float(), group_size)
                qw.qweight.copy_(pack_int4(q))
                qw.scale.copy_(s)
                qw.zero.copy_(z)
        return qw

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Integer codes of `rows` (all rows when None): int8 (n, K) or uint8 (n, K) in [0, 15]."""
        q = self.qweight if rows is None else self.qweight[rows]
        return q if self.bits == 8 else unpack_int4(q.reshape(-1, q.size(-1))).reshape(*q.shape[:-1], self.k)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K) float32 (or (*rows.shape, K) for an index tensor `rows`)."""
        if self.codebook_size:  # non-uniform: w[n, k] = codebook[n, code[n, k]]
            book = self.codebook if rows is None else self.codebook[rows]  # (..., levels)
            return book.gather(-1, self.codes(rows).long())
        q = self.codes(rows).float()
        if self.bits == 8:
            s = self.scale if rows is None else self.scale[rows]
            return q * s[..., None]
        s = self.scale if rows is None else self.scale[rows]  # (..., K/g)
        z = self.zero if rows is None else self.zero[rows]
        qg = q.reshape(*q.shape[:-1], self.k // self.group_size, self.group_size)
        return (qg * s[..., None] + z[..., None]).reshape(q.shape)

    def extra_repr(self) -> str:
        if self.codebook_size:
            return f"{self.n}x{self.k}, int4 codes, {self.codebook_size}-level codebook per row"
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.n}x{self.k}, int{self.bits}{g}"
