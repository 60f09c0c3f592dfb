"""GPTQ and RTN in torch (CPU or CUDA): the NumPy engine's algorithm, reorganized for speed.

Same config, same steps, same two fixes of the reference's quirks, same errors (see gptq.py).
What changes is how the work is laid out:

  * No H^-1. The reference forms H^-1 and factors it again (cholesky, cholesky_inverse, cholesky):
    two O(n^3) passes that cost more than the whole column loop on a CPU. Here H is factored once, in
    reversed order, as H = R R^T with R upper triangular; then U = chol(H^-1) = R^-1, and:
      - lazy updates: with D = W0 - Q, the algorithm satisfies D = Err U, i.e. Err = D R, so the pending
        correction of later columns accumulates as S += D_B R_B (the size of the reference's Err1 @ U);
      - a block's state (earlier columns fixed) is W0_B + S_B R_BB^-1 = W0_B + S_B U_BB, with U_BB a
        block-sized triangular inverse.
  * Transposed layout: column i of W is row i of W0t, so every per-column op touches contiguous memory.
  * Two-level lazy updates: inside a 128-column block, columns are quantized in sub-blocks of 16; a
    column pulls the OBS updates of its sub-block's earlier columns as one matrix-vector product, and a
    finished sub-block reaches the rest of the block as one matmul (the paper's Step 2, one level down).
  * On CPU the per-column elementwise work runs as NumPy ufuncs on views of the torch buffers (a torch
    op costs several microseconds of dispatch on a 4096-vector), and, for big layers on several cores,
    the lazy updates run in a worker thread while the main thread quantizes the next columns.
The result equals the NumPy engine's up to rounding (codes exactly, in float64; tests).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading

import numpy as np
import torch

from . import checks
from . import grid as grid_np
from .blocks import block_bounds
from .blocks import dynamic_groups as is_dynamic
from .config import QuantConfig, QuantResult
from .grid import tie_tolerance
from .order import group_of_steps, processing_order


def grid_of(w: torch.Tensor, cfg: QuantConfig, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """torch twin of grid.grid_of: (scale, zero) per row of w (rows, cols); dim=0 for w transposed."""
    return _grid_params(w, cfg.bits, cfg.sym, dim, cfg.mse_norm, cfg.ternary)


def _grid_params(w: torch.Tensor, bits: int, sym: bool, dim: int = 1, mse_norm: float = 0.0,
                 ternary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torch twin of grid.grid_params."""
    xmin = w.amin(dim=dim).clamp(max=0)
    xmax = w.amax(dim=dim).clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = (xmax, xmin) if ternary else _uniform(xmin, xmax, bits, sym)
    if mse_norm > 0:
        scale, zero = _mse_search(w, dim, xmin, xmax, scale, zero, bits, sym, mse_norm, ternary)
    return scale, zero


def _uniform(xmin, xmax, bits: int, sym: bool):
    maxq = 2**bits - 1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def _mse_search(w, dim, xmin, xmax, scale, zero, bits, sym, norm, ternary):
    """torch twin of grid._mse_search (one shrink factor at a time: the candidates' tensors stay in cache)."""
    maxq = 2**bits - 1
    best = torch.full_like(scale, float("inf"))
    scale, zero = scale.clone(), zero.clone()
    for i in range(int(grid_np.MSE_MAXSHRINK * grid_np.MSE_GRID)):
        p = 1 - i / grid_np.MSE_GRID
        s1, z1 = (p * xmax, p * xmin) if ternary else _uniform(p * xmin, p * xmax, bits, sym)
        s, z = s1.unsqueeze(dim), z1.unsqueeze(dim)
        if ternary:
            _, q = _quantize(w, s, z, maxq, ternary=True)
        else:  # plain rounding, as the reference's search: ties only move the error, not the codes
            q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z).mul_(s)
        err = (q - w).abs_().pow_(norm).sum(dim=dim)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    """torch twin of grid.round_half_even: float-noise ties snapped to exact ties, then half to even."""
    half = torch.round(2 * x) / 2
    tol = tie_tolerance(torch.finfo(x.dtype).eps)
    x = torch.where((x - half).abs() <= tol * x.abs().clamp(min=1.0), half, x)
    return torch.round(x)


def _quantize(w, scale, zero, maxq, ternary: bool = False):
    """(codes, dequantized values) of w; ternary: scale = xmax, zero = xmin (grid.ternary_codes)."""
    if ternary:
        codes = 1.0 + (w > scale / 2).to(w.dtype) - (w < zero / 2).to(w.dtype)
        return codes, torch.where(codes == 2, scale, torch.where(codes == 0, zero, torch.zeros_like(w)))
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


def _factor_upper(H: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """R upper triangular with H + damping I = R R^T, via the Cholesky factor of the reversed matrix."""
    Hr = torch.flip(H, (0, 1))
    Hr.diagonal().add_(damping)  # the paper's dampening, lambda I (reversal keeps the diagonal a diagonal)
    L, info = torch.linalg.cholesky_ex(Hr)
    if int(info) != 0:
        raise torch.linalg.LinAlgError("not positive definite")
    return torch.flip(L, (0, 1))


def _state_t(W0t: torch.Tensor, St: torch.Tensor, R: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Fully updated weights of columns a..b (as rows of the transposed layout) when every column before
    a is quantized: W0 + S R_FF^-1, i.e. W0^T + R_FF^-T S^T."""
    return W0t[a:b] + torch.linalg.solve_triangular(R[a:b, a:b].T, St[a:b], upper=False)


# Columns handled one at a time inside a sub-block; the rest of the block gets each sub-block's
# errors as one matmul (two-level lazy updates: the paper's Step 2 applied inside the block too).
SUB_BLOCK = 16


NUMPY_COLUMN_STEP = True  # on CPU; False runs the torch ops there too (what CUDA runs; tests use it)


class _ColumnStep:
    """Quantize one column and record its code, value and scaled error (the inner loop's hot path).

    On CPU the elementwise work runs as NumPy ufuncs on zero-copy views of the torch buffers, with the
    NumPy engine's own grid functions: a torch op's dispatch costs several times a NumPy ufunc's on a
    4096-vector, and the column loop is ~15 such ops per column (docs/performance.md). On CUDA it stays
    in torch.
    """

    def __init__(self, Qt, codes_t, Errt, maxq: int, ternary: bool = False):
        self.numpy = Qt.device.type == "cpu" and NUMPY_COLUMN_STEP
        self.maxq, self.ternary = maxq, ternary
        self.Q, self.codes, self.Err = (t.numpy() for t in (Qt, codes_t, Errt)) if self.numpy else \
            (Qt, codes_t, Errt)

    def grid(self, scale: torch.Tensor, zero: torch.Tensor):
        return (scale.numpy(), zero.numpy()) if self.numpy else (scale, zero)

    def __call__(self, W1: torch.Tensor, i: int, row: int, grid, d: float) -> None:
        scale, zero = grid
        if self.numpy:
            w = W1[i].numpy()
            self.codes[row] = grid_np.quantize_codes(w, scale, zero, self.maxq, self.ternary)
            if self.ternary:
                self.Q[row] = grid_np.dequantize(self.codes[row], scale, zero, ternary=True)
            else:
                np.multiply(scale, self.codes[row] - zero, out=self.Q[row])
        else:
            w = W1[i]
            self.codes[row], self.Q[row] = _quantize(w, scale, zero, self.maxq, self.ternary)
        err = self.Err[row]
        np.subtract(w, self.Q[row], out=err) if self.numpy else torch.sub(w, self.Q[row], out=err)
        err /= d  # Err = (w - q) / [H^-1]_qq^(1/2)


class _LazyUpdates:
    """The paper's lazy batch updates (Step 2) in the R form: after block k, S[:, later] += D_k R[k, later].

    Pipelined on a multi-core CPU: the share of the next block is applied at once by the main thread;
    the rest (most of the multiply-adds) goes to a worker thread as tasks of a few blocks each, nearest
    columns first, while the main thread quantizes the next blocks' columns (torch ops release the GIL).
    Before a block is used, the main thread waits only for the tasks that write into it.
    """

    BLOCKS_PER_TASK = 4

    def __init__(self, St, R, W0t, Qt, bounds, worker_threads: int):
        self.St, self.R, self.W0t, self.Qt, self.bounds = St, R, W0t, Qt, bounds
        self.worker_threads = worker_threads
        self.pending = [0] * len(bounds)  # worker tasks not yet applied, per target block
        self.tasks: list = []  # heap: (first target block, sequence, source block, end target block, D)
        self.sequence = itertools.count()
        self.cond = threading.Condition()
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True) if worker_threads > 0 else None

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        if self.thread is None:
            return
        if exc_type is None:
            self.wait(0, len(self.bounds))
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()

    def _apply(self, k: int, j0: int, j1: int, D: torch.Tensor) -> None:
        """St for blocks j0..j1-1 += D_k R[block k, their columns], transposed."""
        (a, b), c, e = self.bounds[k], self.bounds[j0][0], self.bounds[j1 - 1][1]
        self.St[c:e].addmm_(self.R[a:b, c:e].T, D)

    def _work(self) -> None:
        torch.set_num_threads(self.worker_threads)
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.tasks or self.closed)
                if self.closed:
                    return
                j0, _, k, j1, D = heapq.heappop(self.tasks)
            try:
                self._apply(k, j0, j1, D)
            except BaseException as exc:  # re-raised in the main thread by wait()
                self.error = exc
            with self.cond:
                for j in range(j0, j1):
                    self.pending[j] -= 1
                self.cond.notify_all()

    def wait(self, j0: int, j1: int) -> None:
        """Until no worker task still writes into blocks j0..j1-1."""
        if self.thread is None:
            return
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or not any(self.pending[j0:j1]))
        if self.error is not None:
            raise self.error

    def block_done(self, k: int) -> None:
        a, b = self.bounds[k]
        nb = len(self.bounds)
        if k + 1 == nb:
            return
        D = self.W0t[a:b] - self.Qt[a:b]  # D = W0 - Q for the block's columns
        if self.thread is None:
            self._apply(k, k + 1, nb, D)
            return
        self.wait(k + 1, k + 2)  # no concurrent writes into the next block
        self._apply(k, k + 1, k + 2, D)
        with self.cond:
            for j0 in range(k + 2, nb, self.BLOCKS_PER_TASK):
                j1 = min(j0 + self.BLOCKS_PER_TASK, nb)
                heapq.heappush(self.tasks, (j0, next(self.sequence), k, j1, D))
                for j in range(j0, j1):
                    self.pending[j] += 1
            self.cond.notify_all()


def gptq_quantize_torch(W, H, cfg: QuantConfig, device=None, dtype=torch.float32, dXXT=None) -> QuantResult:
    checks.check_shapes(tuple(W.shape), tuple(H.shape))
    checks.check_gptaq(cfg, None if dXXT is None else tuple(dXXT.shape), tuple(H.shape))
    rows, n = W.shape
    target = torch.device(device) if device is not None else (W.device if isinstance(W, torch.Tensor)
                                                               else torch.device("cpu"))
    small = rows * n * n < SINGLE_THREAD_WORK
    # threads for the pipelined lazy updates: all but the one that runs the column loop
    worker_threads = torch.get_num_threads() - 1 if target.type == "cpu" and not small else 0
    with _single_thread(target, enabled=small):
        return _gptq_torch(W, H, cfg, device, dtype, worker_threads, dXXT)


def _all_finite(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)  # NaN propagates and Inf is extreme: one pass, no boolean copy
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class _Gptaq:
    """GPTAQ's extra term in the R form (the NumPy engine has the readable P form; tests check they agree).

    With P = M U, M = alpha triu_1(dXXT U^T), the corrections w_i P[i, j] of earlier columns add up, for
    column j, to sum_{k <= j} g_k U[k, j] with g_k = sum_{i < k} w_i M[i, k]: a correction g_k d_k of column
    k itself before it is rounded, and an error g_k subtracted from the one it propagates (Err' = Err - g).
    Then W0 - Q = Err' U still holds, so the lazy updates stay as they are; only g is accumulated, lazily,
    from the pre-rounding values Wpre (transposed layout: Gt[k] = g_k)."""

    def __init__(self, dXXT: torch.Tensor, R: torch.Tensor, alpha: float, W0t: torch.Tensor):
        # dXXT U^T = dXXT R^-T: one triangular solve, no inverse
        self.M = alpha * torch.linalg.solve_triangular(R.T, dXXT, upper=False, left=False).triu_(1)
        self.Gt = torch.zeros_like(W0t)
        self.Wpre = torch.empty_like(W0t)

    def before(self, W1: torch.Tensor, i: int, col: int, i1: int, d: float) -> torch.Tensor:
        """g of column col (block row i): add g d to it, keep its pre-rounding value; returns g."""
        g = self.Gt[col]
        if i > 0:
            g = torch.addmv(g, self.Wpre[i1:col].T, self.M[i1:col, col])
        W1[i].add_(g, alpha=d)
        self.Wpre[col] = W1[i]
        return g

    def block_done(self, i1: int, i2: int) -> None:
        self.Gt[i2:].addmm_(self.M[i1:i2, i2:].T, self.Wpre[i1:i2])


def _gptq_torch(W, H, cfg: QuantConfig, device, dtype, worker_threads: int = 0, dXXT=None) -> QuantResult:
    device = torch.device(device) if device is not None else None
    W = W.detach() if isinstance(W, torch.Tensor) else torch.as_tensor(np.asarray(W))
    W = W.to(device=device or W.device, dtype=dtype)
    # Transposed layout: row i of W0t is column i of W (later: column perm[i]), so every per-column op
    # reads and writes contiguous memory. clone: never write into the caller's tensor.
    W0t = torch.empty((W.shape[1], W.shape[0]), device=W.device, dtype=dtype).copy_(W.T)
    del W
    H = _to_tensor(H, W0t.device, dtype)
    checks.check_finite("W", _all_finite(W0t))
    checks.check_finite("H", _all_finite(H))
    h_min, h_max = torch.aminmax(H)
    checks.check_symmetric(checks.max_asymmetry(H), max(-float(h_min), float(h_max)))
    gptaq = cfg.gptaq_alpha > 0
    if gptaq:
        dXXT = _to_tensor(dXXT, W0t.device, dtype)
        checks.check_finite("dXXT", _all_finite(dXXT))
    n, rows = W0t.shape
    maxq, width = cfg.maxq, cfg.group_width(n)
    dynamic_groups = is_dynamic(cfg)

    rot = None
    if cfg.rotation:  # y = W x = (W R^T)(R x); transposed: W0t <- R W0t, H <- R H R^T
        from .gptq import rotation_matrix

        rot = torch.as_tensor(rotation_matrix(n, cfg), device=W0t.device).to(dtype)
        W0t = rot @ W0t
        H = rot @ H @ rot.T
        H = (H + H.T) / 2
        dXXT = rot @ dXXT @ rot.T if gptaq else None

    row_grid = grid_of(W0t, cfg, dim=0) if cfg.group_size == -1 else None
    dead = torch.diag(H) == 0
    checks.warn_all_dead(int(dead.sum()), n)
    if bool(dead.any()):
        H[dead, dead] = 1.0
        W0t[dead] = 0.0
        if gptaq:
            dXXT[:, dead] = 0.0
    static_grids = None
    if cfg.static_groups and cfg.group_size != -1:
        static_grids = [grid_of(W0t[s : s + width], cfg, dim=0) for s in range(0, n, width)]
    reordered = cfg.desc_act or cfg.group_aware
    perm_np = processing_order(torch.diag(H).cpu().numpy(), cfg)
    perm = torch.as_tensor(perm_np, device=W0t.device)
    if reordered:
        H = H.index_select(0, perm).index_select(1, perm)
        W0t = W0t.index_select(0, perm)
        if gptaq:
            dXXT = dXXT.index_select(0, perm).index_select(1, perm)

    mean_diag = float(torch.diag(H).mean())
    for damp in checks.damping_schedule(cfg.damp_percent):
        try:
            R = _factor_upper(H, damp * mean_diag)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise checks.not_positive_definite(cfg.damp_percent)
    checks.warn_damping(cfg.damp_percent, damp)
    del H

    St = torch.zeros_like(W0t)  # pending corrections, transposed: S = D[:, :i] @ R[:i, :]
    Qt = torch.empty_like(W0t)
    codes_t = torch.empty_like(W0t)  # integer codes, stored as floats until the end
    Errt = torch.empty_like(W0t)  # scaled errors (w - q) / U_ii, the paper's Err1 (GPTAQ: Err')
    losses = torch.empty(n, device=W0t.device, dtype=dtype)
    asym = _Gptaq(dXXT, R, cfg.gptaq_alpha, W0t) if gptaq else None
    del dXXT
    step = _ColumnStep(Qt, codes_t, Errt, maxq, cfg.ternary)
    perm_cpu = perm_np.tolist()
    scales, zeros = [], []
    grid = None
    if row_grid is not None:
        grid = step.grid(*row_grid)
    if static_grids is not None:
        static_steps = [step.grid(*g) for g in static_grids]
    bounds = block_bounds(n, cfg)
    with _single_thread(R.device, enabled=worker_threads > 0), \
            _LazyUpdates(St, R, W0t, Qt, bounds, worker_threads) as lazy:
        for k, (i1, i2) in enumerate(bounds):
            lazy.wait(k, k + 1)  # every earlier block's correction has reached St[i1:i2]
            eye = torch.eye(i2 - i1, device=R.device, dtype=dtype)
            U1 = torch.linalg.solve_triangular(R[i1:i2, i1:i2], eye, upper=True)  # U[i1:i2, i1:i2]
            W1 = torch.addmm(W0t[i1:i2], U1.T, St[i1:i2])  # the block's state W0 + S R_BB^-1, transposed
            if dynamic_groups and i1 % width == 0:
                if i2 - i1 >= width:
                    # GPTAQ: the state also holds the pending g's share, sum_k g_k U[k, j] (see _Gptaq)
                    group = W1 if asym is None else torch.addmm(W1, U1.T, asym.Gt[i1:i2])
                else:  # a group wider than the block: its grid needs the state of columns past i2
                    lazy.wait(k, len(bounds))
                    pending = St if asym is None else St + asym.Gt
                    group = _state_t(W0t, pending, R, i1, min(i1 + width, n))
                scale, zero = grid_of(group[:width], cfg, dim=0)
                scales.append(scale)
                zeros.append(zero)
                grid = step.grid(scale, zero)
            d = torch.diagonal(U1).tolist()
            with _single_thread(R.device):
                for s1 in range(0, i2 - i1, SUB_BLOCK):
                    s2 = min(s1 + SUB_BLOCK, i2 - i1)
                    for i in range(s1, s2):
                        if i > s1:  # OBS updates from this sub-block's earlier columns, pulled as one gemv
                            W1[i].addmv_(Errt[i1 + s1 : i1 + i].T, U1[s1:i, i], alpha=-1)
                        if static_grids is not None:
                            grid = static_steps[perm_cpu[i1 + i] // width]
                        if asym is None:
                            step(W1, i, i1 + i, grid, d[i])
                        else:
                            g = asym.before(W1, i, i1 + i, i1, d[i])
                            step(W1, i, i1 + i, grid, d[i])
                            losses[i1 + i] = Errt[i1 + i].square().sum() / 2
                            Errt[i1 + i].sub_(g)
                    if s2 < i2 - i1:  # the sub-block's errors reach the rest of the block as one matmul
                        W1[s2:].addmm_(U1[s1:s2, s2:].T, Errt[i1 + s1 : i1 + s2], alpha=-1)
            lazy.block_done(k)
            if asym is None:
                # the paper's Losses: (w - q)^2 / U_qq^2 / 2
                losses[i1:i2] = Errt[i1:i2].square().sum(dim=1) / 2
            elif i2 < n:
                asym.block_done(i1, i2)
    invperm = torch.argsort(perm)

    def original_order(t: torch.Tensor) -> torch.Tensor:
        t = t.index_select(0, invperm) if reordered else t
        return torch.empty((rows, n), device=t.device, dtype=t.dtype).copy_(t.T)

    if row_grid is not None:
        scales_t, zeros_t = row_grid[0][:, None], row_grid[1][:, None]
        g_idx = torch.zeros(n, dtype=torch.int32, device=R.device)
    elif static_grids is not None:
        scales_t = torch.stack([s for s, _ in static_grids], dim=1)
        zeros_t = torch.stack([z for _, z in static_grids], dim=1)
        g_idx = (torch.arange(n, device=R.device) // width).to(torch.int32)
    elif cfg.group_aware:  # groups stayed together: their grids in the original group order
        order = torch.as_tensor(np.argsort(group_of_steps(perm_np, cfg)), device=R.device)
        scales_t, zeros_t = torch.stack(scales, dim=1)[:, order], torch.stack(zeros, dim=1)[:, order]
        g_idx = (torch.arange(n, device=R.device) // width).to(torch.int32)
    else:
        scales_t, zeros_t = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
        g_idx = (invperm // width).to(torch.int32)
    weight = original_order(Qt)
    return QuantResult(
        weight=weight if rot is None else weight @ rot,
        codes=original_order(codes_t).to(torch.int32),
        scales=scales_t,
        zeros=zeros_t if cfg.ternary else zeros_t.to(torch.int32),
        g_idx=g_idx,
        perm=perm,
        losses=losses[invperm],
        config=cfg,
        method="gptq",
        damp_percent_used=damp,
        dead_columns=dead,
        rotation=rot,
    )


def rtn_quantize_torch(W, cfg: QuantConfig, device=None, dtype=torch.float32) -> QuantResult:
    checks.check_shapes(tuple(W.shape), None)
    W = _to_tensor(W, torch.device(device) if device is not None else None, dtype)
    checks.check_finite("W", bool(torch.isfinite(W).all()))
    rows, n = W.shape
    rot = None
    if cfg.rotation:
        from .gptq import rotation_matrix

        rot = torch.as_tensor(rotation_matrix(n, cfg), device=W.device).to(dtype)
        W = W @ rot.T
    width = cfg.group_width(n)
    Q = torch.empty_like(W)
    codes = torch.empty((rows, n), device=W.device, dtype=torch.int32)
    scales, zeros = [], []
    for s in range(0, n, width):
        scale, zero = grid_of(W[:, s : s + width], cfg)
        c, Q[:, s : s + width] = _quantize(W[:, s : s + width], scale[:, None], zero[:, None], cfg.maxq,
                                           cfg.ternary)
        codes[:, s : s + width] = c.to(torch.int32)
        scales.append(scale)
        zeros.append(zero)
    zeros_t = torch.stack(zeros, dim=1)
    return QuantResult(
        weight=Q if rot is None else Q @ rot,
        codes=codes,
        scales=torch.stack(scales, dim=1),
        zeros=zeros_t if cfg.ternary else zeros_t.to(torch.int32),
        g_idx=(torch.arange(n, device=W.device) // width).to(torch.int32),
        perm=torch.arange(n, device=W.device),
        losses=None,
        config=cfg,
        method="rtn",
        rotation=rot,
    )
