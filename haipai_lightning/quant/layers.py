"""Inference modules over low-bit weights: QLinear (replaces nn.Linear) and QEmbedding.

Kernels (torch's own aten ops, the ones torchao's CPU path calls):
- int8 weight-only: `torch._weight_int8pack_mm` (x float, w int8, per-channel scales).
- int8 dynamic activation + weight (W8A8): per-token absmax int8 activations, `torch._int_mm`
  (int8 x int8 -> int32), rescaled by both scales.
- int4 weight-only: `torch._weight_int4pack_mm_for_cpu` on the kernel's packed layout, built
  from the stored nibbles once (a non-persistent cache: the export stores the plain nibbles).
- act_bits=4 (the W4A4 simulation): activations are fake-quantized per token to 4 bits before
  the weight kernel; CPUs have no int4 x int4 matmul, so W4A4 (QuaRot, arXiv 2404.00456) is simulated.
Off CPU, or where a kernel refuses a shape, the weight is dequantized and F.linear runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.quant.hadamard import hadamard
from haipai_lightning.quant.qtensor import QuantizedWeight, fake_quant_tokens, quantize_int8_tokens


class QLinear(nn.Module):
    """y = x W^T with W stored low-bit; optional per-token activation quantization and an online
    Hadamard transform of the input (QuaRot's rotation of the down projection's input: the weight
    was multiplied by the same orthogonal matrix when it was quantized, so without quantization
    the product is unchanged)."""

    def __init__(self, qw: QuantizedWeight, act_bits: int | None = None, online_hadamard: bool = False) -> None:
        super().__init__()
        self.qw, self.act_bits, self.online_hadamard = qw, act_bits, online_hadamard
        self.in_features, self.out_features = qw.k, qw.n
        if online_hadamard:
            h = (hadamard(qw.k) / math.sqrt(qw.k)).float()  # orthogonal (K, K)
            self.register_buffer("hadamard", h, persistent=False)  # derived from K; never stored
        self._int4_cache: tuple | None = None
        self._kernel_ok = True

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int, group_size: int = 32, act_bits: int | None = None,
                    online_hadamard: bool = False) -> "QLinear":
        if lin.bias is not None:
            raise ValueError("QLinear: biased linears are not used by Haipai models")
        w = lin.weight.detach().float()
        if online_hadamard:  # (x H)(W H)^T = x W^T: quantize W H, rotate x online
            w = w @ (hadamard(w.size(1)) / math.sqrt(w.size(1))).float()
        return cls(QuantizedWeight.from_float(w, bits, group_size), act_bits, online_hadamard)

    def _load_from_state_dict(self, *args, **kwargs):  # new codes: the packed kernel layout is stale
        self._int4_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _int4_kernel_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._int4_cache is None:
            qw = self.qw
            packed = torch._convert_weight_to_int4pack_for_cpu(qw.codes().to(torch.int32), 1)
            # the kernel dequantizes (q - 8) * scale + zero_mid, so zero_mid = zero + 8 * scale
            sz = torch.stack((qw.scale.t(), (qw.zero + 8 * qw.scale).t()), dim=-1).contiguous()  # (K/g, N, 2)
            self._int4_cache = (packed, sz)
        return self._int4_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()  # (M, K)
        if self.online_hadamard:
            x2 = x2 @ self.hadamard
        qw = self.qw
        if self.act_bits == 8 and qw.bits == 8:
            y = self._w8a8(x2)
        else:
            if self.act_bits is not None:
                x2 = fake_quant_tokens(x2, self.act_bits)
            y = self._weight_only(x2)
        return y.reshape(*shape[:-1], qw.n).to(x.dtype)

    def _w8a8(self, x2: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_int8_tokens(x2)  # (M, K) int8, (M, 1)
        if x2.is_cpu and self._kernel_ok:
            try:
                return torch._int_mm(xq, self.qw.qweight.t()).float() * sx * self.qw.scale[None]
            except RuntimeError:  # a shape the kernel refuses: same arithmetic in float
                self._kernel_ok = False
        return (xq.float() @ self.qw.qweight.float().t()) * sx * self.qw.scale[None]

    def _weight_only(self, x2: torch.Tensor) -> torch.Tensor:
        qw = self.qw
        if qw.codebook_size:  # no library kernel takes per-row codebooks: dequantize, fp32 matmul
            return F.linear(x2, qw.dequantize())
        if x2.is_cpu and self._kernel_ok and x2.size(0) > 0:
            try:
                if qw.bits == 8:
                    return torch._weight_int8pack_mm(x2, qw.qweight, qw.scale)
                packed, sz = self._int4_kernel_args()
                return torch._weight_int4pack_mm_for_cpu(x2, packed, qw.group_size, sz)
            except RuntimeError:
                self._kernel_ok = False
        return F.linear(x2, qw.dequantize())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (N, K) weight, computed on access: for code that reads .weight's device or
        size (FLOP counts, the engine); the forward pass never materialises it on CPU."""
        return self.qw.dequantize()

    def extra_repr(self) -> str:
        return f"act_bits={self.act_bits}, online_hadamard={self.online_hadamard}"


class QEmbedding(nn.Module):
    """Token embedding whose table is a QuantizedWeight (rows dequantized on lookup).

    With tied embeddings the table and the output head share one QuantizedWeight: per-row int8
    scales of the table are the head's per-output-channel scales, and int4 groups run along D
    in both, so one low-bit tensor serves both, as the fp32 model shares one matrix.
    """

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__()
        self.qw = qw
        self.num_embeddings, self.embedding_dim = qw.n, qw.k

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, D) table, computed on access (for code that reads .weight's device/size)."""
        return self.qw.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        return self.qw.dequantize(ids)
