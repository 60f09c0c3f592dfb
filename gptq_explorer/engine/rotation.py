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

Applying R without forming it (Rotation: R x, and the three products both engines need, W R^T, R H R^T
and Q R): R x = H_m (d * x) block by block, with d = s / sqrt(m). H_m is a
Kronecker product of its factors (2 x 2 Sylvester steps, then the Paley matrices), so x of one block,
reshaped to one axis per factor, is transformed one axis at a time. The factors are grouped, in order,
into pieces of order <= PIECE_ORDER (hadamard_pieces: 576 -> 48, 12; 1536 -> 32, 48; 4096 -> 64, 64), each
applied as one small matmul along its axis: m * (k_1 + k_2 + ...) multiply-adds per vector instead of m^2,
O(m log m) for the power-of-two part at a fixed piece order (a radix-64 Walsh-Hadamard transform: pieces
of up to 64 keep the matmuls efficient, where radix-2 butterflies pass over memory once per factor 2).
The same code runs on NumPy arrays and torch tensors (Rotation picks np.matmul or torch.matmul); the
result equals the dense R's product up to float rounding (tests/test_engine_rotation.py).
"""

from __future__ import annotations

from functools import cache, lru_cache

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


def _signs(n: int, seed: int) -> np.ndarray:
    """The random signs s (n,) of the rotation, float64 +-1."""
    if n < 1:
        raise ValueError(f"hadamard_rotation: n must be >= 1, got {n}")
    return np.random.default_rng(seed).integers(0, 2, size=n) * 2.0 - 1.0


def hadamard_rotation(n: int, seed: int = 0) -> np.ndarray:
    """The randomized Hadamard rotation R (n, n), float64, orthogonal; deterministic in (n, seed)."""
    signs = _signs(n, seed)
    m = _block_order(n)
    H = hadamard_matrix(m)
    if m == n:
        return H * (signs / np.sqrt(n))  # H @ diag(s) / sqrt(n): scale column j by s_j
    R = np.zeros((n, n))
    for start in range(0, n, m):
        block = slice(start, start + m)
        R[block, block] = H * (signs[block] / np.sqrt(m))
    return R


# ---- the fast transform: R X without R

PIECE_ORDER = 64  # the largest piece of H_m applied as one matmul (see the module doc)


def _atoms(m: int) -> list[int]:
    """H_m's Kronecker factors in hadamard_matrix's order: a 2 for each Sylvester step, then 12s, then 20s."""
    a, b, c = _factors(m)
    return [2] * a + [12] * b + [20] * c


@lru_cache(maxsize=64)
def _piece_orders(m: int) -> tuple[int, ...]:
    """H_m's factors grouped in order into the fewest pieces of order <= PIECE_ORDER; among those groupings,
    the one with the smallest largest piece."""
    atoms = _atoms(m)

    @cache
    def best(i: int) -> tuple[int, int, tuple[int, ...]]:  # (pieces, largest, orders) for atoms[i:]
        if i == len(atoms):
            return 0, 0, ()
        options = []
        k = 1
        for j in range(i, len(atoms)):
            k *= atoms[j]
            if k > PIECE_ORDER and j > i:
                break
            count, largest, rest = best(j + 1)
            options.append((count + 1, max(largest, k), (k, *rest)))
        return min(options)

    return best(0)[2]


@lru_cache(maxsize=64)
def hadamard_pieces(m: int) -> tuple[np.ndarray, ...]:
    """H_m as a Kronecker product of pieces (int8, read-only): H_m = kron(pieces[0], pieces[1], ...);
    () for m = 1."""
    atoms, pieces = _atoms(m), []
    for k in _piece_orders(m) if m > 1 else ():
        piece, order = np.ones((1, 1), dtype=np.int8), 1
        while order < k:
            q = atoms.pop(0)
            if q == 2:
                piece = np.block([[piece, piece], [piece, -piece]])  # Sylvester, as hadamard_matrix
            else:
                piece = np.kron(piece, paley_hadamard(q - 1))
            order *= q
        piece.setflags(write=False)
        pieces.append(piece)
    return tuple(pieces)


def hadamard_scales(n: int, seed: int = 0) -> np.ndarray:
    """d = s / sqrt(m) (n,), float64: R = blockdiag(H_m) diag(d), the signs with the scale folded in."""
    return _signs(n, seed) / np.sqrt(_block_order(n))


def fast_hadamard(X, pieces, d, transpose: bool = False, matmul=np.matmul):
    """R X (transpose: R^T X) along X's first axis, for R = blockdiag(kron(pieces)) diag(d).

    X (n, ...) a NumPy array or a torch tensor; pieces and d of X's kind, dtype and device (hadamard_pieces,
    hadamard_scales); matmul: np.matmul or torch.matmul. Each piece of order k acts on its own axis of X
    reshaped to (blocks, k_1, ..., k_t, rest): one matmul (k, k) @ (before, k, after) per piece."""
    shape = X.shape
    n = shape[0]
    Y = X.reshape(n, -1)
    if not transpose:
        Y = Y * d[:, None]
    before = n
    for p in pieces:
        before //= p.shape[0]
    for p in pieces:
        k = p.shape[0]
        Y = matmul(p.T if transpose else p, Y.reshape(before, k, -1))
        before *= k
    Y = Y.reshape(n, -1)
    if transpose:
        Y = Y * d[:, None]
    return Y.reshape(shape)


def hadamard_parts(n: int, seed: int = 0) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(pieces, d) with hadamard_rotation(n, seed) = blockdiag(kron(pieces), ...) diag(d): fast_hadamard's
    arguments (pieces int8: convert them to the data's dtype)."""
    return hadamard_pieces(_block_order(n)), hadamard_scales(n, seed)


class Rotation:
    """R = hadamard_rotation(n, seed) as the products the engines need, never multiplied densely: on NumPy
    arrays, or on torch tensors when `like` is one (the pieces then take its dtype and device).

    apply(X): R X along X's first axis;  weight(W): W R^T;  hessian(H): R H R^T (also for a non-symmetric H:
    GPTAQ's dXXT);  back(Q): Q R, the weights back in the original basis;  matrix(): R itself."""

    def __init__(self, n: int, seed: int = 0, like=None):
        self.n, self.seed = n, seed
        pieces, d = hadamard_parts(n, seed)
        if like is None or isinstance(like, np.ndarray):
            dtype = np.float64 if like is None else like.dtype
            self._matmul, self._like = np.matmul, None
            self.pieces, self.d = tuple(p.astype(dtype) for p in pieces), d.astype(dtype)
        else:
            import torch

            self._matmul, self._like = torch.matmul, like
            self.pieces = tuple(torch.tensor(p, device=like.device, dtype=like.dtype) for p in pieces)
            self.d = torch.as_tensor(d, device=like.device, dtype=like.dtype)

    def apply(self, X, transpose: bool = False):
        """R X (transpose: R^T X) along X's first axis (n, ...): a new array."""
        return fast_hadamard(X, self.pieces, self.d, transpose, self._matmul)

    def weight(self, W):
        """W R^T (rows, n): each row w -> R w."""
        return self._contiguous(self.apply(W.T).T)

    def hessian(self, H):
        """R H R^T."""
        return self._contiguous(self.apply(self.apply(H).T).T)

    def back(self, Q):
        """Q R (rows, n): each row q -> R^T q."""
        return self._contiguous(self.apply(Q.T, transpose=True).T)

    def matrix(self):
        """R (n, n), dense: QuantResult.rotation."""
        R = hadamard_rotation(self.n, self.seed)
        if self._like is None:
            return R.astype(self.d.dtype, copy=False)
        import torch

        return torch.as_tensor(R, device=self._like.device).to(self._like.dtype)

    def _contiguous(self, X):
        return np.ascontiguousarray(X) if self._like is None else X.contiguous()
