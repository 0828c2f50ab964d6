"""Key/value caches for decoding: one cache per layer *application*, ragged per row.

A shared layer applied at recursion steps 1..Nr sees different hidden states at each step,
so its keys/values differ per step: the cache is indexed by the position of the application
in the execution order (`Schedule.order()`), not by the unique layer.

Rows are ragged. Under MoR routing a token only leaves keys/values at the recursion steps it
visits (recursion-wise caching), so each row of a step's cache holds its own number of
entries. `LayerKV` keeps per-row lengths and the absolute position of every entry; an update
appends each row's valid new entries after its own last one and returns the mask under which
a new query sees exactly the cached tokens at or before it. `KVView` addresses a subset of
rows (the depth-wise batching engine keeps one row per (recursion step, request slot)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class LayerKV:
    """(R, Hkv, max_len, hd) key/value buffers with per-row lengths and entry positions."""

    def __init__(self, max_len: int, rows: int | None = None) -> None:
        self.max_len = max_len
        self.rows = rows  # None: sized by the first update
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (R, max_len + 1) absolute position of each entry
        self.lengths: torch.Tensor | None = None  # (R,) entries per row
        self.state: dict[str, Any] = {}  # recurrent mixers (Mamba) keep their decoding state here

    def _alloc(self, R: int, H: int, hd: int, like: torch.Tensor) -> None:
        # one spare slot at the end: padded (invalid) entries are written there and never read
        self.k = like.new_zeros(R, H, self.max_len + 1, hd)
        self.v = like.new_zeros(R, H, self.max_len + 1, hd)
        self.pos = torch.full((R, self.max_len + 1), -1, dtype=torch.long, device=like.device)
        self.lengths = torch.zeros(R, dtype=torch.long, device=like.device)

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append k, v (B, Hkv, T, hd) at `positions` (B, T) to `rows` (B,) (default: rows 0..B-1).

        Only entries with valid (B, T) True are stored. Returns the rows' keys and values
        (B, Hkv, S, hd) and a mask (B, 1, T, S): new query j sees the keys stored before this
        update plus the new ones up to itself (new tokens arrive in causal order). The mask is
        None when no masking is needed (every row complete and aligned, one new token).
        """
        B, H, T, hd = k.shape
        if self.k is None:
            self._alloc(self.rows or B, H, hd, k)
        rows_idx = torch.arange(B, device=k.device) if rows is None else rows
        old = self.lengths[rows_idx]  # (B,)
        j = torch.arange(T, device=k.device)
        counts = torch.full_like(old, T) if valid is None else valid.sum(1)
        if int((old + counts).max()) > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} positions); raise max_seq_len")
        dest = old[:, None] + j[None]  # (B, T)
        if valid is not None:
            dest = torch.where(valid, dest, torch.full_like(dest, self.max_len))  # pads -> spare slot
        r = rows_idx[:, None].expand(B, T)
        self._store(r, dest, k, v)
        self.pos[r, dest] = positions.expand(B, T) if positions.dim() == 2 else positions[None].expand(B, T)
        new_len = old + counts
        self.lengths[rows_idx] = new_len
        S = int(new_len.max())
        keys, vals = self._load(rows_idx, S)
        if rows is None and valid is None and T == 1 and bool((new_len == S).all()):
            return keys, vals, None
        # query j (the j-th valid new token of its row) sees entries < old + j + 1
        limit = old[:, None] + (j[None] if valid is None else (valid.cumsum(1) - 1).clamp(min=0))  # (B, T)
        mask = torch.arange(S, device=k.device)[None, None] <= limit[..., None]  # (B, T, S)
        return keys, vals, mask[:, None]

    def positions(self, rows: torch.Tensor | None, S: int) -> torch.Tensor:
        """(B, S) positions of the first S entries of `rows`; -1 past a row's length (stale or empty)."""
        rows_idx = torch.arange(self.k.size(0), device=self.k.device) if rows is None else rows
        live = torch.arange(S, device=self.k.device)[None] < self.lengths[rows_idx, None]
        return torch.where(live, self.pos[rows_idx, :S], -1)

    def read(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, entry positions) of `rows`, up to their longest length."""
        rows_idx = torch.arange(self.k.size(0), device=self.k.device) if rows is None else rows
        S = int(self.lengths[rows_idx].max())
        return (*self._load(rows_idx, S), self.positions(rows_idx, S))

    # Storage hooks: a quantized cache (quant/kv_cache.py) overrides these three.
    def _store(self, r: torch.Tensor, dest: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (B, H, T, hd) at [row r (B, T), :, entry dest (B, T)]."""
        self.k[r, :, dest] = k.transpose(1, 2)  # (B, T, H, hd) into (R, H, L, hd) at [row, :, dest]
        self.v[r, :, dest] = v.transpose(1, 2)

    def _load(self, rows_idx: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, hd) of the first S entries of `rows_idx`."""
        return self.k[rows_idx, :, :S], self.v[rows_idx, :, :S]

    def truncate(self, keep_before: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Drop the entries of `rows` at positions >= keep_before (B,) (speculative decoding rollback)."""
        if self.k is None:
            return
        rows_idx = torch.arange(self.k.size(0), device=self.k.device) if rows is None else rows
        L = self.max_len
        stored = torch.arange(L + 1, device=self.k.device)[None] < self.lengths[rows_idx, None]
        keep = stored & (self.pos[rows_idx] >= 0) & (self.pos[rows_idx] < keep_before[:, None])
        self.lengths[rows_idx] = keep.sum(1)  # entries are in position order, so a prefix survives

    def drop_before(self, keep_from: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Forget the entries of `rows` at positions < keep_from (B,): keys no later query can weigh
        (an adaptive attention span's, mixers/adaptive_span.py). Entries are in position order, so the
        dropped ones are a prefix; each row's survivors move to the front (the buffers stay allocated:
        what shrinks is what is stored and what every later step reads and scores)."""
        if self.k is None:
            return
        rows_idx = torch.arange(self.k.size(0), device=self.k.device) if rows is None else rows
        idx = torch.arange(self.max_len + 1, device=self.k.device)
        stored = idx[None] < self.lengths[rows_idx, None]  # (B, L + 1)
        pos = self.pos[rows_idx]
        n_drop = (stored & (pos >= 0) & (pos < keep_from[:, None])).sum(1)  # (B,)
        if not bool(n_drop.any()):
            return
        src = (idx[None] + n_drop[:, None]).clamp(max=self.max_len)  # new entry j <- old entry j + n_drop
        for buf in self._entry_buffers():  # (R, H, L + 1, w): gather [row, :, src] -> (B, L + 1, H, w)
            buf[rows_idx] = buf[rows_idx[:, None], :, src].transpose(1, 2)
        self.pos[rows_idx] = pos.gather(1, src)
        self.lengths[rows_idx] -= n_drop

    def _entry_buffers(self) -> list[torch.Tensor]:
        """Every (R, H, max_len + 1, w) per-entry buffer (a quantized cache adds its scales)."""
        return [self.k, self.v]

    def reset_rows(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.lengths[rows] = 0
            self.pos[rows] = -1
        for t in self.state.values():  # recurrent state: floats -> 0, integer positions -> -1 ("none yet")
            if isinstance(t, torch.Tensor):
                t[rows] = -1 if not t.is_floating_point() else 0

    def nbytes_used(self) -> int:
        """Bytes of the keys/values actually stored (not the preallocated buffer)."""
        if self.k is None:
            return 0
        per_entry = 2 * self.k.size(1) * self.k.size(3) * self.k.element_size()
        return int(self.lengths.sum()) * per_entry


@dataclass
class KVView:
    """A LayerKV seen through a subset of its rows, with the new tokens' validity."""

    kv: LayerKV
    positions: torch.Tensor  # (B, T) or (T,) absolute positions of the new tokens
    rows: torch.Tensor | None = None  # (B,) cache rows of the batch rows
    valid: torch.Tensor | None = None  # (B, T) which new tokens are real (routing pads are not)
    state: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.state = self.kv.state

    def update(self, k: torch.Tensor, v: torch.Tensor):
        return self.kv.update(k, v, self.positions, self.valid, self.rows)

    def key_positions(self, S: int) -> torch.Tensor:
        """(B, S) positions of the first S entries of these rows (-1 = empty)."""
        return self.kv.positions(self.rows, S)

    def drop_before(self, keep_from: torch.Tensor) -> None:
        """keep_from (B,): forget these rows' entries at earlier positions (LayerKV.drop_before)."""
        self.kv.drop_before(keep_from, self.rows)


class RowView:
    """A LayerKV whose batch rows map to fixed cache rows (a request's slot in the engine)."""

    def __init__(self, kv: LayerKV, rows: torch.Tensor) -> None:
        self.kv, self.rows, self.state = kv, rows, kv.state

    def update(self, k, v, positions, valid=None, rows=None):
        return self.kv.update(k, v, positions, valid, self.rows if rows is None else self.rows[rows])

    def positions(self, rows: torch.Tensor | None, S: int) -> torch.Tensor:
        return self.kv.positions(self.rows if rows is None else self.rows[rows], S)

    def drop_before(self, keep_from: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.kv.drop_before(keep_from, self.rows if rows is None else self.rows[rows])


class KVCache:
    """All layer applications' caches plus the number of positions already seen."""

    def __init__(self, n_applications: int, max_len: int) -> None:
        self.layers = [LayerKV(max_len) for _ in range(n_applications)]
        self.max_len = max_len
        self.seen = 0  # tokens processed so far (the next token's position)
        self.routing_state: dict[str, Any] = {}  # per-sequence routing memory (the budget head's prefix sum)

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def ensure(self, n_applications: int) -> None:
        """Grow to n_applications caches: test-time extra recursion steps (decoder.forward max_depth > Nr)
        keep their keys/values after the coda's (full-precision LayerKVs, also in a quantized cache)."""
        while len(self.layers) < n_applications:
            self.layers.append(LayerKV(self.max_len))

    def nbytes(self) -> int:
        """Bytes of keys/values stored over all applications (what MoR's KV modes save)."""
        return sum(layer.nbytes_used() for layer in self.layers)

    def truncate(self, keep_before: int) -> None:
        """Forget every entry at position >= keep_before (all rows)."""
        for layer in self.layers:
            if layer.k is not None:
                layer.truncate(torch.full((layer.k.size(0),), keep_before, device=layer.k.device))
        self.seen = min(self.seen, keep_before)
