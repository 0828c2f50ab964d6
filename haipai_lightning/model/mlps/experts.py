"""Stacked SwiGLU experts and the sorted, vectorised token -> expert dispatch shared by MoE and MoT.

Weights are stacked per expert, w1, w3 (E, D, H) and w2 (E, H, D), so that
  - expert e on rows x (n, D) is (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e];
  - the rows of all experts run as one grouped matmul (`torch._grouped_mm`, which this torch
    has on CPU and CUDA) or as one matmul per expert on its contiguous slice (a loop over
    experts, never over tokens), or as one `bmm` when every expert has the same row count;
  - growth code (upcycling) copies a dense SwiGLU into every expert with `load_dense`.

A layer applied several times in one forward pass (MoR's shared block) emits one record per
application (`RouterRecord.application`; for a shared layer of a cycle schedule it is the recursion
step), so record names are unique: the model sums aux losses into a dict keyed by them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.config import ModelConfig

Dispatch = Literal["auto", "grouped_mm", "loop"]
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward
    rejects expanded (stride 0) gradients such as the one `.sum()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return g.contiguous()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) rows sorted by expert, w (E, K, N), counts[e] rows of expert e -> (M, N).

    offs: int32 (E,) cumulative row ends for `torch._grouped_mm`, or None for the per-expert loop.
    """
    if offs is not None:
        return _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offs))
    return torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))], dim=0)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights w1, w3 (E, D, H) and w2 (E, H, D)."""

    def __init__(self, cfg: ModelConfig, n_experts: int, hidden: int, dispatch: Dispatch = "auto") -> None:
        super().__init__()
        D, E = cfg.d_model, n_experts
        self.n_experts, self.hidden, self.dispatch = E, hidden, dispatch
        # initialised here: the model's _init only touches nn.Linear / nn.Embedding
        std = cfg.init_std
        self.w1 = nn.Parameter(torch.randn(E, D, hidden) * std)  # gate
        self.w3 = nn.Parameter(torch.randn(E, D, hidden) * std)  # up
        # down projection: residual output, scaled by depth like the dense SwiGLU's w2
        self.w2 = nn.Parameter(torch.randn(E, hidden, D) * (std / math.sqrt(2 * cfg.n_layers)))

    @property
    def macs_per_row(self) -> int:
        """Multiply-accumulates of one expert on one row (three D x H matmuls)."""
        return 3 * self.w1.size(1) * self.hidden

    @torch.no_grad()
    def load_dense(self, mlp: nn.Module) -> None:
        """Copy a dense SwiGLU (w1, w3, w2 nn.Linear) into every expert (MoE upcycling)."""
        self.w1.copy_(mlp.w1.weight.t().expand_as(self.w1))
        self.w3.copy_(mlp.w3.weight.t().expand_as(self.w3))
        self.w2.copy_(mlp.w2.weight.t().expand_as(self.w2))

    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.dispatch == "loop" or not _HAS_GROUPED_MM:
            return False
        # CUDA grouped GEMM wants bf16 on Hopper; the CPU kernel takes float32 too
        return self.dispatch == "grouped_mm" or not x.is_cuda or x.dtype == torch.bfloat16

    def sorted_rows(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, D) rows grouped by expert (counts (E,) rows each, in expert order) -> (M, D)."""
        cl = counts.tolist()  # one host sync per call: the slice sizes
        offs = torch.cumsum(counts, 0).to(torch.int32) if self._use_grouped(x) else None
        h = F.silu(grouped_matmul(x, self.w1, cl, offs)) * grouped_matmul(x, self.w3, cl, offs)  # (M, H)
        return grouped_matmul(h, self.w2, cl, offs)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """x (E, C, D): C rows per expert (expert-choice, Mixture-of-Tokens) -> (E, C, D), one bmm each."""
        return torch.bmm(F.silu(torch.bmm(x, self.w1)) * torch.bmm(x, self.w3), self.w2)


class _Permute(torch.autograd.Function):
    """rows = x[idx] for a permutation idx (inverse inv): the backward is the gather grad[inv],
    not the scatter-add autograd would use for an index_select."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(inv)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # noqa: D102
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def dispatch(experts: Experts, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-choice dispatch: out[n] = sum_j gates[n, j] * expert_{ids[n, j]}(x[n]).

    x (N, D); ids (N, k) long expert ids, -1 = no expert in that slot (dropped / not selected);
    gates (N, k). Returns out (N, D) and the number of rows the experts computed.
    Assignments are sorted by expert (stable, so each expert's rows keep token order) and each
    expert runs once on its contiguous slice. When every slot holds an expert the (token, slot)
    rows are a permutation of the sorted rows, so both directions are gathers; otherwise the
    kept rows are gathered and index_add sums the weighted results back.
    """
    N, k = ids.shape
    E = experts.n_experts
    flat = ids.flatten().masked_fill(ids.flatten() < 0, E)  # (N k,) unassigned -> sentinel E, sorted last
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E + 1)[:E]  # (E,)
    M = int(counts.sum())
    if M == N * k:  # dropless: permute, run, permute back
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(M, device=order.device))
        xs = _Permute.apply(x[:, None].expand(N, k, x.size(1)).reshape(M, -1), order, inv)  # (M, D) by expert
        y = _Permute.apply(experts.sorted_rows(xs, counts), inv, order).view(N, k, -1)  # (N, k, D)
        return (y * gates[..., None].to(y.dtype)).sum(1), M
    order = order[:M]
    tok = order // k  # (M,) token of each assignment
    y = experts.sorted_rows(x.index_select(0, tok), counts)  # (M, D)
    y = y * gates.flatten().index_select(0, order)[:, None].to(y.dtype)
    return x.new_zeros(N, x.size(1)).index_add(0, tok, y), M


def ids_to_mask(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids (..., k) with -1 padding -> bool (..., E): expert e took the token."""
    m = torch.zeros(*ids.shape[:-1], n_experts + 1, dtype=torch.bool, device=ids.device)
    return m.scatter_(-1, ids.masked_fill(ids < 0, n_experts), True)[..., :n_experts]
