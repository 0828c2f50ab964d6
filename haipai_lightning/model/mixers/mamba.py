"""Mamba (selective state-space) mixer, Gu & Dao 2023, in PyTorch, with optional fast kernels.

    x -> in_proj -> (u, z);  u -> causal depthwise conv1d -> silu
    (dt, B, C) = x_proj(u);  dt = softplus(dt_proj(dt))             per token: the "selective" part
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t . h_t + D u_t   per channel, state size N
    out = out_proj(y * silu(z))

The scan h_t = a_t h_{t-1} + b_t (scan.py) runs
  - training / prefill on CPU: `selective_scan_recurrent`, a token-by-token recurrence with a
    hand-written backward; the parallel `selective_scan_chunked` is exact too but was 4-17x
    slower here, so it is an option (scan: chunked), not the default;
  - on a GPU: mamba-ssm's CUDA kernel when it imports (prefill from an empty state), else the
    Triton kernel of `triton_scan.py` (forward and backward);
  - decoding: one recurrent step per token from the state kept in the cache.

Decoding state: the mixer keeps `conv` (R, Di, d_conv-1), the last inputs of the convolution,
and `ssm` (R, Di, N), the scan state, in the `state` dict of its layer application's cache
(`LayerKV.state`), so the model's `new_cache()` / `model(x, cache=cache)` decode Mamba layers
exactly like attention ones. Tokens marked invalid by the cache view (MoR routing pads, which
trail each row) leave the state untouched (dt = 0 is the identity step). A recurrent state cannot
be truncated like keys/values, so the states of the last HISTORY positions decoded are kept too,
and a rolled-back cache (speculative decoding) resumes from the right one (`_DecodeState`).

A Mamba layer has no positions (cos/sin are ignored) and no keys/values: under MoR routing it
scans the tokens active at its step, in order; under kv_mode=shared it ignores `share`.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from haipai_lightning.model.cache import KVView, LayerKV, RowView
from haipai_lightning.config import ConfigError, ModelConfig
from haipai_lightning.model.mixers.scan import (selective_scan_chunked, selective_scan_recurrent,  # noqa: F401
                                                selective_scan_reference)  # (re-exported)

_HAS_TRITON = importlib.util.find_spec("triton") is not None  # imported only when used (GPU)
try:  # optional CUDA kernels (pip install mamba-ssm); never required
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_ssm_scan
except Exception:  # ImportError, or a build without CUDA
    _mamba_ssm_scan = None

Scan = Literal["auto", "recurrent", "chunked", "reference", "triton", "mamba_ssm"]


def _cache_rows(kv: Any) -> tuple[LayerKV, torch.Tensor | None]:
    """The LayerKV behind a cache view and the cache rows of the batch rows (None = rows 0..B-1)."""
    outer = kv.rows if isinstance(kv, KVView) else None
    inner = kv.kv if isinstance(kv, KVView) else kv
    if isinstance(inner, RowView):
        return inner.kv, inner.rows if outer is None else inner.rows[outer]
    return inner, outer


HISTORY = 16  # per-token states kept from short cached calls: a rollback of up to this many tokens is exact


class _DecodeState:
    """A Mamba layer application's decoding state, kept in its cache's `state` dict (rows R):
    conv (R, Di, K-1) the last inputs of the convolution, ssm (R, Di, N), last_pos (R,) the position
    of the last token each row processed, and a ring of per-token states by position modulo W
    (hist_pos (R, W+1), hist_conv (R, W+1, Di, K-1), hist_ssm (R, W+1, Di, N); slot W takes the
    routing pads' writes) filled by short calls; a long call (a prefill) clears it. A call whose
    first new position is not after a row's last one follows a rollback (`KVCache.truncate`,
    speculative decoding): the row's state is restored from the ring (or zeroed at position 0)."""

    def __init__(self, kv: Any, x: torch.Tensor, Di: int, N: int, K: int) -> None:
        self.layer, rows = _cache_rows(kv)
        self.valid = kv.valid if isinstance(kv, KVView) else None  # (Bz, T): routing pads trail each row
        Bz, T, _ = x.shape
        self.Bz, self.T, self.Di, self.K = Bz, T, Di, K
        self.rows = torch.arange(Bz, device=x.device) if rows is None else rows  # cache rows of the batch rows
        self.idx = slice(0, Bz) if rows is None else rows
        pos = kv.positions if isinstance(kv, KVView) else None
        self.pos = None if pos is None else (pos if pos.dim() == 2 else pos[None]).expand(Bz, T)
        st = self.layer.state
        if "ssm" not in st:
            R = self.layer.rows or (Bz if rows is None else int(rows.max()) + 1)
            W = HISTORY + 1
            st.update(conv=x.new_zeros(R, Di, K - 1), ssm=x.new_zeros(R, Di, N, dtype=torch.float32),
                      last_pos=torch.full((R,), -1, dtype=torch.long, device=x.device),
                      hist_pos=torch.full((R, W), -1, dtype=torch.long, device=x.device),
                      hist_conv=x.new_zeros(R, W, Di, K - 1), hist_ssm=x.new_zeros(R, W, Di, N, dtype=torch.float32))
        self.st = st

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The state entering this call: conv context (Bz, Di, K-1) and ssm state (Bz, Di, N)."""
        st, idx = self.st, self.idx
        if self.pos is not None:
            none = 1 << 62
            p0 = (self.pos if self.valid is None else self.pos.masked_fill(~self.valid, none)).min(1).values  # (Bz,)
            back = (p0 <= st["last_pos"][idx]) & (p0 < none)
            if bool(back.any()):
                fresh = back & (p0 == 0)
                slot = (p0 - 1).clamp(min=0) % HISTORY  # where the state after position p0 - 1 lives
                hit = st["hist_pos"][self.rows, slot] == p0 - 1
                if bool((back & ~fresh & ~hit).any()):
                    raise ValueError(f"Mamba: cannot roll the decoding state back more than {HISTORY} tokens "
                                     "(or into a long prefill); re-run the prefix instead")
                m, f = (back & ~fresh)[:, None, None], fresh[:, None, None]
                for key in ("conv", "ssm"):
                    st[key][idx] = torch.where(m, st[f"hist_{key}"][self.rows, slot], st[key][idx].masked_fill(f, 0))
                st["last_pos"][idx] = torch.where(back, p0 - 1, st["last_pos"][idx])
                hp = st["hist_pos"][idx]  # forget the rolled-back positions
                st["hist_pos"][idx] = hp.masked_fill(back[:, None] & (hp >= p0[:, None]), -1)
        return st["conv"][idx], st["ssm"][idx]

    def store(self, uc: torch.Tensor, last: torch.Tensor, states: torch.Tensor | None) -> None:
        """uc (Bz, Di, K-1+T) the conv inputs with their context; last (Bz, Di, N); states (Bz, T, Di, N) or None."""
        st, idx, K, T = self.st, self.idx, self.K, self.T
        n = torch.full((self.Bz,), T, device=uc.device) if self.valid is None else self.valid.sum(1)
        take = n[:, None] + torch.arange(K - 1, device=uc.device)  # (Bz, K-1): the last K-1 valid inputs
        st["conv"][idx] = uc.gather(2, take[:, None].expand(-1, self.Di, -1)).detach()
        st["ssm"][idx] = last.detach()
        if self.pos is None:
            return
        pv = self.pos if self.valid is None else self.pos.masked_fill(~self.valid, -1)  # (Bz, T)
        has = n > 0
        st["last_pos"][idx] = torch.where(has, pv.max(1).values, st["last_pos"][idx])
        if states is None:  # a long call: no per-token states, no rollback into it
            st["hist_pos"][idx] = st["hist_pos"][idx].masked_fill(has[:, None], -1)
            return
        slot = torch.where(pv >= 0, pv % HISTORY, HISTORY)  # (Bz, T); pads -> the spare slot
        r = self.rows[:, None].expand(-1, T)
        st["hist_pos"][r, slot] = pv
        st["hist_ssm"][r, slot] = states  # state after each new token
        st["hist_conv"][r, slot] = uc.unfold(2, K - 1, 1)[:, :, 1 : T + 1].transpose(1, 2).to(st["hist_conv"].dtype)


class Mamba(nn.Module):
    """Mamba-1 mixer: forward(x (B, T, D), cos, sin, kv=None, share=None) -> (B, T, D)."""

    cache_kind = "state"  # decoding keeps a recurrent state (conv window + SSM state), not keys/values

    def stream_io(self) -> tuple[list[nn.Linear], list[nn.Linear]]:
        """(linears reading the normed residual stream, linears writing it)."""
        return [self.in_proj], [self.out_proj]

    def __init__(
        self,
        cfg: ModelConfig,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        scan: Scan = "auto",
        chunk: int | None = None,
    ) -> None:
        """Args:
            cfg: the model configuration (given by the model).
            d_state: SSM state size N per channel.
            d_conv: width of the causal depthwise convolution.
            expand: inner width Di = expand * d_model.
            dt_rank: rank of the dt projection (None = ceil(d_model / 16)).
            dt_min: smallest initial step size dt.
            dt_max: largest initial step size dt.
            scan: auto (mamba-ssm / Triton on GPU, recurrent PyTorch on CPU), recurrent, chunked, reference,
                triton or mamba_ssm.
            chunk: chunk length of the chunked scan (None = sqrt(T)).
        """
        super().__init__()
        if scan not in ("auto", "recurrent", "chunked", "reference", "triton", "mamba_ssm"):
            raise ConfigError(
                f"model.mixer.init_args.scan={scan!r}: use auto, recurrent, chunked, reference, triton or mamba_ssm"
            )
        if d_state < 1 or d_conv < 2 or expand < 1:
            raise ConfigError(f"model.mixer.init_args: Mamba d_state={d_state} and expand={expand} must be >= 1, "
                              f"d_conv={d_conv} >= 2")
        D = cfg.d_model
        self.d_inner, self.d_state, self.d_conv = expand * D, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(D / 16)
        self.scan, self.chunk = scan, chunk
        Di, R = self.d_inner, self.dt_rank
        self.in_proj = nn.Linear(D, 2 * Di, bias=False)
        self.conv = nn.Conv1d(Di, Di, d_conv, groups=Di, bias=True)  # causal: we left-pad ourselves
        self.x_proj = nn.Linear(Di, R + 2 * d_state, bias=False)
        # dt projection as plain parameters: the model's normal init of nn.Linear must not reset it
        self.dt_weight = nn.Parameter(torch.empty(Di, R).uniform_(-(R**-0.5), R**-0.5))
        dt = torch.exp(torch.rand(Di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt): dt starts in [min, max]
        # S4D-real init: A = -(1..N) per channel, stored as log for positivity
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(Di, 1))
        self.D = nn.Parameter(torch.ones(Di))
        self.A_log._no_weight_decay = True  # as mamba-ssm: for optimizers' parameter grouping (2-D, not a weight)
        self.out_proj = nn.Linear(Di, D, bias=False)
        self.out_proj.is_residual_out = True

    def macs_per_token(self) -> int:
        """Multiply-accumulates per token: projections, convolution and the scan (3 per state element)."""
        Di, N, R = self.d_inner, self.d_state, self.dt_rank
        proj = self.in_proj.weight.numel() + self.x_proj.weight.numel() + Di * R + self.out_proj.weight.numel()
        return proj + Di * self.d_conv + 3 * Di * N

    def _scan(self, u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.scan
        if kind == "auto":
            if u.is_cuda and _mamba_ssm_scan is not None and h0 is None:
                kind = "mamba_ssm"
            elif u.is_cuda and _HAS_TRITON:
                kind = "triton"
            else:
                kind = "reference" if u.size(1) <= 4 and not torch.is_grad_enabled() else "recurrent"
        if kind == "mamba_ssm":
            if _mamba_ssm_scan is None:
                raise ConfigError("model.mixer.init_args.scan=mamba_ssm but mamba_ssm does not import; "
                                  "pip install mamba-ssm (CUDA) or use scan: auto")
            y, last = _mamba_ssm_scan(u.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A,
                                      B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(),
                                      return_last_state=True)
            return y.transpose(1, 2), last
        if kind == "triton":
            from haipai_lightning.model.mixers.triton_scan import selective_scan as triton_selective_scan

            return triton_selective_scan(u, dt, A, B, C, self.D, h0)
        if kind == "reference":
            return selective_scan_reference(u, dt, A, B, C, self.D, h0)
        if kind == "chunked":
            return selective_scan_chunked(u, dt, A, B, C, self.D, h0, self.chunk)
        return selective_scan_recurrent(u, dt, A, B, C, self.D, h0)

    def _conv(self, uc: torch.Tensor, T: int) -> torch.Tensor:
        """Causal depthwise convolution of uc (Bz, Di, K-1+T) -> (Bz, Di, T) as K shifted multiply-adds.
        (F.conv1d on CPU goes through oneDNN, which builds a kernel per new length: ~1 s each time
        routing hands the layer a new number of tokens.)"""
        w = self.conv.weight[:, 0]  # (Di, K)
        y = self.conv.bias[:, None] + w[:, :1] * uc[:, :, :T]
        for k in range(1, self.d_conv):
            y = torch.addcmul(y, w[:, k : k + 1], uc[:, :, k : k + T])
        return y

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                kv: Any = None, share: Any = None, valid: Any = None) -> torch.Tensor:
        # `share` (KV sharing) and `valid` (routing pads) need nothing here: pads trail each row,
        # so the causal scan of the real tokens never reads them; a cache view carries its own valid
        Bz, T, _ = x.shape
        Di, N, K = self.d_inner, self.d_state, self.d_conv
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (Bz, T, Di) each
        u = u.transpose(1, 2)  # (Bz, Di, T) for the convolution
        cache = _DecodeState(kv, x, Di, N, K) if kv is not None else None
        ctx, h0 = cache.load() if cache is not None else (u.new_zeros(Bz, Di, K - 1), None)
        uc = torch.cat([ctx.to(u.dtype), u], dim=-1)  # (Bz, Di, K-1+T): the causal left context
        u = F.silu(self._conv(uc, T)).transpose(1, 2)  # (Bz, T, Di)
        dt, B, C = self.x_proj(u).split([self.dt_rank, N, N], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_weight, self.dt_bias).float())  # (Bz, T, Di)
        if cache is not None and cache.valid is not None:
            dt = dt * cache.valid[..., None]  # routing pads: identity steps, the state stays
        A = -torch.exp(self.A_log.float())
        states: list | None = [] if cache is not None and T <= HISTORY else None
        if states is not None:  # short cached calls (decoding, speculative verification): keep every state
            y, last = selective_scan_reference(u, dt, A, B, C, self.D, h0, states)
        else:
            y, last = self._scan(u, dt, A, B, C, h0)
        if cache is not None:
            cache.store(uc, last, torch.stack(states, 1).detach() if states else None)
        y = y.to(x.dtype) * F.silu(z)
        return self.out_proj(y)
