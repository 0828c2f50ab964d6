"""KV-cache quantization (int8 / int4): the decoding cache really stores low-bit keys and values.

Each cached vector (one token, one kv head, hd values) is quantized symmetrically by its own
absmax: int8 codes in [-127, 127], or int4 codes in [-7, 7] packed two per byte, plus one fp32
scale per vector. Optionally (`hadamard=True`, QuaRot) a vector is multiplied by an orthogonal
Hadamard matrix H (hd, hd) before quantizing and by H^T after dequantizing: exact without
quantization, and it spreads outlier dimensions of the keys (RoPE leaves a few large ones) so
that one scale per vector fits all of them. QuaRot applies H to q and k online instead;
rotating inside the cache gives the same quantization error and leaves attention untouched.

`model.new_cache()` builds a quantized cache when `model.kv_cache_factory` is set (see
methods.py); a prefill through such a cache attends over the dequantized keys/values, which
is how perplexity under KV quantization is evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from haipai_lightning.quant.codec import absmax_dequantize, absmax_quantize, pack_int4, unpack_int4
from haipai_lightning.model.cache import KVCache, LayerKV
from haipai_lightning.quant.hadamard import has_hadamard, random_orthogonal


class QuantLayerKV(LayerKV):
    """A LayerKV whose key/value buffers hold int8 / packed int4 codes and per-vector scales."""

    def __init__(self, max_len: int, rows: int | None = None, bits: int = 8, hadamard: bool = True) -> None:
        super().__init__(max_len, rows)
        if bits not in (4, 8):
            raise ValueError(f"KV-cache bits={bits}: use 8 or 4")
        self.bits, self.use_hadamard = bits, hadamard
        self.rot: torch.Tensor | None = None  # (hd, hd) orthogonal, built at allocation
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def _alloc(self, R: int, H: int, hd: int, like: torch.Tensor) -> None:
        width = hd if self.bits == 8 else (hd + 1) // 2
        dtype = torch.int8 if self.bits == 8 else torch.uint8
        self.k = torch.zeros(R, H, self.max_len + 1, width, dtype=dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.k_scale = torch.zeros(R, H, self.max_len + 1, 1, device=like.device)
        self.v_scale = torch.zeros_like(self.k_scale)
        self.pos = torch.full((R, self.max_len + 1), -1, dtype=torch.long, device=like.device)
        self.lengths = torch.zeros(R, dtype=torch.long, device=like.device)
        self.hd, self.dtype = hd, like.dtype
        if self.use_hadamard and has_hadamard(hd):
            self.rot = random_orthogonal(hd, seed=0).float().to(like.device)

    def _quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., hd) -> codes (..., width), scale (..., 1)."""
        if self.rot is not None:
            x = x.float() @ self.rot
        q, scale = absmax_quantize(x, self.bits)  # per key / value vector
        return (q if self.bits == 8 else pack_int4(q)), scale

    def _dequant(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = absmax_dequantize(q if self.bits == 8 else unpack_int4(q, self.hd), scale)
        if self.rot is not None:
            x = x @ self.rot.T
        return x.to(self.dtype)

    def _entry_buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale]

    def _store(self, r: torch.Tensor, dest: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kq, ks = self._quant(k.transpose(1, 2))  # (B, T, H, w), (B, T, H, 1)
        vq, vs = self._quant(v.transpose(1, 2))
        self.k[r, :, dest], self.k_scale[r, :, dest] = kq, ks
        self.v[r, :, dest], self.v_scale[r, :, dest] = vq, vs

    def _load(self, rows_idx: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._dequant(self.k[rows_idx, :, :S], self.k_scale[rows_idx, :, :S])
        v = self._dequant(self.v[rows_idx, :, :S], self.v_scale[rows_idx, :, :S])
        return k, v

    def nbytes_used(self) -> int:
        if self.k is None:
            return 0
        H, width = self.k.size(1), self.k.size(3)
        per_entry = 2 * H * (width + 4)  # codes + one fp32 scale per vector, for keys and values
        return int(self.lengths.sum()) * per_entry


@dataclass
class QuantKVCacheFactory:
    """model.kv_cache_factory: (n_applications, max_len) -> a KVCache of QuantLayerKV."""

    bits: int = 8
    hadamard: bool = True

    def __call__(self, n_applications: int, max_len: int) -> KVCache:
        cache = KVCache(n_applications, max_len)
        cache.layers = [self.layer(max_len) for _ in range(n_applications)]
        return cache

    def layer(self, max_len: int, rows: int | None = None) -> QuantLayerKV:
        """One layer application's quantized cache (the depth-wise batching engine sizes its rows itself)."""
        return QuantLayerKV(max_len, rows, bits=self.bits, hadamard=self.hadamard)


def kv_bytes_per_token(bits: int | None, hd: int) -> float:
    """Bytes per cached (key or value) vector of one head: fp32, or codes + one fp32 scale."""
    return 4.0 * hd if bits is None else math.ceil(hd * bits / 8) + 4.0
