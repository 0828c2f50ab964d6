"""Gather / scatter of routed tokens.

Routing saves real compute: the chosen tokens of each sequence are gathered into a smaller
(B, k, D) tensor, run, and scattered back (MoR paper, arXiv 2507.10524, section 2.2; Mixture-of-
Depths, arXiv 2404.02258, section 3.3). Gathered tokens keep their positions and causal order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

@dataclass
class Selection:
    """The tokens of each sequence that take part in a computation.

    idx (B, k): positions into the full sequence, ascending within each row, so the
    gathered tokens keep their causal order; rows with fewer tokens are padded at the
    end with the dummy position T (their outputs are dropped at scatter time, and
    being last they are never attended to by real tokens under a causal mask).
    idx None means "every token" (no gather).
    """

    idx: torch.Tensor | None  # (B, k) int64
    valid: torch.Tensor | None  # (B, k) bool, None when every row is full
    T: int

    @staticmethod
    def full(T: int) -> "Selection":
        return Selection(None, None, T)

    @property
    def is_full(self) -> bool:
        return self.idx is None

    def mask(self, B: int, device: torch.device) -> torch.Tensor:
        """Boolean (B, T) membership."""
        if self.idx is None:
            return torch.ones(B, self.T, dtype=torch.bool, device=device)
        m = torch.zeros(B, self.T + 1, dtype=torch.bool, device=device)
        m.scatter_(1, self.idx, True if self.valid is None else self.valid)
        return m[:, : self.T]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, ...) -> (B, k, ...); padded slots read position 0 (harmless, dropped later)."""
        if self.idx is None:
            return x
        idx = self.idx.clamp(max=self.T - 1)
        return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))

    def scatter(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write new (B, k, D) rows into x (B, T, D) at idx; padded slots go to a dummy row."""
        if self.idx is None:
            return new
        ext = torch.cat([x, x.new_zeros(x.size(0), 1, x.size(2))], dim=1)  # (B, T+1, D)
        ext = ext.scatter(1, self.idx[..., None].expand(-1, -1, x.size(2)), new)
        return ext[:, : self.T]

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Absolute positions of the selected tokens: (T,) or (B, T) -> (B, k) (or (T,) when full)."""
        if self.idx is None:
            return positions
        pos = positions if positions.dim() == 2 else positions.expand(self.idx.size(0), -1)
        return self.gather(pos)

    def count(self) -> torch.Tensor:
        """(B,) number of selected tokens per row."""
        if self.idx is None:
            raise ValueError("full selection")
        return self.idx.new_full((self.idx.size(0),), self.idx.size(1)) if self.valid is None else self.valid.sum(1)

    def sub(self, local: "Selection") -> "Selection":
        """Compose: `local` selects among this selection's k slots -> positions in the full sequence."""
        if self.idx is None:
            return local
        if local.idx is None:
            return self
        ext = torch.cat([self.idx, self.idx.new_full((self.idx.size(0), 1), self.T)], dim=1)
        return Selection(ext.gather(1, local.idx), local.valid, self.T)


def select_topk(scores: torch.Tensor, k: int, T: int) -> Selection:
    """scores (B, n) -> the k best of each row, in ascending index order (n = T here or a candidate count)."""
    idx = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return Selection(idx, None, T)


def select_topk_rows(scores: torch.Tensor, k: torch.Tensor, T: int) -> Selection:
    """scores (B, n) -> the k[b] best of row b (k (B,) long), ascending, padded to the largest k.

    A per-sequence capacity (budget-aware routing, model/budget.py): one topk at the largest k,
    ranks beyond a row's own k become pads (position T, sorted last)."""
    kmax = int(k.max())
    top = scores.topk(kmax, dim=1, sorted=True).indices  # (B, kmax) best first
    keep = torch.arange(kmax, device=scores.device)[None] < k[:, None]
    idx = torch.where(keep, top, torch.full_like(top, T)).sort(dim=1).values  # pads (T) go last
    valid = torch.arange(kmax, device=scores.device)[None] < k[:, None]
    return Selection(idx, None if bool(valid.all()) else valid, T)


def select_mask(mask: torch.Tensor) -> Selection:
    """mask (B, n) bool -> the True entries of each row, ascending, padded to the batch's largest count.

    Vectorised (one argsort), no Python loop over samples.
    """
    B, n = mask.shape
    counts = mask.sum(1)
    k = int(counts.max()) if B else 0
    ar = torch.arange(n, device=mask.device)
    order = torch.where(mask, ar, ar + n).argsort(dim=1)[:, :k]  # selected first, in order
    valid = torch.arange(k, device=mask.device)[None] < counts[:, None]
    idx = torch.where(valid, order, torch.full_like(order, n))
    return Selection(idx, None if bool(valid.all()) else valid, n)


def spaced_mask(B: int, T: int, k: int) -> torch.Tensor:
    """bool (B, T): k evenly spaced tokens per row (a nominal selection of k tokens, for planning)."""
    m = torch.zeros(B, T, dtype=torch.bool)
    m[:, torch.linspace(0, T - 1, k).round().long()] = True
    return m
