"""Randomized Hadamard rotations of a layer's input dimension (QuaRot / SpinQuant style, NumPy).

For an orthogonal R the layer is unchanged by  W x = (W R^T)(R x),  and GPTQ on W' = W R^T with the
rotated Hessian H' = R H R^T solves the same problem in rotated coordinates. The point of rotating is
incoherence: a weight row with one huge entry w = c e_k has max|w| / rms(w) = sqrt(n), while
R w = c R[:, k] spreads it over every coordinate with magnitude c / sqrt(n), max / rms = 1. The grid's
range is then set by typical weights, not the outlier.

    R = H_n / sqrt(n) @ diag(s),        H_n a Hadamard matrix (entries +-1, H H^T = n I), s random +-1

The signs sit on the right, so they act on x first: R x = H (s * x) / sqrt(n). Signs on the left would
only flip the signs of the outputs and leave every |R x| as it was, randomizing nothing that matters.

Which orders are built: Sylvester doubling gives 2^a; a Paley-I construction gives q + 1 for a prime
q = 3 (mod 4), here 12 (q = 11) and 20 (q = 19); Kronecker products of Hadamard matrices are Hadamard.
So n = 2^a 12^b 20^c is a dense Hadamard order. Any other n gets a block-diagonal R: n / m copies of
the largest constructible m dividing n (11008 = 43 * 256 -> 43 blocks of 256), each block with its
own signs. An outlier then spreads only within its block, so max / rms drops to sqrt(n / m), not 1.
For odd n, m = 1 and R is just diag(s): a sign flip, orthogonal but spreading nothing.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def paley_hadamard(q: int) -> np.ndarray:
    """Paley I: a Hadamard matrix of order q + 1 for a prime q = 3 (mod 4), entries +-1 (int8).

    With chi the quadratic character mod q (chi(0) = 0, +1 on nonzero squares, -1 otherwise) and the
    Jacobsthal matrix Q[i, j] = chi(j - i): S = [[0, 1^T], [-1, Q]] is skew-symmetric (chi(-1) = -1 when
    q = 3 mod 4) with S S^T = q I, so H = I + S has H H^T = I + S + S^T + S S^T = (q + 1) I.
    """
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=np.int8)
    idx = np.arange(q)
    S = np.zeros((q + 1, q + 1), dtype=np.int8)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return np.eye(q + 1, dtype=np.int8) + S


def _factors(m: int) -> tuple[int, int, int] | None:
    """(a, b, c) with m = 2^a 12^b 20^c, or None when m is not such a product."""
    exps = []
    for p in (2, 3, 5):
        e = 0
        while m % p == 0:
            m, e = m // p, e + 1
        exps.append(e)
    twos, b, c = exps
    a = twos - 2 * (b + c)  # each 12 = 4 * 3 and each 20 = 4 * 5 uses two factors of 2
    return (a, b, c) if m == 1 and a >= 0 else None


@lru_cache(maxsize=1024)
def _block_order(n: int) -> int:
    """The largest dense Hadamard order dividing n (1 for odd n)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and _factors(d) is not None)


@lru_cache(maxsize=8)  # int8 keeps the cache small: 16 MiB for order 4096
def hadamard_matrix(m: int) -> np.ndarray:
    """The unsigned Hadamard matrix of a constructible order m (entries +-1, int8, read-only)."""
    a, b, c = _factors(m)
    H = np.ones((1, 1), dtype=np.int8)
    for _ in range(a):  # Sylvester doubling: [[H, H], [H, -H]]
        H = np.block([[H, H], [H, -H]])
    for q, count in ((11, b), (19, c)):
        for _ in range(count):
            H = np.kron(H, paley_hadamard(q))
    H.setflags(write=False)
    return H


def hadamard_construction(n: int) -> str:
    """One line saying what hadamard_rotation(n) builds, e.g. 'Sylvester 128 (x) Paley 12 = 1536 (dense)'."""
    m = _block_order(n)
    a, b, c = _factors(m)
    parts = ([f"Sylvester {2**a}"] if a or not (b or c) else []) + ["Paley 12"] * b + ["Paley 20"] * c
    name = " (x) ".join(parts)
    if m == n:
        return f"{name} = {n} (dense)"
    if m == 1:
        return f"random signs only: {n} has no Hadamard factor > 1 (diagonal)"
    return f"block-diagonal: {n // m} blocks of {m} ({name}) = {n}"


def hadamard_rotation(n: int, seed: int = 0) -> np.ndarray:
    """The randomized Hadamard rotation R (n, n), float64, orthogonal; deterministic in (n, seed)."""
    if n < 1:
        raise ValueError(f"hadamard_rotation: n must be >= 1, got {n}")
    signs = np.random.default_rng(seed).integers(0, 2, size=n) * 2.0 - 1.0
    m = _block_order(n)
    H = hadamard_matrix(m)
    if m == n:
        return H * (signs / np.sqrt(n))  # H @ diag(s) / sqrt(n): scale column j by s_j
    R = np.zeros((n, n))
    for start in range(0, n, m):
        block = slice(start, start + m)
        R[block, block] = H * (signs[block] / np.sqrt(m))
    return R
