"""Mamba's selective scan in PyTorch: h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t + D u_t.

Three implementations with one contract (u, dt (Bz, T, Di); A (Di, N); B, C (Bz, T, N); D (Di,);
h0 (Bz, Di, N) or None -> y (Bz, T, Di), last state (Bz, Di, N); fp32):
  - `selective_scan_reference`: one step per token, autograd; the definition and the decoding step;
  - `selective_scan_recurrent`: the CPU training default, a token-by-token recurrence whose
    (Bz, Di, N) working set stays in cache, with a hand-written backward (one reverse
    recurrence, every other gradient vectorised);
  - `selective_scan_chunked`: the parallel form, 2 sqrt(T) sequential steps; exact, but on this
    2-core CPU 4-17x slower in forward + backward (it moves several (Bz, T, Di, N) tensors
    through memory and autograd).
The GPU kernels are in triton_scan.py (and mamba-ssm's, when installed).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F


def selective_scan_reference(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor, h0: torch.Tensor | None = None, states: list | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential scan, one step per token: the definition (tests) and the decoding step.

    u, dt (Bz, T, Di); A (Di, N); B, C (Bz, T, N); D (Di,); h0 (Bz, Di, N) or None.
    Returns y (Bz, T, Di) and the last state (Bz, Di, N); `states`, if given, receives every
    token's state. Computed in fp32.
    """
    u, dt, B, C = u.float(), dt.float(), B.float(), C.float()
    h = u.new_zeros(u.size(0), u.size(2), A.size(1)) if h0 is None else h0.float()
    ys = []
    with _one_thread():
        for t in range(u.size(1)):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
            if states is not None:
                states.append(h)
    y = torch.stack(ys, 1) if ys else u.new_zeros(u.shape)
    return y + u * D, h


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run a per-token loop on one CPU thread. Its ops are small (Bz x Di x N) and with several
    OpenMP threads each one ends on a barrier; on a busy machine that made 128 steps take 3.1 s
    instead of 13 ms (measured here)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


class _RecurrentScan(torch.autograd.Function):
    """Forward: h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t token by token, states kept (T, Bz, Di, N).
    Backward: g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1} by one reverse recurrence; every other
    gradient is a vectorised product of g, the states and the recomputed decays."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, h0):  # noqa: D102
        T = u.size(1)
        a = torch.exp(dt.transpose(0, 1)[..., None] * A)  # (T, Bz, Di, N) decays, one vectorised pass
        dtuT = (dt * u).transpose(0, 1).contiguous()  # (T, Bz, Di)
        BT = B.transpose(0, 1).contiguous()  # (T, Bz, N)
        hs = torch.empty_like(a)  # (T, Bz, Di, N) states
        h = h0
        with _one_thread():  # two small ops per token: the (Bz, Di, N) working set stays in cache
            for t in range(T):
                h = torch.addcmul(dtuT[t][..., None] * BT[t][:, None, :], a[t], h, out=hs[t])
        y = _contract_n(hs, C.transpose(0, 1)).transpose(0, 1) + u * D
        if any(ctx.needs_input_grad):  # not when decoding or scoring
            ctx.save_for_backward(u, dt, A, B, C, D, h0, hs, a)
        return y, hs[-1].clone()

    @staticmethod
    def backward(ctx, dy, dhT):  # noqa: D102
        u, dt, A, B, C, D, h0, hs, a = ctx.saved_tensors
        T = hs.size(0)
        dtT, uT, CT = dt.transpose(0, 1), u.transpose(0, 1), C.transpose(0, 1)
        dyT = dy.transpose(0, 1) if dy is not None else torch.zeros_like(dtT)
        g = torch.empty_like(hs)
        acc = dhT if dhT is not None else torch.zeros_like(h0)
        with _one_thread():
            for t in range(T - 1, -1, -1):
                if t < T - 1:
                    acc = a[t + 1] * acc
                acc = torch.addcmul(acc, dyT[t][..., None], CT[t][:, None, :], out=g[t])
        gha = g * a  # dL/d(log-decay) = g_t * h_{t-1} * a_t
        gha[0] *= h0
        gha[1:] *= hs[:-1]
        gB = _contract_n(g, B.transpose(0, 1))  # (T, Bz, Di)
        ddt = (gha * A).sum(-1) + uT * gB
        du = dtT * gB + dyT * D
        dA = (gha * dtT[..., None]).sum((0, 1))
        dB = _contract_d(g, dtT * uT).transpose(0, 1)
        dC = _contract_d(hs, dyT).transpose(0, 1)
        dD = (dyT * uT).sum((0, 1))
        return du.transpose(0, 1), ddt.transpose(0, 1), dA, dB, dC, dD, a[0] * g[0]


# Contractions of (T, Bz, Di, N) state tensors as bmm over T*Bz without copying the big operand
# (einsum permutes it into a copy first).
def _contract_n(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_n h[t,b,d,n] v[t,b,n] -> (T, Bz, Di)."""
    T, Bz, Di, N = h.shape
    return torch.bmm(h.reshape(T * Bz, Di, N), v.reshape(T * Bz, N, 1)).view(T, Bz, Di)


def _contract_d(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_d h[t,b,d,n] w[t,b,d] -> (T, Bz, N)."""
    T, Bz, Di, N = h.shape
    return torch.bmm(w.reshape(T * Bz, 1, Di), h.reshape(T * Bz, Di, N)).view(T, Bz, N)


def selective_scan_recurrent(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same arguments and results as `selective_scan_reference`; fp32; memory: the states (Bz, T, Di, N)."""
    u, dt, B, C = u.float(), dt.float(), B.float(), C.float()
    h0 = u.new_zeros(u.size(0), u.size(2), A.size(1)) if h0 is None else h0.float()
    if u.size(1) == 0:
        return u.clone(), h0
    return _RecurrentScan.apply(u, dt, A.float(), B, C, D.float(), h0)


def selective_scan_chunked(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor, h0: torch.Tensor | None = None, chunk: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan, same arguments and results as `selective_scan_reference`.

    Mamba-1's decays are per (channel, state), so the (L x L) decay matrices of a chunked
    "state-space dual" form would be Di * N times larger than Mamba-2's; and a log-space
    cumsum scan needs exp(-cumsum), which overflows fp32 once a chunk's decay passes e^88.
    Instead, with chunks of L ~ sqrt(T) tokens, every step only multiplies by decays <= 1:
      1. all chunks at once, L sequential steps: each chunk's states from a zero start;
      2. T/L sequential steps over chunks: the state entering each chunk;
      3. one vectorised correction: h_t += exp(cumulative log-decay since the chunk start) * entering state.
    2 sqrt(T) small Python steps instead of T, everything else batched; exact up to fp32 rounding.
    """
    Bz, T, Di = u.shape
    N = A.size(1)
    L = chunk or max(4, int(math.sqrt(T)))
    pad = (-T) % L  # padded steps have dt = 0: identity, they change nothing
    u, dt, B, C = (F.pad(t.float(), (0, 0, 0, pad)) for t in (u, dt, B, C))
    nc = (T + pad) // L
    dA = (dt[..., None] * A).view(Bz, nc, L, Di, N)  # log-decays, <= 0
    bx = ((dt * u)[..., None] * B[:, :, None, :]).view(Bz, nc, L, Di, N)
    a = torch.exp(dA)
    h = u.new_zeros(Bz, nc, Di, N)
    local = []
    for l in range(L):  # 1. within every chunk at once
        h = a[:, :, l] * h + bx[:, :, l]
        local.append(h)
    hloc = torch.stack(local, 2)  # (Bz, nc, L, Di, N)
    cum = dA.cumsum(2)  # (Bz, nc, L, Di, N) log-decay since the chunk start
    decay = torch.exp(cum[:, :, -1])  # (Bz, nc, Di, N) decay across a whole chunk
    carry = u.new_zeros(Bz, Di, N) if h0 is None else h0.float()
    starts = []
    for c in range(nc):  # 2. across chunks
        starts.append(carry)
        carry = decay[:, c] * carry + hloc[:, c, -1]
    hs = hloc + torch.exp(cum) * torch.stack(starts, 1)[:, :, None]  # 3. (Bz, nc, L, Di, N)
    y = torch.einsum("bcldn,bcln->bcld", hs, C.view(Bz, nc, L, N)).reshape(Bz, nc * L, Di)[:, :T]
    return y + u[:, :T] * D, carry
