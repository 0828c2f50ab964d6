"""Orthogonal Hadamard matrices of the sizes a small LM has (192 = 12 x 16, 48 = 12 x 4, 512 = 2^9, ...).

QuaRot / SpinQuant rotate with (randomised) Hadamard matrices: H H^T = n I, every entry +-1,
so H / sqrt(n) is orthogonal and spreads any one channel evenly over all n channels, which is
what flattens activation outliers before quantization. Sylvester's construction only gives
powers of two; Paley's constructions give q + 1 (q prime, q = 3 mod 4) and 2(q + 1)
(q prime, q = 1 mod 4), and Kronecker products multiply orders, which covers d_model = 192,
384, 576, 960 and head_dim = 48, 64, 96. A size with no construction here falls back to a
seeded random orthogonal matrix (still an exact rotation; only less uniform spreading).
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of GF(q) (q prime): (q, q)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return torch.tensor(chi, dtype=torch.float64)[idx]


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's construction I or II, or None."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S with S = [[0, 1^T], [-1, Q]]
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + S
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: C (x) [[1,-1],[-1,-1]] + I (x) [[1,1],[1,-1]]
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@functools.lru_cache(maxsize=64)
def _hadamard_f64(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    # n = m * 2^k: the odd-ish base m from Paley, the power of two from Sylvester (Kronecker)
    k = 0
    while n % (2 << k) == 0:
        k += 1
    for j in range(k, -1, -1):  # prefer the largest power of two
        m = n >> j
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is None:
            continue
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        for _ in range(j):
            base = torch.kron(base, h2)
        return base
    return None


def has_hadamard(n: int) -> bool:
    return _hadamard_f64(n) is not None


def hadamard(n: int) -> torch.Tensor:
    """An (n, n) +-1 Hadamard matrix (H H^T = n I) in float64; ValueError if none is constructed here."""
    h = _hadamard_f64(n)
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed here (n = 2^k * m, m from Paley)")
    return h.clone()


def random_orthogonal(n: int, seed: int = 0, kind: str = "hadamard") -> torch.Tensor:
    """A seeded (n, n) orthogonal matrix Q in float64.

    kind="hadamard": diag(random signs) @ H / sqrt(n) (QuaRot's randomised Hadamard); sizes with no
    Hadamard construction fall back to kind="gaussian": the Q of a QR of a Gaussian matrix
    (SpinQuant's random initialisation), signs fixed so it is unique given the seed.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard" and has_hadamard(n):
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return signs[:, None] * hadamard(n) / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]
