"""GPTQ and RTN in torch (CPU or CUDA): the NumPy engine's algorithm, reorganized for speed.

Same config, same steps, same two fixes of the reference's quirks, same errors (see gptq.py).
The one change is how U = chol(H^-1) is obtained. The reference forms H^-1 and factors it again
(cholesky, cholesky_inverse, cholesky): two O(n^3) passes that cost more than the whole column loop
on a CPU. Here H is factored once, in reversed order, as H = R R^T with R upper triangular. Then
U = R^-1, and everything the column loop needs follows from R:

  * Lazy updates: with D = W0 - Q, the algorithm satisfies D = Err U, i.e. Err = D R. So the pending
    correction of a later column j is (D[:, :i] @ R[:i, j]) and block updates accumulate into S += D_B R_B,
    the same matmul size as the reference's Err1 @ U.
  * State at a block or group start (columns F, earlier columns fixed): W_F = W0_F + S_F R_FF^-1,
    a small triangular solve per block.
  * Inside a block the loop is the reference's, with U_BB = R_BB^-1 (a block-sized inverse).
No full-size inverse is ever formed; the result equals the NumPy engine's up to rounding.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import checks
from .config import QuantConfig, QuantResult
from .grid import tie_tolerance


def _grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torch twin of grid.grid_params: per-row (scale, zero) of w (rows, cols)."""
    maxq = 2**bits - 1
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    """torch twin of grid.round_half_even: float-noise ties snapped to exact ties, then half to even."""
    half = torch.round(2 * x) / 2
    tol = tie_tolerance(torch.finfo(x.dtype).eps)
    x = torch.where((x - half).abs() <= tol * x.abs().clamp(min=1.0), half, x)
    return torch.round(x)


def _quantize(w, scale, zero, maxq):
    codes = torch.clamp(_round_half_even(w / scale) + zero, 0, maxq)
    return codes, scale * (codes - zero)


# Layers with fewer multiply-adds than this (rows * cols^2) run on one CPU thread from start to end.
SINGLE_THREAD_WORK = 4e9


@contextlib.contextmanager
def _single_thread(device: torch.device, enabled: bool = True):
    """Run on one CPU thread.

    The column loop is a handful of tiny ops per column; with two or more OpenMP threads every op waits
    for all of them, and when another process holds a core that wait costs milliseconds (measured: a
    576x576 layer 34x slower on a busy 2-core machine). Small layers run single-threaded throughout;
    large ones keep every thread for the factorization and the lazy-update matmuls.
    """
    if device.type != "cpu" or not enabled or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _to_tensor(x, device, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device or x.device, dtype=dtype, copy=True)
    return torch.tensor(np.asarray(x), device=device or "cpu", dtype=dtype)


def _factor_upper(H: torch.Tensor) -> torch.Tensor:
    """R upper triangular with H = R R^T, via the Cholesky factor of the reversed H."""
    L, info = torch.linalg.cholesky_ex(torch.flip(H, (0, 1)))
    if int(info) != 0:
        raise torch.linalg.LinAlgError("not positive definite")
    return torch.flip(L, (0, 1))


def _block_bounds(n: int, cfg: QuantConfig, dynamic_groups: bool) -> list[tuple[int, int]]:
    starts = set(range(0, n, cfg.block_size))
    if dynamic_groups:
        starts |= set(range(0, n, cfg.group_width(n)))  # a group never starts inside a block
    starts = sorted(starts)
    return list(zip(starts, starts[1:] + [n]))


def _state(W0: torch.Tensor, S: torch.Tensor, R: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Fully updated weights of columns a..b when every column before a is quantized: W0 + S R^-1."""
    # X R_FF = S_F  <=>  R_FF^T X^T = S_F^T
    return W0[:, a:b] + torch.linalg.solve_triangular(R[a:b, a:b], S[:, a:b], upper=True, left=False)


def gptq_quantize_torch(W, H, cfg: QuantConfig, device=None, dtype=torch.float32) -> QuantResult:
    checks.check_shapes(tuple(W.shape), tuple(H.shape))
    rows, n = W.shape
    target = torch.device(device) if device is not None else (W.device if isinstance(W, torch.Tensor)
                                                               else torch.device("cpu"))
    with _single_thread(target, enabled=rows * n * n < SINGLE_THREAD_WORK):
        return _gptq_torch(W, H, cfg, device, dtype)


def _gptq_torch(W, H, cfg: QuantConfig, device, dtype) -> QuantResult:
    device = torch.device(device) if device is not None else None
    W = _to_tensor(W, device, dtype)
    H = _to_tensor(H, W.device, dtype)
    checks.check_finite("W", bool(torch.isfinite(W).all()))
    checks.check_finite("H", bool(torch.isfinite(H).all()))
    checks.check_symmetric(float((H - H.T).abs().max()), float(H.abs().max()))
    rows, n = W.shape
    maxq, width = cfg.maxq, cfg.group_width(n)
    dynamic_groups = cfg.group_size != -1 and not cfg.static_groups

    row_grid = _grid_params(W, cfg.bits, cfg.sym) if cfg.group_size == -1 else None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static_grids = None
    if cfg.static_groups and cfg.group_size != -1:
        static_grids = [_grid_params(W[:, s : s + width], cfg.bits, cfg.sym) for s in range(0, n, width)]
    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(n, device=W.device)

    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(n, device=W.device, dtype=dtype)
    for damp in checks.damping_schedule(cfg.damp_percent):
        try:
            R = _factor_upper(H + (damp * mean_diag) * eye)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise checks.not_positive_definite(cfg.damp_percent)
    checks.warn_damping(cfg.damp_percent, damp)
    del H, eye

    W0 = W  # weights before any update, in processing order
    S = torch.zeros_like(W0)  # pending corrections: S = D[:, :i] @ R[:i, :] for quantized columns < i
    Q = torch.empty_like(W0)
    codes = torch.empty((rows, n), device=W.device, dtype=torch.int32)
    losses = torch.empty(n, device=W.device, dtype=dtype)
    perm_cpu = perm.cpu().numpy()
    scales, zeros = [], []
    scale = zero = None
    if row_grid is not None:
        scale, zero = row_grid

    for i1, i2 in _block_bounds(n, cfg, dynamic_groups):
        W1 = _state(W0, S, R, i1, i2)
        if dynamic_groups and i1 % width == 0:
            group = W1[:, :width] if i2 - i1 >= width else _state(W0, S, R, i1, min(i1 + width, n))
            scale, zero = _grid_params(group, cfg.bits, cfg.sym)
            scales.append(scale)
            zeros.append(zero)
        U1 = torch.linalg.solve_triangular(R[i1:i2, i1:i2], torch.eye(i2 - i1, device=W.device, dtype=dtype),
                                           upper=True)  # = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        with _single_thread(W.device):
            for i in range(i2 - i1):
                if static_grids is not None:
                    scale, zero = static_grids[perm_cpu[i1 + i] // width]
                w = W1[:, i]
                c, q = _quantize(w, scale, zero, maxq)
                Q[:, i1 + i] = q
                codes[:, i1 + i] = c.to(torch.int32)
                err = (w - q) / d[i]
                W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1)  # OBS update inside the block
        D1 = W0[:, i1:i2] - Q[:, i1:i2]
        # Losses: (w - q)^2 / d^2 / 2 with w - q = Err * d; Err = D R for the block, as a batch.
        err_block = D1 @ R[i1:i2, i1:i2] + S[:, i1:i2]
        losses[i1:i2] = (err_block**2).sum(dim=0) / 2
        if i2 < n:
            S[:, i2:].addmm_(D1, R[i1:i2, i2:])  # lazy batch update (paper, Step 2), in the R form
    invperm = torch.argsort(perm)
    if row_grid is not None:
        scales_t, zeros_t = row_grid[0][:, None], row_grid[1][:, None]
        g_idx = torch.zeros(n, dtype=torch.int32, device=W.device)
    elif static_grids is not None:
        scales_t = torch.stack([s for s, _ in static_grids], dim=1)
        zeros_t = torch.stack([z for _, z in static_grids], dim=1)
        g_idx = (torch.arange(n, device=W.device) // width).to(torch.int32)
    else:
        scales_t, zeros_t = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
        g_idx = (invperm // width).to(torch.int32)
    return QuantResult(
        weight=Q[:, invperm],
        codes=codes[:, invperm],
        scales=scales_t,
        zeros=zeros_t.to(torch.int32),
        g_idx=g_idx,
        perm=perm,
        losses=losses[invperm],
        config=cfg,
        method="gptq",
        damp_percent_used=damp,
        dead_columns=dead,
    )


def rtn_quantize_torch(W, cfg: QuantConfig, device=None, dtype=torch.float32) -> QuantResult:
    checks.check_shapes(tuple(W.shape), None)
    W = _to_tensor(W, torch.device(device) if device is not None else None, dtype)
    checks.check_finite("W", bool(torch.isfinite(W).all()))
    rows, n = W.shape
    width = cfg.group_width(n)
    Q = torch.empty_like(W)
    codes = torch.empty((rows, n), device=W.device, dtype=torch.int32)
    scales, zeros = [], []
    for s in range(0, n, width):
        scale, zero = _grid_params(W[:, s : s + width], cfg.bits, cfg.sym)
        c, Q[:, s : s + width] = _quantize(W[:, s : s + width], scale[:, None], zero[:, None], cfg.maxq)
        codes[:, s : s + width] = c.to(torch.int32)
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(
        weight=Q,
        codes=codes,
        scales=torch.stack(scales, dim=1),
        zeros=torch.stack(zeros, dim=1).to(torch.int32),
        g_idx=(torch.arange(n, device=W.device) // width).to(torch.int32),
        perm=torch.arange(n, device=W.device),
        losses=None,
        config=cfg,
        method="rtn",
    )
