"""The seed lesson's "17.7x lower error" claim, measured (docs/engine.md quotes it; lesson 3 re-creates its
loop).

seed_lesson_comparison() re-runs the demo of the lesson this product grew from: W 256x512 and X 128x512
Gaussian (seed 42), 4-bit, group 128, where the lesson claims GPTQ gives "typically 17.7x lower error"
than round-to-nearest. It measures that claim twice: with the real GPTQ (this package's engine) and
with the lesson's simplified loop, whose two shortcuts are re-created here on purpose:
  * one scale per column, shared by all rows, recomputed from the column's current values;
  * H^-1 computed once and never downdated, so each update uses the inverse of the *full* Hessian
    instead of the Hessian of the columns not yet quantized (not the OBS update).
Both are evaluated on the calibration tokens (as the lesson does) and on fresh held-out tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..engine import Hessian, QuantConfig, gptq_quantize, rtn_quantize


def _lesson_rtn(W: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """The lesson's naive baseline: one scale max|group| / (2^(b-1) - 1) per column group, all rows."""
    max_int = 2 ** (bits - 1) - 1
    out = np.empty_like(W)
    for s in range(0, W.shape[1], group_size):
        group = W[:, s : s + group_size]
        scale = np.max(np.abs(group)) / max_int
        out[:, s : s + group_size] = np.clip(np.round(group / scale), -max_int, max_int) * scale
    return out


def lesson_simplified_gptq(W: np.ndarray, X: np.ndarray, bits: int = 4, damp: float = 0.01) -> np.ndarray:
    """The lesson's loop: per-column scale across rows, fixed H^-1 (never downdated)."""
    n_tokens, d_in = X.shape
    H = 2.0 * X.T @ X / n_tokens
    H += damp * np.mean(np.diag(H)) * np.eye(d_in)
    H_inv = np.linalg.inv(H)
    max_int = 2 ** (bits - 1) - 1
    Wq = W.astype(np.float64, copy=True)
    for q in range(d_in):
        col = Wq[:, q]
        peak = np.max(np.abs(col))
        scale = peak / max_int if peak > 0 else 1.0
        quantized = np.clip(np.round(col / scale), -max_int, max_int) * scale
        delta = col - quantized
        Wq[:, q] = quantized
        if q + 1 < d_in:
            Wq[:, q + 1 :] -= np.outer(delta, H_inv[q, q + 1 :]) / H_inv[q, q]
    return Wq


@dataclass
class SeedLessonComparison:
    """Output MSE of each quantizer, on the calibration tokens and on held-out tokens."""

    lesson_rtn_calib: float
    lesson_simplified_calib: float
    gptq_calib: float
    rtn_calib: float
    lesson_rtn_heldout: float
    lesson_simplified_heldout: float
    gptq_heldout: float
    rtn_heldout: float

    @property
    def lesson_claim_ratio(self) -> float:
        """What the lesson's own code prints: naive MSE / simplified-GPTQ MSE on the calibration data."""
        return self.lesson_rtn_calib / self.lesson_simplified_calib

    @property
    def real_ratio_calib(self) -> float:
        return self.rtn_calib / self.gptq_calib

    @property
    def real_ratio_heldout(self) -> float:
        return self.rtn_heldout / self.gptq_heldout

    def rows(self) -> list[dict]:
        """A table: one row per quantizer."""
        d = asdict(self)
        names = {"lesson_rtn": "lesson's naive RTN (one scale per group, all rows)",
                 "lesson_simplified": "lesson's simplified GPTQ loop",
                 "rtn": "RTN, GPTQ grid (per row, g128, sym)",
                 "gptq": "GPTQ (this engine, sym g128)"}
        return [{"quantizer": label, "calibration MSE": d[f"{key}_calib"],
                 "held-out MSE": d[f"{key}_heldout"]} for key, label in names.items()]


def seed_lesson_comparison(bits: int = 4, group_size: int = 128, calib_tokens: int = 128,
                           heldout_tokens: int = 4096) -> SeedLessonComparison:
    """calib_tokens=128 is the lesson's exact setting (fewer tokens than the 512 inputs: H has rank 128)."""
    rng = np.random.RandomState(42)  # the lesson's np.random.seed(42) draws, without touching global state
    W = rng.randn(256, 512)
    X = rng.randn(calib_tokens, 512)
    X_test = np.random.default_rng(7).standard_normal((heldout_tokens, 512))

    def mse(Q, data):
        return float(np.mean((data @ W.T - data @ Q.T) ** 2))

    cfg = QuantConfig(bits=bits, group_size=group_size, sym=True)
    naive = _lesson_rtn(W, bits, group_size)
    simplified = lesson_simplified_gptq(W, X, bits)
    real = gptq_quantize(W, Hessian(512).add_batch(X).H, cfg).weight
    rtn = rtn_quantize(W, cfg).weight
    return SeedLessonComparison(
        lesson_rtn_calib=mse(naive, X), lesson_simplified_calib=mse(simplified, X),
        gptq_calib=mse(real, X), rtn_calib=mse(rtn, X),
        lesson_rtn_heldout=mse(naive, X_test), lesson_simplified_heldout=mse(simplified, X_test),
        gptq_heldout=mse(real, X_test), rtn_heldout=mse(rtn, X_test),
    )
