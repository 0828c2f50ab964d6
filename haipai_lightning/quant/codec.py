"""The low-bit codec: symmetric absmax int8 / int4 codes with nibble packing, written once.

Used by the quantized weights (qtensor.py), the quantized KV cache (kv_cache.py) and the 8-bit /
4-bit optimizer states (train/optimizers.py). Symmetric absmax (LLM.int8, arXiv 2208.07339,
section 3.1): scale = max |x| / qmax over a group, codes = round(x / scale) in [-qmax, qmax]
(qmax 127 for int8, 7 for int4). int4 codes are stored offset by 8 (1..15, 8 = zero), two per
byte, element 2j in the low nibble and 2j+1 in the high one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the codec stores 8 or 4 bits")
    return 2 ** (bits - 1) - 1


def absmax_quantize(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., n, ...) -> (codes int8 in [-qmax, qmax], same shape; scale float32, `dim` kept as size 1)."""
    q = qmax(bits)
    scale = x.abs().amax(dim, keepdim=True).float().clamp(min=1e-12) / q
    return torch.round(x / scale).clamp(-q, q).to(torch.int8), scale


def absmax_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes int8 and their broadcastable scale -> float32 values."""
    return codes.float() * scale.float()


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] (..., n) -> (..., ceil(n / 2)) uint8, element 2j in the low nibble."""
    if u.size(-1) % 2:
        u = F.pad(u, (0, 1), value=8)  # the int4 code of zero
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(..., m) uint8 -> (..., n) uint8 codes in [0, 15] (n = 2m by default)."""
    u = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    return u if n is None else u[..., :n]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes in [-7, 7] (..., n) -> packed (..., ceil(n / 2)) uint8 (offset by 8)."""
    return pack_nibbles((codes.to(torch.int16) + 8).to(torch.uint8))


def unpack_int4(p: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Packed (..., m) uint8 -> signed int4 codes int8 (..., n)."""
    return (unpack_nibbles(p, n).to(torch.int16) - 8).to(torch.int8)
