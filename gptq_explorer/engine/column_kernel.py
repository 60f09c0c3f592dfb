"""GPTQ's column loop, fused over a sub-block of columns: a NumPy version and a compiled one (numba).

The fast paths (the torch path on CPU, the Layer Lab's recorded run) work in the transposed layout (row i
of a block = column i of W) and split each lazy-update block into sub-blocks: a column pulls the OBS
updates of its sub-block's earlier columns itself, and a finished sub-block reaches the rest of the block
as one matmul (the caller's). `sub_block` is the part inside a sub-block, column after column:

    w_i  = W1[i] - sum_{k<i} U1[k, i] E[k]                      (k in the sub-block)
           GPTAQ, U form (the NumPy engine's P):  + sum_{k<i} X1[k, i] W1[k]
           GPTAQ, R form (the torch path's M):    + d_i g_i,  g_i = G[i] + sum_{k<i} X1[k, i] W1[k]
    C[i] = the codes of w_i on the column's grid (bytes: at most 8 bits);  q_i = its values
    E[i] = (w_i - q_i) / d_i   (R form: minus g_i);  L[i] = sum ((w_i - q_i) / d_i)^2 / 2
    W1[i] = w_i (the pre-rounding value, which GPTAQ's later updates need)

The NumPy version is a handful of ufunc calls per column, with the grid functions of the NumPy engine; at
thousands of columns their dispatch, not arithmetic, sets the time. The compiled version does the whole
sub-block in one call: its rounding step is the same float operations as the NumPy engine's, in the
array's dtype (ties snapped the same way); its updates sum in another order than BLAS's gemv, which moves
results by rounding only (tests: the same codes as the NumPy engine in float64). It needs numba; without
it, or if compiling fails, everything runs the NumPy version.

`record_columns` is the NumPy engine's column loop (U form) laid out this way, keeping every step's
arrays: the Layer Lab's run (ui/layer_run.py), equal to the stepper's up to rounding (tests).
"""

from __future__ import annotations

import threading

import numpy as np

from . import grid as grid_np
from .blocks import block_bounds
from .blocks import dynamic_groups as is_dynamic
from .config import QuantConfig
from .gptq import assemble_result

PLAIN, U_FORM, R_FORM = 0, 1, 2  # sub_block's modes: plain GPTQ, GPTAQ with P (NumPy engine), with M (torch)

# Columns quantized one at a time inside a sub-block; the rest of the block gets a finished sub-block's
# errors as one matmul.
SUB_BLOCK = 16

COMPILED = True  # False: the NumPy version everywhere (tests and benchmarks compare the two)


def sub_block_numpy(W1, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, maxq, ternary=False, mode=PLAIN,
                    X1=None, G=None) -> None:
    """Columns s1..s2-1 of a block (arrays as in the module doc; scales, zeros (groups, rows), gsel (bs,):
    column i uses grid row gsel[i]). NumPy ufuncs, one column at a time."""
    band = _tie_band(W1.dtype, maxq)
    c = np.empty(W1.shape[1], W1.dtype)  # a column's codes in the values' dtype, then into C
    for i in range(s1, s2):
        w = W1[i]
        if i > s1:  # OBS updates from this sub-block's earlier columns, as one vector-matrix product
            w -= U1[s1:i, i] @ E[s1:i]
            if mode == U_FORM:
                w += X1[s1:i, i] @ W1[s1:i]
        if mode == R_FORM:
            g = G[i] + X1[s1:i, i] @ W1[s1:i] if i > s1 else G[i].copy()
            w += d[i] * g
        scale, zero = scales[gsel[i]], zeros[gsel[i]]
        if ternary:
            c[...] = grid_np.ternary_codes(w, scale, zero)
            Q[i] = grid_np.dequantize(c, scale, zero, ternary=True)
        else:
            _codes(w, scale, zero, maxq, band, out=c)
            np.multiply(scale, np.subtract(c, zero, out=Q[i]), out=Q[i])
        C[i] = c
        err = np.subtract(w, Q[i], out=E[i])
        err /= d[i]  # Err = (w - q) / [H^-1]_qq^(1/2)
        L[i] = np.dot(err, err) / 2  # the paper's Losses: (w - q)^2 / U_qq^2 / 2
        if mode == R_FORM:
            err -= g


def _tie_band(dtype, maxq: int) -> float:
    """Below this distance from a half-integer, x = w / scale may be one of grid.round_half_even's snapped
    ties: its tolerance at the largest |x| whose code is not clipped anyway (maxq + 1), with a margin."""
    return 2 * grid_np.tie_tolerance(float(np.finfo(dtype).eps)) * (maxq + 1)


def _codes(w, scale, zero, maxq: int, band: float, out) -> None:
    """grid.quantize_codes(w, scale, zero, maxq) into out, in fewer passes: when no x = w / scale is within
    `band` of a half-integer, the tie snapping changes nothing and plain rounding gives the same codes."""
    x = w / scale
    np.rint(x, out=out)
    if np.max(np.abs(x - out)) >= 0.5 - band:  # a possible tie: the full rule
        out[...] = grid_np.quantize_codes(w, scale, zero, maxq)
        return
    out += zero
    np.minimum(np.maximum(out, 0, out=out), maxq, out=out)  # np.clip, without its wrapper's overhead


def _sub_block_loops(W1, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, consts, ternary, mode, X1, G, g):
    """sub_block_numpy as explicit loops, for numba. consts = (2, 1, tie tolerance, maxq, 0) in the arrays'
    dtype, so that every scalar operation stays in that dtype, as NumPy's ufuncs do."""
    two, one, tol, maxq, nil = consts[0], consts[1], consts[2], consts[3], consts[4]
    rows = W1.shape[1]
    for i in range(s1, s2):
        w = W1[i]
        for k in range(s1, i):
            u = U1[k, i]
            ek = E[k]
            for j in range(rows):
                w[j] -= u * ek[j]
        if mode == U_FORM:
            for k in range(s1, i):
                p = X1[k, i]
                wk = W1[k]
                for j in range(rows):
                    w[j] += p * wk[j]
        di = d[i]
        if mode == R_FORM:
            for j in range(rows):
                g[j] = G[i, j]
            for k in range(s1, i):
                m = X1[k, i]
                wk = W1[k]
                for j in range(rows):
                    g[j] += m * wk[j]
            for j in range(rows):
                w[j] += di * g[j]
        scale, zero = scales[gsel[i]], zeros[gsel[i]]
        q, c, e = Q[i], C[i], E[i]
        for j in range(rows):
            x = w[j]
            if ternary:  # grid.ternary_codes and grid.dequantize: scale = xmax, zero = xmin
                cj = one + (one if x > scale[j] / two else nil) - (one if x < zero[j] / two else nil)
                qj = scale[j] if cj == two else (zero[j] if cj == nil else nil)
            else:  # grid.quantize_codes with grid.round_half_even's tie snapping
                x = x / scale[j]
                half = np.rint(two * x) / two
                x = half if abs(x - half) <= tol * max(abs(x), one) else x
                cj = min(max(np.rint(x) + zero[j], nil), maxq)
                qj = scale[j] * (cj - zero[j])
            c[j] = cj
            q[j] = qj
            e[j] = (w[j] - qj) / di
        L[i] = np.dot(e, e) / two
        if mode == R_FORM:
            for j in range(rows):
                e[j] -= g[j]


_LOCK = threading.Lock()
_kernel = None  # the compiled function; False once numba turned out missing or failing
_ready: set = set()  # dtypes compiled and checked


def _build():
    import numba

    try:
        return numba.njit(cache=True, nogil=True, error_model="numpy")(_sub_block_loops)
    except Exception:  # no writable cache location: compile on each start instead
        return numba.njit(nogil=True, error_model="numpy")(_sub_block_loops)


def compiled(dtype) -> bool:
    """Whether the compiled sub_block is available for arrays of `dtype` (built, and checked against the
    NumPy version on a small block, on first use)."""
    global _kernel
    dtype = np.dtype(dtype)
    if not COMPILED or _kernel is False or dtype not in (np.float32, np.float64):
        return False
    if dtype in _ready:
        return True
    with _LOCK:
        try:
            if _kernel is None:
                _kernel = _build()
            ok = _self_check(dtype)
        except Exception:
            ok = False
        if not ok:
            _kernel = False
            return False
        _ready.add(dtype)
    return True


def _self_check(dtype) -> bool:
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 8)).astype(dtype)
    U1 = np.triu(rng.standard_normal((4, 4)) / 4 + 2 * np.eye(4)).astype(dtype)
    scales, zeros = np.full((1, 8), 0.25, dtype), np.full((1, 8), 8.0, dtype)
    outs = []
    for run in (_call_compiled, sub_block_numpy):
        W1, E, Q, L = W.copy(), np.zeros_like(W), np.zeros_like(W), np.zeros(4, dtype)
        C = np.zeros(W.shape, np.uint8)
        run(W1, E, Q, C, L, U1, 0, 4, scales, zeros, np.zeros(4, np.int64), np.diag(U1).copy(), 15)
        outs.append((C, W1, E, Q, L))
    (c1, *rest1), (c2, *rest2) = outs  # the updates sum in another order than BLAS: equal up to rounding
    return bool(np.array_equal(c1, c2)) and all(np.allclose(a, b, rtol=1e-4, atol=1e-5)
                                                for a, b in zip(rest1, rest2))


def _call_compiled(W1, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, maxq, ternary=False, mode=PLAIN,
                   X1=None, G=None) -> None:
    dtype = W1.dtype
    consts = np.array([2, 1, grid_np.tie_tolerance(float(np.finfo(dtype).eps)), maxq, 0], dtype=dtype)
    if X1 is None:
        X1 = U1[:0, :0]
    if G is None:
        G, g = W1[:0], W1[0, :0]
    else:
        g = np.empty(W1.shape[1], dtype)
    _kernel(W1, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, consts, ternary, mode, X1, G, g)


def sub_block(W1, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, maxq, ternary=False, mode=PLAIN,
              X1=None, G=None, load: bool = True) -> None:
    """The compiled version when it is available for these arrays, the NumPy one otherwise; load=False:
    only if it is built already (no numba import, no compile). Arrays must be C-contiguous (the compiled
    version is built for that layout); gsel an int64 array; C bytes (np.uint8: the compiled version is built
    for that type; others work, compiled once more)."""
    ready = compiled(W1.dtype) if load else COMPILED and np.dtype(W1.dtype) in _ready
    run = _call_compiled if ready else sub_block_numpy
    run(W1, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, maxq, ternary, mode, X1, G)


def record_columns(prep, cfg: QuantConfig, load: bool = False):
    """The NumPy engine's column loop on a PreparedLayer (gptq.prepare_layer), in the transposed layout with
    sub-blocks and the fused column step: (result, Err, Wq, Q, groups, losses), Err, Wq, Q (d_out, n) in
    processing order as the stepper's steps give them (GPTQStep.error, .weight, .quantized; views of
    transposed arrays), groups the steps' GPTQStep.group. The Layer Lab's run (tests check it against the
    stepper). It uses the compiled column step only once something else has built it, unless load: numba's
    import and first compile cost far more than this loop on a Layer Lab layer."""
    U = np.ascontiguousarray(prep.U)
    P = None if prep.P is None else np.ascontiguousarray(prep.P)
    Wt = np.array(prep.W.T, order="C")  # row p: column p, updated by every block before its own (a copy)
    n, rows = Wt.shape
    dtype = Wt.dtype
    maxq, width, ternary = cfg.maxq, cfg.group_width(n), cfg.ternary
    dynamic_groups = is_dynamic(cfg)
    Errt, Qt, codes_t = np.empty_like(Wt), np.empty_like(Wt), np.empty(Wt.shape, np.uint8)
    losses = np.empty(n, dtype)
    if prep.row_grid is not None:
        grids, gsel = [prep.row_grid], np.zeros(n, np.int64)
    elif prep.static_grids is not None:
        grids, gsel = prep.static_grids, (prep.perm // width).astype(np.int64)
    else:
        grids, gsel = None, np.zeros(n, np.int64)
    if grids is not None:
        scales_all = np.ascontiguousarray(np.stack([s for s, _ in grids]), dtype=dtype)
        zeros_all = np.ascontiguousarray(np.stack([z for _, z in grids]), dtype=dtype)
    scales, zeros = [], []
    mode = PLAIN if P is None else U_FORM
    for i1, i2 in block_bounds(n, cfg):
        if dynamic_groups and i1 % width == 0:
            # the group's grid from its fully updated weights (a (rows, cols) view: the engine's layout)
            scale, zero = grid_np.grid_of(Wt[i1 : i1 + width].T, cfg)
            scales.append(scale)
            zeros.append(zero)
            scales_all, zeros_all = scale[None, :].astype(dtype), zero[None, :].astype(dtype)
        W1, U1 = Wt[i1:i2], np.ascontiguousarray(U[i1:i2, i1:i2])
        X1 = None if P is None else np.ascontiguousarray(P[i1:i2, i1:i2])
        d = np.ascontiguousarray(np.diag(U1))
        E, Qb, Cb, Lb = Errt[i1:i2], Qt[i1:i2], codes_t[i1:i2], losses[i1:i2]
        for s1 in range(0, i2 - i1, SUB_BLOCK):
            s2 = min(s1 + SUB_BLOCK, i2 - i1)
            sub_block(W1, E, Qb, Cb, Lb, U1, s1, s2, scales_all, zeros_all, gsel[i1:i2], d, maxq, ternary,
                      mode, X1, load=load)
            if s2 < i2 - i1:  # the sub-block's updates reach the rest of the block as one matmul
                W1[s2:] -= U1[s1:s2, s2:].T @ E[s1:s2]
                if P is not None:
                    W1[s2:] += X1[s1:s2, s2:].T @ W1[s1:s2]
        if i2 < n:  # lazy batch update (paper, Step 2) of every later column
            Wt[i2:] -= U[i1:i2, i2:].T @ Errt[i1:i2]
            if P is not None:
                Wt[i2:] += P[i1:i2, i2:].T @ Wt[i1:i2]
    if dynamic_groups:
        groups = np.arange(n) // width
    elif prep.static_grids is not None:
        groups = prep.perm // width
    else:
        groups = np.zeros(n, np.int64)
    # (d_out, n) views of the transposed arrays: the engine's column-major layout
    result = assemble_result(prep, cfg, Qt.T, codes_t.T, losses, scales, zeros)
    return result, Errt.T, Wt.T, Qt.T, groups.astype(np.int64), losses
