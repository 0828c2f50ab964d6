"""Causal grouped-query self-attention with RoPE through F.scaled_dot_product_attention.

Options (init args, so YAML `model.mixer.init_args`): a sliding window; flash-attn's kernel
when it imports (CUDA, half precision, no cache); compiled `flex_attention` for inference
forwards (it has no CPU backward, so never in training) where its block sparsity pays: long
windowed sequences.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.model.cache import KVView
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.rope import apply_rope

_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
_FLEX = None  # compiled flex_attention, built on first use (tests may swap in the eager function)


@dataclass
class KVShare:
    """Recursive KV sharing across recursion steps (MoR section 2.3).

    Step 1 runs every token and stores each shared layer's keys/values (and their
    positions) under its slot; later steps reuse them (`reuse=True`): a routed query at
    position p sees the stored keys at positions <= p. With a decoding cache the store
    holds the whole history, so decoding reuses step 1's cache too.

    `store=None` (`KVShare.at(pos)`) shares nothing: it only carries the absolute positions of a
    routed computation's gathered tokens (a MoR step or a Mixture-of-Depths layer without a cache),
    which a sliding window needs; a mixer without keys/values ignores it like any `share`.
    """

    store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # slot -> (k, v, key pos (B|1, S))
    slot: int
    reuse: bool
    q_pos: torch.Tensor | None = None  # (B, T) or (T,) positions of the queries

    @staticmethod
    def at(q_pos: torch.Tensor) -> "KVShare":
        """No sharing: the gathered tokens' absolute positions (B, k) only."""
        return KVShare(None, 0, False, q_pos)

    @property
    def sharing(self) -> bool:
        return self.store is not None


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, window: tuple[int, int],
                 varlen_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Causal attention of padded rows through a varlen kernel: no work on the pads.

    q (B, T, H, hd), k / v (B, T, Hkv, hd), valid (B, T) with each row's real tokens first (routing
    pads trail). The real tokens are packed into one (N, H, hd) sequence cut at cu_seqlens, as
    flash_attn_varlen_func takes them, and scattered back; pad rows of the output are zero.
    `varlen_fn` is flash-attn's kernel on a GPU (tests pass a PyTorch reference of its contract).
    """
    counts = valid.sum(1)  # (B,)
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,) sequence starts in the packed batch
    n = int(counts.max())
    out = varlen_fn(q[valid], k[valid], v[valid], cu, cu, n, n, causal=True, window_size=window)  # (N, H, hd)
    y = q.new_zeros(q.shape)
    y[valid] = out
    return y


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention (heads from the model config).

    SDPA picks the fused kernel the platform has (flash / memory-efficient on GPU,
    a fused C++ kernel on CPU), so no hand-written attention here. Multi-query attention is
    n_kv_heads=1 in the model config.

    Sliding window: a query at absolute position p sees the keys at positions p - window + 1 .. p
    among the keys that exist for this layer application (the tokens routed to this recursion step
    or Mixture-of-Depths layer; under kv_mode=shared, step 1's keys of every token). Positions come
    from the decoding cache, the KV-sharing store or, for a routed computation without a cache,
    `KVShare.at` (the gathered tokens' positions): cached and uncached forwards agree. A layer
    given none of them sees its own tokens at consecutive positions.
    """

    #: what decoding keeps per token: keys/values ("kv"); a recurrent mixer keeps a "state"
    cache_kind = "kv"

    def stream_io(self) -> tuple[list[nn.Linear], list[nn.Linear]]:
        """(linears reading the normed residual stream, linears writing it): rotations fuse into them."""
        return [self.wq, self.wk, self.wv], [self.wo]

    def __init__(self, cfg: ModelConfig, window: int | None = None, flash: bool = True, flex: bool = False) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            window: sliding-window length in tokens (None = full causal attention).
            flash: use flash-attn's kernel when it imports (CUDA, fp16/bf16, no cache, no KV sharing, not for
                routed tokens under a window: its window counts tokens, so those rows take SDPA).
            flex: inference forwards without a cache use compiled flex_attention with a block mask
                (skips masked blocks; pays for long windowed sequences; compiles on first use).
        """
        super().__init__()
        if window is not None and window < 1:
            raise ConfigError(f"model.mixer.init_args.window={window} must be >= 1 (or null: full attention)")
        self.window, self.flash, self.flex = window, flash, flex
        self._block_masks: dict[tuple, object] = {}
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        d, hd = cfg.d_model, cfg.head_dim
        self.wq = nn.Linear(d, self.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=False)
        self.wo.is_residual_out = True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVView | None = None,
        share: KVShare | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, D); cos/sin broadcastable to (B, T, H, hd/2); kv: this application's decode cache;
        share: recursive KV sharing (MoR) -- store this step's keys/values, or reuse step 1's; or
        (`KVShare.at`) only the absolute positions of routed tokens, for the sliding window;
        valid (B, T): which gathered tokens are real when a routed step padded its rows (pads trail
        each row, so causal attention is already exact; flash-attn's varlen kernel skips them)."""
        B, T, _ = x.shape
        sharing = share is not None and share.sharing  # recursive KV sharing (not just positions)
        reuse = sharing and share.reuse
        qx, kx, vx = (self.wq(x), None, None) if reuse else self._qkv(x)
        q = apply_rope(qx.view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        mask, causal = None, T > 1
        if reuse:
            # Steps r > 1 of recursive KV sharing: no K/V projections at all; the active
            # tokens' queries attend to step 1's keys/values of every token up to their position.
            k, v, key_pos = share.store[share.slot]  # (B, Hkv, S, hd), (B|1, S)
            q_pos = share.q_pos if share.q_pos.dim() == 2 else share.q_pos[None]
            mask = ((key_pos[:, None, :] <= q_pos[:, :, None]) & (key_pos[:, None, :] >= 0))[:, None]
        else:
            k = apply_rope(kx.view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            v = vx.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            if kv is not None:
                k, v, mask = kv.update(k, v)  # the row's history + the new tokens; mask (B, 1, T, S) or None
                causal = False
            if sharing:  # step 1 of KV sharing: keep keys/values for the later steps
                if kv is not None:
                    key_pos = kv.key_positions(k.size(2))
                else:
                    key_pos = share.q_pos if share.q_pos.dim() == 2 else share.q_pos[None]
                share.store[share.slot] = (k, v, key_pos)
        plain = kv is None and not sharing  # the layer's own tokens, causal: kernels with built-in masks
        if plain and self.window is not None and share is not None:
            # Routed tokens (gathered, with gaps) under a window: the kernels' windows count tokens, not
            # positions, so SDPA with the explicit absolute-position mask (_window_mask) takes these rows.
            plain = False
        if plain and self.flash and _HAS_FLASH and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func, flash_attn_varlen_func  # (B, T, H, hd) layout, GQA built in

            w = (-1, -1) if self.window is None else (self.window - 1, 0)
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if valid is not None and not bool(valid.all()):  # token-choice rows of unequal length
                y = flash_varlen(qt, kt, vt, valid, w, flash_attn_varlen_func)
            else:
                y = flash_attn_func(qt, kt, vt, causal=True, window_size=w)
            return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))
        if plain and self.flex and T > 1 and not torch.is_grad_enabled():
            y = self._flex(q, k, v)
        else:
            if self.window is not None:
                mask = self._window_mask(mask, T, k.size(2), kv, share, reuse, x.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> the q, k, v projections.

        In training, one matmul against the concatenated weights: one GEMM instead of three, and
        autograd sums one gradient for x instead of three (measured ~20% off these projections'
        forward + backward on CPU at d=256). Only for plain nn.Linear (a quantized or wrapped
        projection keeps its own forward). Without grad (decoding, the engine's block passes) the
        concatenated weight is kept between calls -- concatenating per step would copy as many bytes
        as the small matmul reads -- and rebuilt when a weight's storage or in-place version changes
        (an optimizer step, a load, a rotation); not under torch.compile (data_ptr is not traceable).
        """
        lins = (self.wq, self.wk, self.wv)
        if not all(type(m) is nn.Linear for m in lins):
            return self.wq(x), self.wk(x), self.wv(x)
        if torch.is_grad_enabled():
            w = torch.cat([m.weight for m in lins])  # (Hq*hd + 2*Hkv*hd, D)
        elif torch.compiler.is_compiling():
            return self.wq(x), self.wk(x), self.wv(x)
        else:
            key = tuple((m.weight.data_ptr(), m.weight._version) for m in lins)
            held = self.__dict__.get("_decode_qkv")  # not a buffer: no state-dict entry, never saved
            if held is None or held[0] != key:
                held = (key, torch.cat([m.weight.detach() for m in lins]))
                self.__dict__["_decode_qkv"] = held
            w = held[1]
        return F.linear(x, w).split([m.out_features for m in lins], dim=-1)

    def _window_mask(self, mask: torch.Tensor | None, T: int, S: int, kv: KVView | None, share: KVShare | None,
                     reuse: bool, device: torch.device) -> torch.Tensor:
        """AND the sliding window onto `mask` (None = plain causal): bool (B|1, 1, T, S) or (T, S).

        The window is over absolute positions: key position in (q_pos - window, q_pos], -1 = no key.
        """
        q_pos = share.q_pos if share is not None and share.q_pos is not None else None
        q_pos = kv.positions if q_pos is None and kv is not None else q_pos
        if q_pos is None:  # the layer's own T tokens at consecutive positions (S == T)
            i, j = torch.arange(T, device=device)[:, None], torch.arange(S, device=device)[None]
            return (j <= i) & (j > i - self.window)
        key_pos = share.store[share.slot][2] if share is not None and share.sharing else None
        key_pos = (kv.key_positions(S) if kv is not None else q_pos) if key_pos is None else key_pos
        qp = (q_pos if q_pos.dim() == 2 else q_pos[None])[:, :, None]  # (B|1, T, 1)
        kp = (key_pos if key_pos.dim() == 2 else key_pos[None])[:, None, :]  # (B|1, 1, S)
        win = (kp <= qp) & (kp > qp - self.window) & (kp >= 0)
        if kv is None and not reuse:
            # the keys are the queries themselves (S == T), gathered in causal order: causal by slot too,
            # so that the trailing pads of a routed row (which read the last token's position) stay
            # hidden from real queries; a pad query still sees itself (no empty softmax row)
            win = win & torch.ones(T, S, dtype=torch.bool, device=device).tril()
        win = win[:, None]
        return win if mask is None else mask & win

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal (windowed) attention by flex_attention with a cached block mask: (B, H, T, hd)."""
        global _FLEX
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if _FLEX is None:
            _FLEX = torch.compile(flex_attention, dynamic=False)
        T, window = q.size(2), self.window
        key = (T, window, q.device)
        if key not in self._block_masks:
            def mask_mod(b, h, qi, ki):  # noqa: ANN001, ANN202
                return (ki <= qi) & (qi - ki < window) if window is not None else ki <= qi

            self._block_masks[key] = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        return _FLEX(q, k, v, block_mask=self._block_masks[key], enable_gqa=self.n_kv_heads != self.n_heads)
