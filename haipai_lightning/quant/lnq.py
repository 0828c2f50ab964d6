"""LNQ: layer-wise non-uniform quantization (GuidedQuant, Kim et al., arXiv 2505.07004, section 4).

Each output row w (K,) is represented by a codebook c (2^b values, its own per row) and an
assignment of every weight to one code, w_hat = P c (P (K, 2^b) one-hot). The objective is the
(guided or GPTQ) layer objective (w - P c)^T H (w - P c). LNQ alternates two exact steps, so it
never increases the objective:

1. codebook, closed form: c = (P^T H P)^-1 P^T H w (the least-squares fit of the codes that are
   used; an unused code keeps its value);
2. assignments, coordinate descent: weight k moves to the code that minimises the objective with
   all other weights fixed. With the error r = w_hat - w, changing w_hat_k by d changes the
   objective by 2 d (H r)_k + d^2 H_kk; the current code (d = 0) is a candidate, so no step rises.

All rows are solved at once (vectorised over N). `lnq_solve` returns the stored form: b-bit codes
in the int4 nibble container plus a float32 codebook per row (QuantizedWeight(codebook=2^b),
qtensor.py), the `--method int3_lnq` / `int4_lnq` storage. Under GuidedQuant's block-diagonal
Fisher (hs (G, K, K), guided.py) each group of output rows is solved under its own Hessian, the
paper's "GuidedQuant + LNQ".
"""

from __future__ import annotations

import torch

from haipai_lightning.quant.gptq import Quantized
from haipai_lightning.quant.guided import output_groups


def lnq_objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = (w_hat - w).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


def _init(w: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform grid between each row's min and max, nearest assignment."""
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    c = lo + (hi - lo) * torch.linspace(0, 1, m, dtype=w.dtype)[None]  # (N, m)
    codes = (w[:, :, None] - c[:, None, :]).abs().argmin(-1)  # (N, K)
    return c, codes


def _codebook_step(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    N, m = c.shape
    P = torch.nn.functional.one_hot(codes, m).double()  # (N, K, m)
    HP = torch.einsum("kl,nlm->nkm", h, P)  # (N, K, m)
    A = torch.einsum("nkj,nkm->njm", P, HP)  # P^T H P (N, m, m)
    b = torch.einsum("nkm,nk->nm", HP, w)  # P^T H w (N, m)
    unused = P.sum(1) == 0  # (N, m)
    A = A.masked_fill(unused[:, :, None] | unused[:, None, :], 0.0)
    A = A + torch.diag_embed(unused.double())
    b = torch.where(unused, c, b)
    return torch.linalg.solve(A, b)


def _assignment_step(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    codes = codes.clone()
    w_hat = c.gather(1, codes)
    r = w_hat - w
    hr = r @ h  # (N, K) (H symmetric)
    hdiag = torch.diagonal(h)
    for k in range(w.size(1)):
        d = c - w_hat[:, k:k + 1]  # (N, m) change of w_hat_k for each code
        score = 2 * d * hr[:, k:k + 1] + d * d * hdiag[k]
        j = score.argmin(1)  # the current code scores 0, so the objective cannot rise
        dk = d.gather(1, j[:, None])[:, 0]
        codes[:, k] = j
        w_hat[:, k] += dk
        hr += dk[:, None] * h[k][None]
    return codes


@torch.no_grad()
def lnq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 3, iters: int = 4,
                 history: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K), h (K, K) -> (w_hat (N, K), codes long (N, K), codebooks (N, 2^bits)), float64.
    `history` receives the objective after the initialisation and after every half-step."""
    w, h = w.double(), h.double()
    h = h + 1e-8 * torch.diagonal(h).mean() * torch.eye(h.size(0), dtype=h.dtype)  # keep P^T H P invertible
    c, codes = _init(w, 2**bits)
    for it in range(iters):
        if history is not None and it == 0:
            history.append(lnq_objective(w, c.gather(1, codes), h))
        c = _codebook_step(w, h, c, codes)
        if history is not None:
            history.append(lnq_objective(w, c.gather(1, codes), h))
        codes = _assignment_step(w, h, c, codes)
        if history is not None:
            history.append(lnq_objective(w, c.gather(1, codes), h))
    return c.gather(1, codes), codes, c


@torch.no_grad()
def lnq_solve(w: torch.Tensor, h: torch.Tensor, bits: int, iters: int = 4) -> Quantized:
    """w (N, K); h (K, K) GPTQ Hessian or (G, K, K) guided Hessians of G row groups -> Quantized
    with uint8 codes (N, K) and a float32 codebook (N, 2^bits)."""
    groups = [(torch.arange(w.size(0)), h)] if h.dim() == 2 else list(zip(output_groups(w.size(0), h.size(0)), h))
    codes = torch.empty(w.shape, dtype=torch.uint8)
    book = torch.empty(w.size(0), 2**bits)
    for rows, hg in groups:
        _, c, b = lnq_quantize(w[rows], hg, bits, iters)
        codes[rows], book[rows] = c.to(torch.uint8), b.float()
    return Quantized(codes, torch.ones(w.size(0)), None, bits, w.size(1), codebook=book)
