"""The uniform integer grid that GPTQ and RTN both round onto (NumPy).

One (scale, zero) pair per output row of a group of input columns:

    code = clamp(round(w / scale) + zero, 0, maxq)        dequantized  q = scale * (code - zero)

Asymmetric (the paper's default): the row range [min, max] is widened to include 0, then
scale = (max - min) / maxq and zero = round(-min / scale), so 0 is exactly representable.
Symmetric: zero = 2**(bits-1) (8 for 4-bit, what every GPTQ kernel assumes) and the range is
[-max|w|, +max|w|]. Two variants from the reference code: an MSE grid search over shrunk ranges, and
ternary values {xmin, 0, xmax}.
"""

from __future__ import annotations

import numpy as np

# The reference's MSE grid search (Quantizer.configure(mse=True, grid=100, maxshrink=.8)): the range is
# shrunk to p = 1, 0.99, ..., 0.21 of the min-max one and the p with the least sum |w - q|^norm is kept.
MSE_GRID = 100
MSE_MAXSHRINK = 0.8


def grid_of(w: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero) of w (rows, cols) for a QuantConfig: its bits, sym, mse_norm and ternary."""
    return grid_params(w, cfg.bits, cfg.sym, cfg.mse_norm, cfg.ternary)


def grid_params(w: np.ndarray, bits: int, sym: bool, mse_norm: float = 0.0,
                ternary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero) for a block of weights w of shape (rows, cols).

    Ternary (the reference's trits): the three values are {xmin, 0, xmax}; scale holds xmax and zero
    holds xmin (floats), as in the reference's Quantizer. mse_norm > 0: the reference's grid search.
    """
    xmin, xmax = _range(w, sym)
    if ternary:
        scale, zero = xmax, xmin
    else:
        scale, zero = _uniform(xmin, xmax, bits, sym)
    if mse_norm > 0:
        scale, zero = _mse_search(w, xmin, xmax, scale, zero, bits, sym, mse_norm, ternary)
    return scale, zero


def _range(w: np.ndarray, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each row's [xmin, xmax], widened to include 0 (symmetric: [-max|w|, max|w|])."""
    xmin = np.minimum(w.min(axis=1), 0.0)
    xmax = np.maximum(w.max(axis=1), 0.0)
    if sym:
        # Fix of a reference-code quirk: the reference symmetrizes only rows with a negative entry,
        # so a group with no negative weight keeps xmin = 0 and is clipped at 7/15 of its maximum.
        # Our symmetric range is always [-max|w|, max|w|].
        amax = np.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any positive scale works; use the reference's
    return np.where(empty, -1.0, xmin), np.where(empty, 1.0, xmax)


def _uniform(xmin: np.ndarray, xmax: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    maxq = 2**bits - 1
    scale = (xmax - xmin) / maxq
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.round(-xmin / scale)
    return scale, zero


# A row skips a candidate grid whose clipping of the row's largest or smallest weight alone costs more than
# the row's best error so far, by PRUNE_MARGIN (relative: far above float rounding). See _mse_search.
PRUNE_MARGIN = 1e-4


def _clip_ends(s, z, maxq: int, ternary: bool):
    """The largest and smallest grid values, where weights beyond them are clipped to, computed as the
    search's q computes them: (maxq - z) s and (0 - z) s; ternary: xmax (s) and xmin (z)."""
    return (s, z) if ternary else ((maxq - z) * s, (0 - z) * s)


def norm_power(e: np.ndarray, norm: float) -> np.ndarray:
    """e^norm for e >= 0, in place: exp(norm log e) for a fractional norm (cheaper than pow with a
    non-integer exponent, equal up to float rounding; docs/performance.md), e ** norm for a whole norm."""
    if float(norm).is_integer():
        return e**norm
    with np.errstate(divide="ignore"):  # log(0) = -inf, exp(-inf) = 0
        np.log(e, out=e)
    e *= norm
    return np.exp(e, out=e)


def _mse_search(w, xmin, xmax, scale, zero, bits, sym, norm, ternary):
    """The reference's search: for p = 1, 0.99, ..., 0.21, the grid of the range [p xmin, p xmax]; each row
    keeps the first p with the least sum |w - q|^norm (a later p must be strictly better).

    Same result, less work: a weight beyond the grid's end t_hi = (maxq - z) s is clipped to t_hi, so a
    row's error is at least (max w - t_hi)^norm when its largest weight is beyond it (and likewise for its
    smallest weight and t_lo). A row whose bound exceeds its best error so far cannot take this p and skips
    it (the small p clip too much); the quantization and its power (norm_power), which dominate the search,
    run on the other rows only. tests/test_engine_methods.py checks the result against the full search.
    """
    maxq = 2**bits - 1
    best = np.full(w.shape[0], np.inf)
    scale, zero = scale.copy(), zero.copy()
    w_max, w_min = w.max(axis=1), w.min(axis=1)
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        if ternary:
            s1, z1 = p * xmax, p * xmin
        else:
            s1, z1 = _uniform(p * xmin, p * xmax, bits, sym)
        t_hi, t_lo = _clip_ends(s1, z1, maxq, ternary)
        bound = norm_power(np.maximum(w_max - t_hi, 0.0), norm)
        bound += norm_power(np.maximum(t_lo - w_min, 0.0), norm)
        rows = np.flatnonzero(bound <= best * (1 + PRUNE_MARGIN))
        if rows.size == 0:
            continue
        wr = w if rows.size == w.shape[0] else w[rows]
        s, z = s1[rows, None], z1[rows, None]
        if ternary:
            q = dequantize(ternary_codes(wr, s, z), s, z, ternary=True)
        else:  # plain rounding, as the reference's search: ties only move the error, not the codes
            q = (np.clip(np.round(wr / s) + z, 0, maxq) - z) * s
        err = np.sum(norm_power(np.abs(q - wr), norm), axis=1)
        better = err < best[rows]
        won = rows[better]
        best[won] = err[better]
        scale[won] = s1[won]
        zero[won] = z1[won]
    return scale, zero


# Relative distance from a half-integer below which x / scale counts as an exact tie: 1e-9, or 4
# machine epsilons when that is larger (float32), well above division rounding, far below real gaps.
TIE_TOLERANCE = 1e-9
TIE_EPSILONS = 4


def tie_tolerance(eps: float) -> float:
    return max(TIE_TOLERANCE, TIE_EPSILONS * eps)


def round_half_even(x: np.ndarray) -> np.ndarray:
    """np.round (half to even, like torch.round), with float-noise ties made exact ties first.

    Ties are systematic here: on the symmetric grid a group's most negative weight, -max|w|, sits
    exactly half-way between codes 0 and 1. Whether a computed x lands a hair above or below .5 then
    depends on summation order (block size, BLAS, backend); snapping x to the half-integer when it is
    within the tie tolerance makes the choice the same everywhere.
    """
    half = np.round(2 * x) / 2
    tol = tie_tolerance(float(np.finfo(x.dtype).eps))
    x = np.where(np.abs(x - half) <= tol * np.maximum(np.abs(x), 1.0), half, x)
    return np.round(x)


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int,
                   ternary: bool = False) -> np.ndarray:
    """Integer codes (as floats) of w on the grid."""
    if ternary:
        return ternary_codes(w, scale, zero)
    return np.clip(round_half_even(w / scale) + zero, 0, maxq)


def ternary_codes(w: np.ndarray, xmax: np.ndarray, xmin: np.ndarray) -> np.ndarray:
    """Codes 0, 1, 2 for xmin, 0, xmax: the reference's rule, xmax above xmax / 2, xmin below xmin / 2."""
    return 1.0 + (w > xmax / 2) - (w < xmin / 2)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, ternary: bool = False) -> np.ndarray:
    if ternary:  # scale = xmax, zero = xmin
        return np.where(codes == 2, scale, np.where(codes == 0, zero, 0.0))
    return scale * (codes - zero)
