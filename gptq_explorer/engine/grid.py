"""The uniform integer grid that GPTQ and RTN both round onto (NumPy).

One (scale, zero) pair per output row of a group of input columns:

    code = clamp(round(w / scale) + zero, 0, maxq)        dequantized  q = scale * (code - zero)

Asymmetric (the paper's default): the row range [min, max] is widened to include 0, then
scale = (max - min) / maxq and zero = round(-min / scale), so 0 is exactly representable.
Symmetric: zero = 2**(bits-1) (8 for 4-bit, what every GPTQ kernel assumes) and the range is
[-max|w|, +max|w|].
"""

from __future__ import annotations

import numpy as np


def grid_params(w: np.ndarray, bits: int, sym: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (scale, zero) for a block of weights w of shape (rows, cols)."""
    maxq = 2**bits - 1
    xmin = np.minimum(w.min(axis=1), 0.0)
    xmax = np.maximum(w.max(axis=1), 0.0)
    if sym:
        # Fix of a reference-code quirk: the reference symmetrizes only rows with a negative entry,
        # so a group with no negative weight keeps xmin = 0 and is clipped at 7/15 of its maximum.
        # Our symmetric range is always [-max|w|, max|w|].
        amax = np.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any positive scale works; use the reference's
    xmin = np.where(empty, -1.0, xmin)
    xmax = np.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = np.full_like(scale, (maxq + 1) / 2)
    else:
        zero = np.round(-xmin / scale)
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


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int) -> np.ndarray:
    """Integer codes (as floats) of w on the grid."""
    return np.clip(round_half_even(w / scale) + zero, 0, maxq)


def dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    return scale * (codes - zero)
