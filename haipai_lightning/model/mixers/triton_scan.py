"""Triton kernels of Mamba's selective scan: forward and backward, for GPUs without mamba-ssm.

    h_t = exp(dt_t A) * h_{t-1} + (dt_t u_t) B_t     h (Di, N) per sequence
    y_t = h_t C_t + D u_t

One program per (sequence, block of BLOCK_D channels) walks the sequence with its state in
registers (BLOCK_D x N): a sequential scan, which is what the GPU kernel of Mamba-1 does
too (its parallelism is over batch x channels). The forward kernel stores the state at the
start of every CHUNK tokens; the backward kernel walks the chunks in reverse, recomputes a
chunk's states from its checkpoint into a per-program scratch buffer, then walks it
backwards accumulating dh. Reductions over channels (dB, dC) are written per program and
summed in PyTorch; dA and dD per sequence, summed likewise.

On a CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported), which is how tests/test_triton_scan.py checks them against the
PyTorch scan; on a GPU `Mamba(scan="auto")` uses them when mamba-ssm is absent.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # triton is optional (the [gpu] extra)
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _scan_fwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, hT_ptr, ck_ptr, T, Di, N, n_chunks,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md, mn = d < Di, n < N
        m2 = md[:, None] & mn[None, :]
        dn = d[:, None] * N + n[None, :]  # (BLOCK_D, BLOCK_N) offsets into a (Di, N) state
        A = tl.load(A_ptr + dn, mask=m2, other=0.0).to(tl.float32)
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
        h = tl.load(h0_ptr + b * Di * N + dn, mask=m2, other=0.0).to(tl.float32)
        for c in range(0, n_chunks):
            tl.store(ck_ptr + (b * n_chunks + c) * Di * N + dn, h, mask=m2)  # state entering chunk c
            for l in range(0, CHUNK):
                t = c * CHUNK + l
                if t < T:
                    row = b * T + t
                    u = tl.load(u_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    dt = tl.load(dt_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    Bt = tl.load(B_ptr + row * N + n, mask=mn, other=0.0).to(tl.float32)
                    Ct = tl.load(C_ptr + row * N + n, mask=mn, other=0.0).to(tl.float32)
                    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                    y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
                    tl.store(y_ptr + row * Di + d, y, mask=md)
        tl.store(hT_ptr + b * Di * N + dn, h, mask=m2)

    @triton.jit
    def _scan_bwd(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, ck_ptr, dy_ptr, dhT_ptr, scr_ptr,
                  du_ptr, ddt_ptr, dAp_ptr, dBp_ptr, dCp_ptr, dDp_ptr, dh0_ptr, T, Di, N, n_chunks, n_dblocks,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        pd = tl.program_id(1)
        d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        md, mn = d < Di, n < N
        m2 = md[:, None] & mn[None, :]
        dn = d[:, None] * N + n[None, :]
        A = tl.load(A_ptr + dn, mask=m2, other=0.0).to(tl.float32)
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
        dh = tl.load(dhT_ptr + b * Di * N + dn, mask=m2, other=0.0).to(tl.float32)  # dLoss/dh_T
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # this program's scratch: CHUNK + 1 states (slot 0 = the chunk's entering state)
        loc = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
        scr = scr_ptr + (b * n_dblocks + pd) * (CHUNK + 1) * BLOCK_D * BLOCK_N + loc
        for ci in range(0, n_chunks):
            c = n_chunks - 1 - ci
            h = tl.load(ck_ptr + (b * n_chunks + c) * Di * N + dn, mask=m2, other=0.0)
            tl.store(scr, h)
            for l in range(0, CHUNK):  # recompute the chunk's states
                t = c * CHUNK + l
                if t < T:
                    row = b * T + t
                    u = tl.load(u_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    dt = tl.load(dt_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    Bt = tl.load(B_ptr + row * N + n, mask=mn, other=0.0).to(tl.float32)
                    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                    tl.store(scr + (l + 1) * BLOCK_D * BLOCK_N, h)
            tl.debug_barrier()
            for li in range(0, CHUNK):  # and walk them backwards
                l = CHUNK - 1 - li
                t = c * CHUNK + l
                if t < T:
                    row = b * T + t
                    u = tl.load(u_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    dt = tl.load(dt_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    Bt = tl.load(B_ptr + row * N + n, mask=mn, other=0.0).to(tl.float32)
                    Ct = tl.load(C_ptr + row * N + n, mask=mn, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + row * Di + d, mask=md, other=0.0).to(tl.float32)
                    h_t = tl.load(scr + (l + 1) * BLOCK_D * BLOCK_N)
                    h_prev = tl.load(scr + l * BLOCK_D * BLOCK_N)
                    dh += dy[:, None] * Ct[None, :]  # y_t = h_t . C_t
                    tl.store(dCp_ptr + ((b * n_dblocks + pd) * T + t) * N + n, tl.sum(dy[:, None] * h_t, axis=0),
                             mask=mn)
                    dD_acc += dy * u
                    a = tl.exp(dt[:, None] * A)
                    da = dh * h_prev  # h_t = a_t h_{t-1} + dt_t u_t B_t
                    dhB = tl.sum(dh * Bt[None, :], axis=1)
                    tl.store(ddt_ptr + row * Di + d, tl.sum(da * a * A, axis=1) + u * dhB, mask=md)
                    tl.store(du_ptr + row * Di + d, dy * Dv + dt * dhB, mask=md)
                    tl.store(dBp_ptr + ((b * n_dblocks + pd) * T + t) * N + n,
                             tl.sum(dh * (dt * u)[:, None], axis=0), mask=mn)
                    dA_acc += da * a * dt[:, None]
                    dh = dh * a
            tl.debug_barrier()
        tl.store(dh0_ptr + b * Di * N + dn, dh, mask=m2)
        tl.store(dAp_ptr + b * Di * N + dn, dA_acc, mask=m2)
        tl.store(dDp_ptr + b * Di + d, dD_acc, mask=md)


def _blocks(Di: int, N: int) -> tuple[int, int]:
    return min(32, triton.next_power_of_2(Di)), triton.next_power_of_2(N)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, h0, chunk):  # noqa: D102
        Bz, T, Di = u.shape
        N = A.size(1)
        u, dt, B, C = (t.float().contiguous() for t in (u, dt, B, C))
        A, D, h0 = A.float().contiguous(), D.float().contiguous(), h0.float().contiguous()
        BD, BN = _blocks(Di, N)
        n_chunks = triton.cdiv(T, chunk)
        y = torch.empty_like(u)
        hT = torch.empty_like(h0)
        ck = torch.empty(Bz, n_chunks, Di, N, device=u.device, dtype=torch.float32)
        _scan_fwd[(Bz, triton.cdiv(Di, BD))](u, dt, A, B, C, D, h0, y, hT, ck, T, Di, N, n_chunks,
                                             BLOCK_D=BD, BLOCK_N=BN, CHUNK=chunk)
        ctx.save_for_backward(u, dt, A, B, C, D, ck)
        ctx.chunk = chunk
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):  # noqa: D102
        u, dt, A, B, C, D, ck = ctx.saved_tensors
        chunk = ctx.chunk
        Bz, T, Di = u.shape
        N = A.size(1)
        BD, BN = _blocks(Di, N)
        nblk, n_chunks = triton.cdiv(Di, BD), ck.size(1)
        dy = torch.zeros_like(u) if dy is None else dy.float().contiguous()
        dhT = torch.zeros(Bz, Di, N, device=u.device) if dhT is None else dhT.float().contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        scr = torch.empty(Bz, nblk, chunk + 1, BD, BN, **f32)
        du, ddt = torch.empty_like(u), torch.empty_like(dt)
        dAp, dh0 = torch.empty(Bz, Di, N, **f32), torch.empty(Bz, Di, N, **f32)
        dBp, dCp = torch.empty(Bz, nblk, T, N, **f32), torch.empty(Bz, nblk, T, N, **f32)
        dDp = torch.empty(Bz, Di, **f32)
        _scan_bwd[(Bz, nblk)](u, dt, A, B, C, D, ck, dy, dhT, scr, du, ddt, dAp, dBp, dCp, dDp, dh0,
                              T, Di, N, n_chunks, nblk, BLOCK_D=BD, BLOCK_N=BN, CHUNK=chunk)
        return du, ddt, dAp.sum(0), dBp.sum(1), dCp.sum(1), dDp.sum(0), dh0, None


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, h0: torch.Tensor | None = None, chunk: int = 64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `scan.selective_scan_reference`: y (Bz, T, Di) fp32 and the last state (Bz, Di, N)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed (pip install triton, or haipai[gpu])")
    if h0 is None:
        h0 = torch.zeros(u.size(0), u.size(2), A.size(1), device=u.device, dtype=torch.float32)
    return _SelectiveScan.apply(u, dt, A, B, C, D, h0, chunk)
