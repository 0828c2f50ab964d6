"""LESA: learnable layer scaling-up (Yang et al., arXiv 2502.13794), the weight-prediction side.

The paper's observation (section 3.1): concatenate the same matrix of all layers side by side,
[W_1 | W_2 | ... | W_L] = U S [V_1^T | ... | V_L^T] (one SVD), so W_i = U S V_i^T: every layer is
a set of coefficients V_i^T (r, in) in one shared basis U S, and the coefficients of adjacent
layers are continuous. LESA (section 3.2) trains a small MLP to predict a layer's coefficients
from its two neighbours' and inserts new layers with predicted coefficients between existing ones.

Here, per matrix name of a block (wq, wk, wv, wo, w1, w2, w3, Mamba's projections ...):
- the basis U S comes from the SVD of the training layers' concatenation (full rank r = out);
- a sample is one singular direction s of one triple (i-1, i, i+1) of consecutive layers:
  input (v_{i-1}[s], v_{i+1}[s]), target v_i[s] (each a row of V^T, length `in`), so a model of
  L layers gives r (L - 2) samples; the MLP (GELU, 2 -> hidden -> 1, applied to every coefficient
  pair (v_{i-1}[s, t], v_{i+1}[s, t]): a small model does not overfit the few layers of a small LM;
  the paper's MLP maps whole vectors, trained on 30+ layer LLMs) predicts the residual
  from the neighbours' average (its last layer starts at zero: LESA starts from averaging);
- the loss weights direction s by s_s^2, so it is the squared Frobenius error of the
  reconstructed matrix U S (V_pred - V)^T, relative to the layer's own norm;
- vectors (norm gains) and other tensors (stacked experts, Mamba's A / D / conv) are the
  average of the two neighbours (no SVD model for them here).

Function preservation: none. An inserted layer is a new function in the residual stream; the
growth report measures the logit change (grow/ops.py `lesa`), which is not bounded.
"""

from __future__ import annotations

import torch
from torch import nn

Layer = dict[str, torch.Tensor]  # a block's tensors by local name ("mixer.wq.weight", ...)


class _Predictor:
    """SVD basis + MLP for one matrix name."""

    def __init__(self, mats: list[torch.Tensor], triples: list[tuple[int, int, int]], hidden: int, steps: int,
                 lr: float, seed: int, weight_decay: float = 0.1) -> None:
        W = torch.cat([m.double() for m in mats], dim=1)  # (out, L in)
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        keep = S > S[0] * 1e-10
        self.U, self.S = U[:, keep], S[keep]
        coeffs = [self.coeffs(m) for m in mats]  # (r, in) each
        self.scale = float(torch.cat(coeffs).std().clamp(min=1e-12))
        g = torch.Generator().manual_seed(seed)
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.GELU(), nn.Linear(hidden, 1)).double()
        self.alpha = nn.Parameter(torch.ones((), dtype=torch.float64))  # the neighbours' average, learned gain
        with torch.no_grad():
            for p in self.mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 / (p.size(-1) ** 0.5)))
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
        if triples:
            x = torch.cat([torch.stack([coeffs[a], coeffs[c]], -1) for a, _, c in triples]) / self.scale
            y = torch.cat([coeffs[b] for _, b, _ in triples]) / self.scale  # (n r, in)
            w = (self.S**2 / (self.S**2).sum()).repeat(len(triples))[:, None]  # s_s^2: Frobenius weighting
            opt = torch.optim.AdamW([*self.mlp.parameters(), self.alpha], lr=lr, weight_decay=weight_decay)
            for _ in range(steps):
                loss = (w * (self._predict(x) - y) ** 2).sum() / len(triples)
                opt.zero_grad()
                loss.backward()
                opt.step()

    def coeffs(self, m: torch.Tensor) -> torch.Tensor:
        """V^T block of a matrix in this basis: S^-1 U^T W (r, in)."""
        return (self.U.T @ m.double()) / self.S[:, None]

    def _predict(self, x: torch.Tensor) -> torch.Tensor:  # (..., 2) neighbour coefficient pairs -> (...)
        return self.alpha * 0.5 * (x[..., 0] + x[..., 1]) + self.mlp(x)[..., 0]

    @torch.no_grad()
    def predict(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        x = torch.stack([self.coeffs(prev), self.coeffs(nxt)], -1) / self.scale
        v = self._predict(x) * self.scale  # (r, in)
        return (self.U * self.S) @ v  # U S V^T


class LESA:
    """Fit on a sequence of layers (execution order); predict a layer between two given ones.

    skip: indices of layers that must not be used (leave-one-layer-out evaluation)."""

    def __init__(self, layers: list[Layer], skip: set[int] | None = None, hidden: int = 16, steps: int = 100,
                 lr: float = 3e-3, seed: int = 0) -> None:
        skip = skip or set()
        keep = [i for i in range(len(layers)) if i not in skip]
        pos = {i: n for n, i in enumerate(keep)}
        triples = [(pos[i - 1], pos[i], pos[i + 1]) for i in range(1, len(layers) - 1)
                   if {i - 1, i, i + 1}.isdisjoint(skip)]
        self.predictors: dict[str, _Predictor] = {}
        torch.manual_seed(seed)
        for name, t in layers[0].items():
            same = all(layers[i][name].shape == t.shape for i in keep)
            if t.dim() == 2 and t.is_floating_point() and same:
                self.predictors[name] = _Predictor([layers[i][name] for i in keep], triples, hidden, steps, lr, seed)

    def predict(self, prev: Layer, nxt: Layer) -> Layer:
        out = {}
        for name, a in prev.items():
            p = self.predictors.get(name)
            if p is not None:
                out[name] = p.predict(a, nxt[name]).to(a.dtype)
            elif a.is_floating_point():
                out[name] = (0.5 * (a.double() + nxt[name].double())).to(a.dtype)
            else:
                out[name] = a.clone()
        return out


def block_tensors(state: dict[str, torch.Tensor], i: int) -> Layer:
    """The tensors of unique layer i from a model state dict, by local name."""
    p = f"layers.{i}."
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


def relative_error(pred: torch.Tensor, true: torch.Tensor) -> float:
    return float((pred.double() - true.double()).norm() / true.double().norm().clamp(min=1e-30))
