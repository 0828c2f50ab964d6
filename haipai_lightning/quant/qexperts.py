"""QExperts: a MoE / MoT expert stack whose weights are stored low-bit, one QLinear per expert matrix.

`Experts` (model/mlps/experts.py) keeps w1, w3 (E, D, H) and w2 (E, H, D) as stacked parameters;
expert e computes (silu(x w1[e]) * (x w3[e])) w2[e]. As linears (y = x W^T) its matrices are
W1_e = w1[e]^T (H, D), W3_e = w3[e]^T (H, D), W2_e = w2[e]^T (D, H), and each is stored as a
QuantizedWeight (qtensor.py, int8 / int4 container) inside a QLinear, so an expert runs on the
same kernels as the dense layers. The interface the routed MLPs call is kept: n_experts, hidden,
sorted_rows (token-choice / expert-choice dispatch: one call per expert on its contiguous slice)
and batched (Mixture-of-Tokens mixtures, expert-choice training shape), macs_per_row (FLOPs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.quant.layers import QLinear
from haipai_lightning.quant.qtensor import QuantizedWeight


def group_for(k: int, group_size: int) -> int:
    """The int4 group size used for an input size k: group_size, or one group per row when it does not divide k."""
    return group_size if k % group_size == 0 else k


class QExperts(nn.Module):
    """E quantized SwiGLU experts (see the module docstring)."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, bits: int, group_size: int,
                 act_bits: int | None = None) -> None:
        """An empty stack of the stored shapes (loading an export); bits is the container (8 or 4)."""
        super().__init__()
        self.n_experts, self.hidden, self.dispatch = n_experts, hidden, "loop"

        def q(n: int, k: int) -> QLinear:
            return QLinear(QuantizedWeight(n, k, bits, group_for(k, group_size)), act_bits)

        self.w1 = nn.ModuleList(q(hidden, d_model) for _ in range(n_experts))
        self.w3 = nn.ModuleList(q(hidden, d_model) for _ in range(n_experts))
        self.w2 = nn.ModuleList(q(d_model, hidden) for _ in range(n_experts))

    @classmethod
    def from_qweights(cls, w1: list[QuantizedWeight], w3: list[QuantizedWeight], w2: list[QuantizedWeight],
                      act_bits: int | None = None) -> "QExperts":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.n_experts, m.hidden, m.dispatch = len(w1), w1[0].n, "loop"
        m.w1 = nn.ModuleList(QLinear(q, act_bits) for q in w1)
        m.w3 = nn.ModuleList(QLinear(q, act_bits) for q in w3)
        m.w2 = nn.ModuleList(QLinear(q, act_bits) for q in w2)
        return m

    @property
    def macs_per_row(self) -> int:
        return 3 * self.w1[0].in_features * self.hidden

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on rows x (..., D) -> (..., D)."""
        return self.w2[e](F.silu(self.w1[e](x)) * self.w3[e](x))

    def sorted_rows(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) rows grouped by expert (counts (E,)) -> (M, D)."""
        parts = [self.expert(e, xe) for e, xe in enumerate(x.split(counts.tolist())) if xe.size(0)]
        return torch.cat(parts) if parts else x.new_zeros(0, x.size(1))

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x (E, C, D) -> (E, C, D)."""
        return torch.stack([self.expert(e, x[e]) for e in range(self.n_experts)])
