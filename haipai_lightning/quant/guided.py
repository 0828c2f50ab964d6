"""GuidedQuant: the GPTQ objective weighted by end-loss gradients (Kim et al., arXiv 2505.07004).

GPTQ minimises each layer's output error ||X W^T - X Q^T||^2, which treats every output
coordinate of every token alike. GuidedQuant (section 3.1) weights the error of output z_tj by
how much the end loss cares, (d loss / d z_tj)^2 -- a diagonal Fisher approximation of the loss
change. Keeping the full per-channel Hessians H_j = sum_t g_tj^2 x_t x_t^T would cost N matrices
(K, K) per layer, so the paper (section 3.2) averages them within G groups of output channels:

    H_g = 2 sum_t ( mean_{j in group g} g_tj^2 ) x_t x_t^T        (block-diagonal Fisher)

and the rows of group g are quantized under H_g. For the uniform (scale / zero) formats Haipai
stores, each group is solved by GPTQ (the paper's "GuidedQuant + GPTQ"); for non-uniform
codebooks by LNQ (lnq.py). With all gradients equal to one, H_g = 2 X^T X for every g: the
objective is exactly GPTQ's (tests/quant/test_guided.py).

Gradients come from the model being quantized (collected in the same sequential pass as the
inputs, calibration.py); experts of routed MLPs keep plain GPTQ Hessians (their outputs are not
separate tensors we can hook cheaply).
"""

from __future__ import annotations

import torch

from haipai_lightning.quant.gptq import Quantized, gptq_quantize


def output_groups(n: int, groups: int) -> list[torch.Tensor]:
    """Row indices of the G (nearly) equal contiguous groups of n output channels."""
    return list(torch.arange(n).tensor_split(min(groups, n)))


def guided_hessians(x: torch.Tensor, grad: torch.Tensor, groups: int) -> torch.Tensor:
    """x (M, K) layer inputs, grad (M, N) d loss / d outputs -> (G, K, K): sum over tokens of
    2 * (mean squared gradient of the group's channels) * x x^T."""
    g2 = grad.double() ** 2
    x = x.double()
    out = []
    for rows in output_groups(grad.size(1), groups):
        wt = g2[:, rows].mean(1)  # (M,) each token's weight for this group
        out.append(2 * (x * wt[:, None]).T @ x)
    return torch.stack(out)


def guided_objective(w: torch.Tensor, q: torch.Tensor, hs: torch.Tensor) -> float:
    """sum_g tr((W_g - Q_g) H_g (W_g - Q_g)^T) over the output-channel groups."""
    d = (w.double() - q.double())
    return float(sum(torch.einsum("nk,kl,nl->", d[rows], h, d[rows])
                     for rows, h in zip(output_groups(w.size(0), hs.size(0)), hs.double())))


@torch.no_grad()
def guided_quantize(w: torch.Tensor, hs: torch.Tensor, bits: int, group_size: int = 32,
                    block_size: int = 128, damp: float = 0.01) -> Quantized:
    """GPTQ of each output-channel group of w (N, K) under its own guided Hessian hs[g] (G, K, K)."""
    parts = [gptq_quantize(w[rows], h, bits, group_size, block_size, damp)
             for rows, h in zip(output_groups(w.size(0), hs.size(0)), hs)]
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return Quantized(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero,
                     parts[0].bits, parts[0].group_size)
