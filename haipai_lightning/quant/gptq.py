"""GPTQ: second-order, column-by-column weight quantization into Haipai's own storage formats.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323), Algorithm 1. For a linear y = x W^T with calibration inputs X
(M, K), the layer-wise objective is ||X W^T - X Q^T||_F^2 = tr((W - Q) H (W - Q)^T) with
H = 2 X^T X (section 3, "Optimal Brain Quantization"). The columns are quantized one at a time
in a fixed order; after column i is rounded, the remaining columns absorb its error
(w_F -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_{i,F}), where the needed rows of the successive
inverse Hessians are the rows of the upper Cholesky factor of H^-1 ("Step 3: Cholesky
reformulation"), and the updates to the columns after a block of B = 128 columns are applied
once per block ("Step 2: lazy batch-updates"). Dampening: H += 1% of mean(diag H) * I.

Storage (the same buffers as round-to-nearest, qtensor.py, so QLinear, exports and loading
are unchanged):
- int8: per-row symmetric absmax, the scale fixed from the whole (unquantized) row up front;
- int4 container, b in {2, 3, 4} bits: group-wise asymmetric min-max with 2^b levels
  (codes in [0, 2^b - 1], w ~= q * scale + zero). As in GPTQ's group-wise variant (section 4,
  "grouping"), a group's scale / zero are taken when the solver reaches its first column, from
  the weights already updated by the earlier columns' errors. int3 / int2 use the int4 nibble
  container with fewer levels (same bytes on disk, only the levels differ).

With H = c I (no correlation between inputs) no error is propagated and every code equals the
round-to-nearest code: tests/quant/test_gptq.py checks that bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from haipai_lightning.quant.qtensor import QuantizedWeight, pack_int4


@dataclass
class Quantized:
    """A solved (N, K) matrix: codes and parameters in the QuantizedWeight layout."""

    codes: torch.Tensor  # int8 (N, K) for 8 bits; uint8 (N, K) in [0, 2^b - 1] otherwise
    scale: torch.Tensor  # (N,) for 8 bits; (N, K / g) otherwise
    zero: torch.Tensor | None  # (N, K / g) for the int4 container
    bits: int  # 8, or the levels' bits (2, 3, 4) in the int4 container
    group_size: int
    codebook: torch.Tensor | None = None  # (N, 2^bits) per-row levels (LNQ); then scale / zero are unused

    def dequantize(self) -> torch.Tensor:
        if self.codebook is not None:
            return self.codebook.float().gather(1, self.codes.long())
        if self.bits == 8:
            return self.codes.float() * self.scale[:, None]
        N, K = self.codes.shape
        g = self.group_size
        q = self.codes.float().view(N, K // g, g)
        return (q * self.scale[..., None] + self.zero[..., None]).view(N, K)

    def to_qweight(self) -> QuantizedWeight:
        """The stored module (int8, or the int4 nibble container)."""
        N, K = self.codes.shape
        container = 8 if self.bits == 8 else 4
        levels = 0 if self.codebook is None else self.codebook.size(1)
        qw = QuantizedWeight(N, K, container, self.group_size, codebook=levels)
        with torch.no_grad():
            if levels:
                qw.qweight.copy_(pack_int4(self.codes))
                qw.codebook.copy_(self.codebook)
                return qw
            if container == 8:
                qw.qweight.copy_(self.codes)
            else:
                qw.qweight.copy_(pack_int4(self.codes))
                qw.zero.copy_(self.zero)
            qw.scale.copy_(self.scale)
        return qw


def container_bits(bits: int) -> int:
    """Bits of the stored container: 8 -> int8; 2, 3, 4 -> the int4 nibble layout."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"weight bits={bits}: use 8, 4, 3 or 2")
    return 8 if bits == 8 else 4


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, g) one group of columns -> (scale (N,), zero (N,)): asymmetric min-max with 2^bits levels,
    the same arithmetic as qtensor.quantize_int4_groups (the range holds 0, so zeros stay exact)."""
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    return ((hi - lo) / float(2**bits - 1)).clamp(min=1e-12), lo


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> Quantized:
    """Round-to-nearest in the stored layout (for 2 / 3 bits, which qtensor.py does not produce)."""
    w = w.detach().float()
    N, K = w.shape
    if bits == 8:
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        return Quantized(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale, None, 8, group_size)
    wg = w.view(N, K // group_size, group_size)
    scale, zero = group_params(wg.reshape(-1, group_size), bits)
    scale, zero = scale.view(N, -1), zero.view(N, -1)
    q = torch.round((wg - zero[..., None]) / scale[..., None]).clamp(0, 2**bits - 1)
    return Quantized(q.view(N, K).to(torch.uint8), scale, zero, bits, group_size)


def layer_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """The GPTQ objective tr((W - Q) H (W - Q)^T) (equal to ||X W^T - X Q^T||^2 for H = X^T X)."""
    d = (w.double() - q.double())
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (H^-1 = U^T U), float64.
    Dampening grows tenfold until the factorisation succeeds."""
    h = h.double()
    K = h.size(0)
    mean = float(torch.diagonal(h).mean().clamp(min=1e-12))
    for attempt in range(6):
        hd = h + (damp * 10**attempt) * mean * torch.eye(K, dtype=h.dtype, device=h.device)
        L, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U
    raise RuntimeError("GPTQ: the Hessian could not be factorised even with 1e5x dampening")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int = 32, block_size: int = 128,
                  damp: float = 0.01) -> Quantized:
    """GPTQ (Algorithm 1) of w (N, K) under the Hessian h (K, K) (any positive scale: 2 X^T X, X^T X / M)."""
    W = w.detach().double().clone()
    N, K = W.shape
    H = h.detach().double().clone()
    dead = torch.diagonal(H) == 0  # inputs that are always zero: their weights never matter (paper's code)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_factor(H, damp)
    g = group_size if bits != 8 else K
    if bits != 8 and K % g:
        raise ValueError(f"GPTQ: input size {K} is not a multiple of group_size={g}")
    B = max(g, (block_size // g) * g) if bits != 8 else block_size  # blocks hold whole groups
    maxq = 2**bits - 1
    codes = torch.zeros(N, K, dtype=torch.int16)
    if bits == 8:  # per-row scale from the whole row, as round-to-nearest
        scale8 = (W.abs().amax(1).clamp(min=1e-12) / 127).float()
    else:
        scales = torch.zeros(N, K // g, dtype=torch.float32)
        zeros = torch.zeros(N, K // g, dtype=torch.float32)
    s = z = None
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            wcol = W1[:, i].float()
            if bits == 8:
                q = torch.round(wcol / scale8).clamp(-127, 127)
                deq = q * scale8
            else:
                if col % g == 0:  # a new group: its parameters from the current (updated) weights
                    s, z = group_params(W1[:, i:i + g].float(), bits)
                    scales[:, col // g], zeros[:, col // g] = s, z
                q = torch.round((wcol - z) / s).clamp(0, maxq)
                deq = q * s + z
            codes[:, col] = q.to(torch.int16)
            err = (W1[:, i] - deq.double()) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None]  # the block's remaining columns absorb the error
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]  # lazy batch update of the columns after the block
    if bits == 8:
        return Quantized(codes.to(torch.int8), scale8, None, 8, g)
    return Quantized(codes.to(torch.uint8), scales, zeros, bits, g)
