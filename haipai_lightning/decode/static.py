"""A fast decode step for dense stacks: static KV buffers, fused transposed projections, no host syncs.

Batch-1 decoding of a small model is memory-bound in principle (every weight is read once per token)
but, through the general model forward, Python and dispatch dominate: routing selections, ragged
cache bookkeeping (`model/cache.py`), a host sync per layer for the cache's length. `StaticDecoder`
is the decode step of a model whose every token runs every layer application -- a vanilla stack,
or a recursive one without routing (FullRecursion) -- stripped to the arithmetic:

- a static, preallocated KV buffer per layer application (B, Hkv, max_len, hd); rows are aligned
  (one position counter for the batch, a Python int: no `.item()` / `.tolist()` per step);
- q/k/v in one matmul and gate/up in one matmul (fused copies of the weights); a wide projection
  (N > K: qkv, gate-up, head) kept in (in, out) layout, `x @ W`, measured 1.7-2x faster than
  `F.linear`'s (out, in) layout for a (1, K) x (K, N) product on this CPU (Zen3, one thread), while
  narrow ones (o, down) were faster in F.linear's layout;
- optional int8 weights (`weights="int8"`): fbgemm's dynamic-quantized linear (per-channel int8
  weights, per-tensor 8-bit activations quantized on the fly: `torch.ops.quantized.linear_dynamic`),
  the one int8 kernel that beats fp32 at M=1 here (4x fewer bytes; `torch._int_mm` and
  `_weight_int8pack_mm` measured 2-3x *slower* than fp32 at M=1);
- optional `torch.compile` of the step (`compile=True`): static shapes (the whole buffer under a
  position mask), so one graph serves every step.

Models it cannot run (routed depths, MoD, kv_mode=shared, windows, Mamba, MoE, quantized
projections) are refused by `StaticDecoder.unsupported(model)`; `generate` then takes the general
path, which stays the reference (cached == full forward for every router / KV mode / MoD / hybrid).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.model.decoder import HaipaiModel
from haipai_lightning.model.mixers.attention import Attention
from haipai_lightning.model.mlps.dense import SwiGLU
from haipai_lightning.model.rope import apply_rope

WEIGHTS = ("fp32", "int8")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # nn.RMSNorm's formula in four elementwise ops: aten's fused rms_norm measured ~45 us per (1, 384)
    # call on this CPU, several times these ops together
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _proj(ws: list[torch.Tensor], weights: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One projection from the (out, in) weights `ws` concatenated along out: x (..., in) -> (..., sum out)."""
    w = torch.cat([t.detach().float() for t in ws])  # (N, K)
    if weights == "int8":
        # per-output-channel symmetric int8 weights, prepacked once for fbgemm (AVX2 / AVX-512 GEMV)
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        qw = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        # reduce_range: 7-bit activations, fbgemm's guard against int16 overflow in AVX2's vpmaddubsw
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)
    if w.size(0) <= w.size(1):  # N <= K (o, down): F.linear's (N, K) layout was the faster GEMV here
        return lambda x: F.linear(x, w)
    wt = w.t().contiguous()  # N > K (qkv, gate-up, head): (K, N), measured ~1.7-2x faster at M=1
    return lambda x: x @ wt


class _Layer:
    """One unique layer's fused weights (its caches live in StaticDecoder.k / .v, one per application)."""

    def __init__(self, block: nn.Module, weights: str) -> None:
        at, mlp = block.mixer, block.mlp
        self.n1, self.n2 = block.mixer_norm.weight.detach(), block.mlp_norm.weight.detach()
        self.eps1, self.eps2 = block.mixer_norm.eps, block.mlp_norm.eps
        self.qkv = _proj([at.wq.weight, at.wk.weight, at.wv.weight], weights)
        self.o = _proj([at.wo.weight], weights)
        self.gu = _proj([mlp.w1.weight, mlp.w3.weight], weights)
        self.down = _proj([mlp.w2.weight], weights)
        self.F = mlp.w1.out_features


class StaticDecoder:
    """Decode step of a dense model over static KV buffers; logits equal the model's to float rounding.

    decoder = StaticDecoder(model, batch=B, max_len=L); logits = decoder.prefill(ids)  # (B, V)
    then logits = decoder.step(next_ids)  # next_ids (B, 1) -> (B, V), one position further each call.
    The weights are snapshotted at construction (fused copies): rebuild after the model changes
    (`generate` keys its cached decoder on the parameters' versions).
    """

    def __init__(self, model: HaipaiModel, batch: int, max_len: int, weights: str = "fp32",
                 compile: bool | str = False) -> None:
        """compile: False, True (torch.compile's default backend, inductor) or a backend name
        ("aot_eager" traces the same graph without generating code: the cheap check used by the tests)."""
        why = self.unsupported(model)
        if why:
            raise ValueError(f"StaticDecoder: {why}; decode it with the general path (generate handles it)")
        if weights not in WEIGHTS:
            raise ValueError(f"StaticDecoder weights={weights!r}: use one of {WEIGHTS}")
        if max_len > model.cfg.max_seq_len:
            raise ValueError(f"StaticDecoder max_len={max_len} exceeds model.config.max_seq_len={model.cfg.max_seq_len}")
        cfg = model.cfg
        self.B, self.L, self.weights = batch, max_len, weights
        self.H, self.Hkv, self.hd, self.D = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
        by_unique = {i: _Layer(model.layers[i], weights) for i in sorted({i for i, _ in model.order})}
        self.apps = [by_unique[i] for i, _ in model.order]  # shared layers: one weight set, one cache per application
        self.embed = model.embed.weight.detach()
        self.norm_w, self.norm_eps = model.norm.weight.detach(), model.norm.eps
        self.head = _proj([model.head.weight], weights)
        self.cos, self.sin = model.rope.cos, model.rope.sin  # (max_seq_len, hd/2)
        dev = self.embed.device
        self.k = torch.zeros(len(self.apps), batch, self.Hkv, max_len, self.hd, device=dev)  # (A, B, Hkv, L, hd)
        self.v = torch.zeros_like(self.k)
        self.n = 0  # positions filled (all rows aligned)
        self._compiled = None
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self._compiled = torch.compile(self._masked_step, dynamic=False, backend=backend)

    @staticmethod
    def unsupported(model: HaipaiModel) -> str | None:
        """Why this model cannot take the static path (None: it can)."""
        cfg = model.cfg
        if getattr(model, "kv_cache_factory", None) is not None:
            return "a quantized KV cache (kv8 / kv4)"
        if len(model.mod_gates):
            return "Mixture-of-Depths gates route tokens"
        routed = model.schedule.cycle and cfg.n_recursions > 1
        if routed and model.router.decode_start(torch.zeros(1, 1, cfg.d_model)) is not None:
            return f"router {type(model.router).__name__} keeps a per-token decode state"
        if routed and (any(p.numel() for p in model.router.parameters()) or not bool(
                model.router.decode_continues(torch.arange(cfg.n_recursions), torch.zeros(cfg.n_recursions, 1, cfg.d_model), None).all())):
            return f"router {type(model.router).__name__} routes tokens to different depths"
        if cfg.kv_mode == "shared" and cfg.n_recursions > 1:
            return "kv_mode=shared reuses step 1's keys/values"
        for i, layer in enumerate(model.layers):
            mx, mlp = layer.mixer, layer.mlp
            if type(mx) is not Attention or mx.window is not None:
                return f"layer {i}'s mixer is {type(mx).__name__}{' with a window' if type(mx) is Attention else ''}"
            if type(mlp) is not SwiGLU:
                return f"layer {i}'s MLP is {type(mlp).__name__}"
            for lin in (mx.wq, mx.wk, mx.wv, mx.wo, mlp.w1, mlp.w2, mlp.w3):
                if type(lin) is not nn.Linear or lin.bias is not None:
                    return f"layer {i} has a {type(lin).__name__} projection"
        if type(model.head) is not nn.Linear or type(model.embed) is not nn.Embedding:
            return "quantized embedding or head"
        return None

    @classmethod
    def cached(cls, model: HaipaiModel, batch: int, max_len: int, weights: str = "fp32",
               compile: bool | str = False) -> "StaticDecoder":
        """A decoder kept on the model between calls (building one copies every weight); rebuilt when any
        parameter changed (its storage or in-place version: an optimizer step, a load) or the shape did."""
        key = (batch, max_len, weights, compile,
               tuple((p.data_ptr(), p._version) for p in model.parameters()))
        held = model.__dict__.get("_static_decoder")
        if held is None or held[0] != key:
            held = (key, cls(model, batch, max_len, weights, compile))
            model.__dict__["_static_decoder"] = held  # not a submodule: no state dict entry
        return held[1]

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) from position 0 -> logits of the last token (B, V)."""
        self.n = 0
        return self.forward(ids)[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, 1) at the next position -> logits (B, V)."""
        if self._compiled is not None:
            if self.n >= self.L:
                raise ValueError(f"StaticDecoder is full ({self.L} positions)")
            pos = torch.tensor([self.n], device=ids.device)
            out = self._compiled(ids, pos, self.k, self.v)
            self.n += 1
            return out
        return self.forward(ids)[:, -1]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) at positions n..n+T-1 -> logits (B, T, V) (a prefill or a chunk; eager)."""
        B, T = ids.shape
        n = self.n
        if B != self.B or n + T > self.L:
            raise ValueError(f"StaticDecoder holds {self.B} rows x {self.L} positions; got {B} rows at {n}..{n + T}")
        cos, sin = self.cos[n:n + T, None], self.sin[n:n + T, None]  # (T, 1, hd/2)
        if T == 1:
            mask, causal = None, False  # one query sees every stored key
        elif n == 0:
            mask, causal = None, True
        else:  # a chunk after a prefix: query j sees keys < n + j + 1
            mask = torch.arange(n + T)[None] <= (n + torch.arange(T))[:, None]  # (T, n + T)
            causal = False
        h = F.embedding(ids, self.embed)  # (B, T, D)
        for a, lay in enumerate(self.apps):
            h = self._layer(lay, a, h, cos, sin, n, T, mask, causal)
        self.n = n + T
        return self.head(_rms(h, self.norm_w, self.norm_eps))

    # --------------------------------------------------------------- internals
    def _attend_in(self, lay: _Layer, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, ...]:
        B, T, _ = h.shape
        H, Hkv, hd = self.H, self.Hkv, self.hd
        x = _rms(h, lay.n1, lay.eps1)
        qk, v = lay.qkv(x).split([(H + Hkv) * hd, Hkv * hd], dim=-1)
        qk = apply_rope(qk.view(B, T, H + Hkv, hd), cos, sin).transpose(1, 2)  # queries and keys in one rotation
        return qk[:, :H], qk[:, H:], v.view(B, T, Hkv, hd).transpose(1, 2)  # (B, H|Hkv, T, hd)

    def _attend_out(self, lay: _Layer, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        h = h + lay.o(y.transpose(1, 2).reshape(B, T, self.H * self.hd))
        x = _rms(h, lay.n2, lay.eps2)
        g, u = lay.gu(x).split([lay.F, lay.F], dim=-1)
        return h + lay.down(F.silu(g) * u)

    def _layer(self, lay, a, h, cos, sin, n, T, mask, causal):
        q, k, v = self._attend_in(lay, h, cos, sin)
        self.k[a, :, :, n:n + T] = k
        self.v[a, :, :, n:n + T] = v
        y = F.scaled_dot_product_attention(q, self.k[a, :, :, :n + T], self.v[a, :, :, :n + T], attn_mask=mask,
                                           is_causal=causal, enable_gqa=self.Hkv != self.H)
        return self._attend_out(lay, h, y)

    def _masked_step(self, ids: torch.Tensor, pos: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor):
        """The compiled decode step: static shapes, the whole buffer under a position mask.
        ids (B, 1), pos (1,) -> logits (B, V); writes the new keys/values at `pos` in place."""
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (1, 1, hd/2)
        mask = (torch.arange(self.L, device=ids.device) <= pos)[None, None, None]  # (1, 1, 1, L)
        h = F.embedding(ids, self.embed)
        for a, lay in enumerate(self.apps):
            q, k, v = self._attend_in(lay, h, cos, sin)
            kbuf[a].index_copy_(2, pos, k)
            vbuf[a].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, kbuf[a], vbuf[a], attn_mask=mask, enable_gqa=self.Hkv != self.H)
            h = self._attend_out(lay, h, y)
        return self.head(_rms(h[:, -1], self.norm_w, self.norm_eps))
