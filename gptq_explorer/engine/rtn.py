"""Round-to-nearest (RTN): the baseline GPTQ is measured against, on exactly the same grid (NumPy)."""

from __future__ import annotations

import numpy as np

from . import checks
from .config import QuantConfig, QuantResult
from .grid import dequantize, grid_of, quantize_codes

# The QuantConfig fields RTN's result depends on (it uses no Hessian: no order, damping or GPTAQ).
RTN_KEYS = ("bits", "group_size", "sym", "mse_norm", "rotation", "rotation_seed", "ternary")


def rtn_quantize_numpy(W, cfg: QuantConfig, dtype=np.float64) -> QuantResult:
    """Quantize each group of W independently to the nearest grid point; no Hessian, no compensation.
    With a rotation, W R^T is rounded (and weight = dequantized @ R), as GPTQ does."""
    checks.check_shapes(np.shape(W), None)
    W = np.array(W, dtype=dtype, copy=True)
    checks.check_finite("W", bool(np.all(np.isfinite(W))))
    rows, n = W.shape
    R = rotate = None
    if cfg.rotation:
        from .rotation import Rotation

        rotate = Rotation(n, cfg.rotation_seed, like=W)
        R = rotate.matrix()
        W = rotate.weight(W)
    width = cfg.group_width(n)
    Q = np.empty_like(W)
    codes = np.empty((rows, n), dtype=np.int32)
    scales, zeros = [], []
    for s in range(0, n, width):
        scale, zero = grid_of(W[:, s : s + width], cfg)
        c = quantize_codes(W[:, s : s + width], scale[:, None], zero[:, None], cfg.maxq, cfg.ternary)
        Q[:, s : s + width] = dequantize(c, scale[:, None], zero[:, None], cfg.ternary)
        codes[:, s : s + width] = c
        scales.append(scale)
        zeros.append(zero)
    zeros_arr = np.stack(zeros, axis=1)
    return QuantResult(
        weight=Q if rotate is None else rotate.back(Q),
        codes=codes,
        scales=np.stack(scales, axis=1),
        zeros=zeros_arr if cfg.ternary else zeros_arr.astype(np.int32),
        g_idx=(np.arange(n) // width).astype(np.int32),
        perm=np.arange(n, dtype=np.int64),
        losses=None,
        config=cfg,
        method="rtn",
        rotation=R,
    )
