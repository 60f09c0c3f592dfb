"""Round-to-nearest (RTN): the baseline GPTQ is measured against, on exactly the same grid (NumPy)."""

from __future__ import annotations

import numpy as np

from . import checks
from .config import QuantConfig, QuantResult
from .grid import dequantize, grid_params, quantize_codes


def rtn_quantize_numpy(W, cfg: QuantConfig, dtype=np.float64) -> QuantResult:
    """Quantize each group of W independently to the nearest grid point; no Hessian, no compensation."""
    checks.check_shapes(np.shape(W), None)
    W = np.array(W, dtype=dtype, copy=True)
    checks.check_finite("W", bool(np.all(np.isfinite(W))))
    rows, n = W.shape
    width = cfg.group_width(n)
    Q = np.empty_like(W)
    codes = np.empty((rows, n), dtype=np.int32)
    scales, zeros = [], []
    for s in range(0, n, width):
        scale, zero = grid_params(W[:, s : s + width], cfg.bits, cfg.sym)
        c = quantize_codes(W[:, s : s + width], scale[:, None], zero[:, None], cfg.maxq)
        Q[:, s : s + width] = dequantize(c, scale[:, None], zero[:, None])
        codes[:, s : s + width] = c
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(
        weight=Q,
        codes=codes,
        scales=np.stack(scales, axis=1),
        zeros=np.stack(zeros, axis=1).astype(np.int32),
        g_idx=(np.arange(n) // width).astype(np.int32),
        perm=np.arange(n, dtype=np.int64),
        losses=None,
        config=cfg,
        method="rtn",
    )
