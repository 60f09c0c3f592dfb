"""GPTQ and RTN in torch (CPU or CUDA): the NumPy engine's algorithm, reorganized for speed.

Same config, same steps, same two fixes of the reference's quirks, same errors (see gptq.py).
What changes is how the work is laid out:

  * No H^-1. The reference forms H^-1 and factors it again (cholesky, cholesky_inverse, cholesky):
    two O(n^3) passes that cost more than the whole column loop on a CPU. Here H is factored once as
    H = R R^T with R upper triangular (_factor_upper: blocked, from the last block up, in place); then
    U = chol(H^-1) = R^-1, and:
      - lazy updates: with D = W0 - Q, the algorithm satisfies D = Err U, i.e. Err = D R, so the pending
        correction of later columns accumulates as S += D_B R_B (the size of the reference's Err1 @ U);
      - a block's state (earlier columns fixed) is W0_B + S_B R_BB^-1 = W0_B + S_B U_BB, with U_BB a
        block-sized triangular inverse; folded into R's panels as H is factored (at no extra cost), the
        lazy updates add up S_B U_BB directly, and a block's state is one addition.
  * Transposed layout: column i of W is row i of every work buffer, so every per-column op touches
    contiguous memory. W itself is only read: each block copies its columns out, transposed (with a column
    order, W is transposed whole once and a block gathers its rows: layout.Columns).
  * Two-level lazy updates: inside a 128-column block, columns are quantized in sub-blocks of 16; a
    column pulls the OBS updates of its sub-block's earlier columns as one matrix-vector product, and a
    finished sub-block reaches the rest of the block as one matmul (the paper's Step 2, one level down);
    and one level up, the blocks after the next get two blocks' corrections as one matmul (lazy_updates).
  * Two layer-sized work buffers (R, its rows padded where their length would alias in the CPU's caches:
    layout.padded_empty; S, which takes each block's values once the block has started) and
    the codes as bytes, each touched once; with a column order, W's transposed copy too. The results go into
    the buffers whose work is done (square layers: no fresh layer-sized tensor), by torch's blocked
    transposed copy (layout.transpose_into).
  * On CPU a sub-block's columns run in column_kernel on views of the torch buffers: one compiled call
    per sub-block where numba is installed, else NumPy ufuncs (a torch op costs several microseconds of
    dispatch on a 4096-vector); and, for big layers on several cores, the lazy updates run in a worker
    thread while the main thread quantizes the next columns.
  * On CUDA a block's columns run as one Triton kernel (column_triton), a tile of rows per program: a
    torch op per step would make a column a dozen kernel launches.
The result equals the NumPy engine's up to rounding (codes exactly, in float64; tests).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from . import checks
from . import column_kernel as kernel
from .blocks import block_bounds
from .blocks import dynamic_groups as is_dynamic
from .config import QuantConfig, QuantResult
from .grid_torch import grid_of, quantize
from .layout import Columns, padded_empty, permuted_into, shared_tensor, storage_as, to_tensor, transpose_into
from .lazy_updates import LazyUpdates
from .order import group_of_steps, processing_order
from .rotation import Rotation

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


# Columns per run of _factor_upper: the blocks of a run update everything above and left of it as one
# matmul this deep (256 measured fastest of 256/384/512; narrower ones run the matmul slower).
FACTOR_RUN = 256


def _runs(bounds, width: int) -> list[list[tuple[int, int]]]:
    """Consecutive blocks grouped into runs at least `width` columns wide, counted from the last block
    (the first run may be narrower)."""
    runs, run = [], []
    for block in reversed(bounds):
        run.insert(0, block)
        if run[-1][1] - run[0][0] >= width:
            runs.insert(0, run)
            run = []
    return [run] + runs if run else runs


def _factor_upper(A: torch.Tensor, bounds, fold: bool = True, inverses: dict | None = None) -> torch.Tensor:
    """R upper triangular with A = R R^T, in place in A's upper triangle (only that is read; below the
    diagonal is scratch, and everything downstream reads only upper triangles), by the GPTQ blocks
    (bounds); fold: R folded as the lazy updates use it, each block's column panel above the diagonal
    times the block's U = R_BB^-1 and U in the diagonal block (see _fold_block_inverses); inverses (not
    folded): a dict that receives each block's U by its first column, for _fold_block_inverses.

    A blocked Cholesky that starts from the last block: with A = [[A11, A12], [A21, A22]] and
    R = [[R11, R12], [0, R22]], A22 = R22 R22^T (a small factorization of the reversed block),
    R12 = A12 R22^-T, and A11 - R12 R12^T = R11 R11^T is the same problem again. Folded, the panel is
    R12 U22 = A12 A22^-1, and R12 R12^T = A12 (A12 A22^-1)^T: one block-sized matmul per block gives the
    folded panel and the update at once (the fold costs nothing). Blocks go in runs (_runs): inside a run
    each block updates the run's earlier columns; the rest of A11 gets the whole run's update as one
    matmul FACTOR_RUN deep, upper triangle only, a column panel at a time. No n x n reversed copies (the
    flips that factor the reversed matrix with LAPACK would need), no n x n temporaries.
    Raises LinAlgError when A is not positive definite.
    """
    runs = _runs(bounds, FACTOR_RUN)
    # the run's new panels, written into A once the run's update of A11 (which reads A12) is done
    T = A.new_empty((A.shape[0], max(run[-1][1] - run[0][0] for run in runs)))
    for run in reversed(runs):
        r0, r1 = run[0][0], run[-1][1]
        for a, b in reversed(run):
            L, info = torch.linalg.cholesky_ex(torch.flip(A[a:b, a:b], (0, 1)))
            if int(info) != 0:
                raise torch.linalg.LinAlgError("not positive definite")
            Rbb = torch.flip(L, (0, 1))
            # the block's triangular inverse; panels multiply by it (a solve is several times slower)
            eye = torch.eye(b - a, device=A.device, dtype=A.dtype)
            U = torch.linalg.solve_triangular(Rbb, eye, upper=True)
            A[a:b, a:b] = U if fold else Rbb
            if inverses is not None:
                inverses[a] = U
            if a == 0:
                break
            Tb = T[:a, a - r0 : b - r0]
            torch.mm(A[:a, a:b], U.T @ U if fold else U.T, out=Tb)  # A12 A22^-1, or R12 = A12 R22^-T
            left = A[:a, a:b] if fold else Tb
            if a > r0:  # the run's earlier columns, at once: the next blocks of the run factor them
                A[:a, r0:a].addmm_(left, Tb[r0:a].T, alpha=-1)
        if r0:
            left = A[:r0, r0:r1] if fold else T[:r0, : r1 - r0]
            for c0 in range(0, r0, FACTOR_RUN):  # A11 -= R12 R12^T, upper triangle only, by column panels
                c1 = min(c0 + FACTOR_RUN, r0)
                A[:c1, c0:c1].addmm_(left[:c1], T[c0:c1, : r1 - r0].T, alpha=-1)
        for a, b in run:
            if a:
                A[:a, a:b] = T[:a, a - r0 : b - r0]
    return A


def _fold_block_inverses(R: torch.Tensor, bounds, inverses: dict) -> None:
    """In place: every block's column panel above the diagonal times the block's U = R_BB^-1 (inverses, by
    the block's first column, from _factor_upper), and U itself in the diagonal block (only the upper
    triangles are meaningful).

    The lazy updates then add up S_B U_BB rather than S_B, so a block's state W0_B + S_B U_BB is one
    addition when the block starts, not a matmul. _factor_upper folds as it factors, at no cost; this is
    for GPTAQ, whose M is computed from R before the fold."""
    for i1, i2 in bounds:
        U = inverses[i1]
        if i1:
            R[:i1, i1:i2] = R[:i1, i1:i2] @ U
        R[i1:i2, i1:i2] = U


def _group_state(columns, S: torch.Tensor, R: torch.Tensor, bounds, k: int, width: int,
                 asym=None) -> torch.Tensor:
    """Fully updated weights (transposed) of the group that starts at block k and is wider than a block,
    when every column before it is quantized: W0 + S R_FF^-1 over its columns F.

    With R folded (_fold_block_inverses: R~ = R blockdiag(U)) and S~ = S blockdiag(U) in the lazy updates'
    buffer, S R_FF^-1 = S~ R~_FF^-1, and R~_FF has identity diagonal blocks: block j's part is
    X_j = S~_j - sum_{l<j} X_l R~_lj, one matmul per block. GPTAQ's pending g's add U_jj^T G_j to S~_j."""
    i1 = bounds[k][0]
    end = min(i1 + width, S.shape[0])
    X = torch.empty((end - i1, S.shape[1]), device=S.device, dtype=S.dtype)
    for a, b in bounds[k:]:
        if a >= end:
            break
        Xj = X[a - i1 : b - i1]
        Xj.copy_(S[a:b])
        if asym is not None:
            Xj.addmm_(R[a:b, a:b].T, asym.Gt[a:b])
        if a > i1:
            Xj.addmm_(R[i1:a, a:b].T, X[: a - i1], alpha=-1)
    return X.add_(columns(i1, end, torch.empty_like(X)))


# Columns handled one at a time inside a sub-block; the rest of the block gets each sub-block's
# errors as one matmul (two-level lazy updates: the paper's Step 2 applied inside the block too).
SUB_BLOCK = kernel.SUB_BLOCK

# Which column step runs: "auto" picks NumPy/numba on CPU, the Triton kernel on CUDA where triton is
# installed, else torch ops; tests and benchmarks force "numpy", "torch" or "triton" to compare them.
COLUMN_STEP = "auto"


def column_step_kind(device: torch.device) -> str:
    if COLUMN_STEP != "auto":
        return COLUMN_STEP
    if device.type == "cpu":
        return "numpy"
    from . import column_triton

    return "triton" if column_triton.available(device) else "torch"


class _ColumnSteps:
    """Quantize a block's columns and record their codes, values, scaled errors and losses (the inner
    loop's hot path; column_kernel's module doc has the steps, in both GPTAQ forms).

    On CPU ("numpy"): column_kernel.sub_block on zero-copy NumPy views of the torch buffers, compiled (one
    call per sub-block) where numba is installed, else NumPy ufuncs (a torch op's dispatch costs several
    times a ufunc's on a 4096-vector). On CUDA ("triton"): the whole block in one kernel (column_triton).
    Else ("torch"): torch ops, one column at a time. The first two sum in sub-blocks of SUB_BLOCK columns,
    a finished sub-block reaching the rest of the block as one matmul.
    """

    def __init__(self, codes_t, losses, maxq: int, ternary: bool, gptaq: bool, gsel: np.ndarray,
                 block_rows: int):
        """codes_t: the codes (transposed, uint8: bits <= 8); gsel: the grid row of each column (in processing
        order); block_rows: the widest block's columns."""
        self.kind = column_step_kind(codes_t.device)
        self.maxq, self.ternary = maxq, ternary
        self.mode = kernel.R_FORM if gptaq else kernel.PLAIN
        self.codes_t, self.losses, self.gsel = codes_t, losses, gsel
        # the torch and Triton steps compute a block's codes in the values' dtype, then copy them into
        # codes_t (bytes: a quarter of the memory to fault in and to transpose at the end); column_kernel
        # writes bytes itself
        self.Cb = None if self.kind == "numpy" else torch.empty((block_rows, codes_t.shape[1]),
                                                                 device=codes_t.device, dtype=losses.dtype)
        if self.kind == "triton":  # on the device once, not a host-to-device copy per block
            self.gsel_t = torch.as_tensor(gsel, device=codes_t.device)
        self.launched = False

    def block(self, i1: int, i2: int, W1, E, Q, U1, grids, M1=None, G1=None) -> None:
        """Run the block's columns. Its buffers: state W1, errors E, values Q, U1 = U[B, B], grids (scales,
        zeros) (groups, rows), GPTAQ's M[B, B] and pending g's."""
        in_place = self.kind == "numpy"
        C = self.codes_t[i1:i2] if in_place else self.Cb[: i2 - i1]
        self._columns(i1, i2, W1, E, Q, C, U1, grids, M1, G1)
        if not in_place:
            self.codes_t[i1:i2] = C

    def _columns(self, i1: int, i2: int, W1, E, Q, C, U1, grids, M1, G1) -> None:
        L, gsel = self.losses[i1:i2], self.gsel[i1:i2]
        if self.kind == "triton":
            from . import column_triton

            try:
                column_triton.block_columns(W1, E, Q, C, L, U1, *grids, self.gsel_t[i1:i2], self.maxq,
                                            self.ternary, M1, G1)
                self.launched = True
                return
            except Exception as e:  # a GPU or setup Triton cannot compile for: torch ops, same results
                if self.launched:
                    raise
                warnings.warn(f"the Triton column kernel could not run ({type(e).__name__}: {e}); GPTQ's "
                              "column loop runs as torch ops instead (same results, slower on a GPU)",
                              stacklevel=2)
                self.kind = "torch"
        if self.kind == "numpy":
            np_bufs = [t.numpy() for t in (W1, E, Q, C, L, U1, *grids)]
            d = np.ascontiguousarray(np.diagonal(np_bufs[5]))
            M1n, G1n = (None, None) if M1 is None else (M1.numpy(), G1.numpy())
        else:
            d = torch.diagonal(U1).tolist()
        n = i2 - i1
        for s1 in range(0, n, SUB_BLOCK):
            s2 = min(s1 + SUB_BLOCK, n)
            if self.kind == "numpy":
                kernel.sub_block(*np_bufs[:6], s1, s2, *np_bufs[6:], gsel, d, self.maxq, self.ternary,
                                 self.mode, M1n, G1n)
            else:
                self._sub_block_torch(W1, E, Q, C, L, U1, grids, gsel, d, s1, s2, M1, G1)
            if s2 < n:  # the sub-block's errors reach the rest of the block as one matmul
                W1[s2:].addmm_(U1[s1:s2, s2:].T, E[s1:s2], alpha=-1)
                if M1 is not None:
                    G1[s2:].addmm_(M1[s1:s2, s2:].T, W1[s1:s2])

    def _sub_block_torch(self, W1, E, Q, C, L, U1, grids, gsel, d, s1: int, s2: int, M1, G1) -> None:
        scales, zeros = grids
        for i in range(s1, s2):
            w = W1[i]
            if i > s1:  # OBS updates from this sub-block's earlier columns, pulled as one gemv
                w.addmv_(E[s1:i].T, U1[s1:i, i], alpha=-1)
            if M1 is not None:  # GPTAQ (see _Gptaq): g of this column, added as g d
                g = G1[i] if i == s1 else torch.addmv(G1[i], W1[s1:i].T, M1[s1:i, i])
                w.add_(g, alpha=d[i])
            j = int(gsel[i])
            C[i], Q[i] = quantize(w, scales[j], zeros[j], self.maxq, self.ternary)
            err = torch.sub(w, Q[i], out=E[i])
            err /= d[i]  # Err = (w - q) / [H^-1]_qq^(1/2)
            if M1 is not None:
                L[i] = err.square().sum() / 2
                err.sub_(g)
        if M1 is None:  # the paper's Losses: (w - q)^2 / U_qq^2 / 2
            L[s1:s2] = E[s1:s2].square().sum(dim=1) / 2


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


def _max_asymmetry(H: torch.Tensor) -> float:
    """checks.max_asymmetry, a panel of columns at a time: H[a:, a:b] transposed (transpose_into: torch's
    blocked copy on a CPU) and compared with the rows H[a:b, a:]. Reading the panel transposed directly
    walks H a row per element (2-3 times slower for 4096^2 on a CPU). On a GPU the panels are wide: each
    costs a few kernel launches, and memory there is fast."""
    n = H.shape[0]
    p = min(n, 128 if H.device.type == "cpu" else 1024)
    row = H.new_empty(n * p)
    worst = H.new_zeros(())
    for a in range(0, n, p):
        b = min(a + p, n)
        diff = transpose_into(row[: (b - a) * (n - a)].view(b - a, n - a), H[a:, a:b]).sub_(H[a:b, a:])
        lo, hi = torch.aminmax(diff)
        worst = torch.maximum(worst, torch.maximum(-lo, hi))
    return float(worst)


def _all_finite(t: torch.Tensor) -> bool:
    return _finite_range(t)[0]


def _finite_range(t: torch.Tensor) -> tuple[bool, float, float]:
    """(all finite, min, max) in one pass: NaN propagates into aminmax and Inf is extreme, so no boolean
    copy is needed."""
    lo, hi = torch.aminmax(t)
    lo, hi = float(lo), float(hi)
    return bool(np.isfinite(lo) and np.isfinite(hi)), lo, hi


class _Gptaq:
    """GPTAQ's extra term in the R form (the NumPy engine has the readable P form; tests check they agree).

    With P = M U, M = alpha triu_1(dXXT U^T), the corrections w_i P[i, j] of earlier columns add up, for
    column j, to sum_{k <= j} g_k U[k, j] with g_k = sum_{i < k} w_i M[i, k]: a correction g_k d_k of column
    k itself before it is rounded, and an error g_k subtracted from the one it propagates (Err' = Err - g).
    Then W0 - Q = Err' U still holds, so the lazy updates stay as they are; only g is accumulated, lazily,
    from the pre-rounding values (transposed layout: Gt[k] = g_k): inside a block two-level, like the OBS
    updates (_ColumnSteps), and from each finished block to the later ones as lazy updates of their own
    (`updates`, whose source rows are the block's state W1, once quantized). R must not be folded yet."""

    # Rows of M per triangular solve (see __init__).
    SOLVE_ROWS = 512

    def __init__(self, dXXT: torch.Tensor, R: torch.Tensor, alpha: float, like: torch.Tensor, bounds):
        # dXXT U^T = dXXT R^-T, no inverse. M keeps only the part right of the diagonal, and for the rows from
        # i0 on that part is dXXT[rows, i0:] R[i0:, i0:]^-T (U's trailing block is R's trailing block's
        # inverse): a triangular solve per block of rows, a third of one solve's work with the whole R.
        n = R.shape[0]
        M = torch.zeros_like(R)
        for i0 in range(0, n, self.SOLVE_ROWS):
            i1 = min(i0 + self.SOLVE_ROWS, n)
            M[i0:i1, i0:] = torch.linalg.solve_triangular(R[i0:, i0:].T, dXXT[i0:i1, i0:], upper=False,
                                                          left=False)
        self.M = M.triu_(1).mul_(alpha)
        self.Gt = torch.zeros_like(like)  # (n, rows), as the pending corrections
        self.updates = LazyUpdates(self.Gt, self.M, bounds)


def _gptq_torch(W, H, cfg: QuantConfig, device, dtype, worker_threads: int = 0, dXXT=None) -> QuantResult:
    device = torch.device(device) if device is not None else None
    # W0 as given where it already has this device and dtype (only read: see layout.Columns), else
    # converted. Never written while it is the caller's.
    W0 = shared_tensor(W, device, dtype)
    del W
    # H likewise: the factorization works on a copy
    H = shared_tensor(H, W0.device, dtype)
    checks.check_finite("W", _all_finite(W0))
    finite, h_min, h_max = _finite_range(H)
    checks.check_finite("H", finite)
    checks.check_symmetric(_max_asymmetry(H), max(-h_min, h_max))
    gptaq = cfg.gptaq_alpha > 0
    if gptaq:
        dXXT = to_tensor(dXXT, W0.device, dtype)
        checks.check_finite("dXXT", _all_finite(dXXT))
    rows, n = W0.shape
    maxq, width = cfg.maxq, cfg.group_width(n)
    dynamic_groups = is_dynamic(cfg)

    rot = rotate = None
    if cfg.rotation:  # y = W x = (W R^T)(R x): W <- W R^T, H <- R H R^T
        rotate = Rotation(n, cfg.rotation_seed, like=W0)
        rot = rotate.matrix()
        W0 = rotate.weight(W0)
        H = rotate.hessian(H)
        H = (H + H.T) / 2
        dXXT = rotate.hessian(dXXT) if gptaq else None

    row_grid = grid_of(W0, cfg) if cfg.group_size == -1 else None
    dead = torch.diag(H) == 0
    checks.warn_all_dead(int(dead.sum()), n)
    if bool(dead.any()):
        H = H.clone() if rot is None else H
        H[dead, dead] = 1.0
        W0 = W0.clone() if rot is None else W0  # never the caller's
        W0[:, dead] = 0.0
        if gptaq:
            dXXT[:, dead] = 0.0
    static_grids = None
    if cfg.static_groups and cfg.group_size != -1:
        static_grids = [grid_of(W0[:, s : s + width], cfg) for s in range(0, n, width)]
    reordered = cfg.desc_act or cfg.group_aware
    perm_np = processing_order(torch.diag(H).cpu().numpy(), cfg)
    perm = torch.as_tensor(perm_np, device=H.device)
    # each block's original columns, transposed; with a column order W0 is transposed whole first (one core
    # in torch): with a worker thread, beside H's permuted copy below
    columns = Columns(W0, perm if reordered else None, background=worker_threads > 0)
    del W0
    if reordered and gptaq:
        with _single_thread(dXXT.device, enabled=worker_threads > 0):
            dXXT = permuted_into(torch.empty_like(dXXT), dXXT, perm)
    # S, the pending corrections (transposed); taken now: on a GPU, while reordering, it is scratch space
    S = torch.empty((n, rows), device=perm.device, dtype=dtype)

    bounds = block_bounds(n, cfg)
    diag = torch.diag(H)[perm] if reordered else torch.diag(H)
    mean_diag = float(diag.mean())
    for damp in checks.damping_schedule(cfg.damp_percent):
        # the factorization overwrites its argument: a fresh copy (permuted) of H for every try
        # (padded rows: R's panels are the factorization's and the lazy updates' matmul operands)
        R = padded_empty(n, n, S)
        if reordered:  # on one core where W's transposed copy has the other
            with _single_thread(R.device, enabled=worker_threads > 0):
                R = permuted_into(R, H, perm, scratch=storage_as(S, H.shape, dtype, temporary=True))
        else:
            R.copy_(H)
        columns.ready()  # before the factorization, which takes every thread
        R.diagonal().add_(damp * mean_diag)  # the paper's dampening, lambda I
        try:
            inverses = {} if gptaq else None  # GPTAQ's M needs R itself: folded below
            R = _factor_upper(R, bounds, fold=not gptaq, inverses=inverses)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise checks.not_positive_definite(cfg.damp_percent)
    checks.warn_damping(cfg.damp_percent, damp)
    del H, diag

    asym = None
    if gptaq:
        asym = _Gptaq(dXXT, R, cfg.gptaq_alpha, S, bounds)
        _fold_block_inverses(R, bounds, inverses)
    del dXXT
    S.zero_()
    codes_t = torch.empty((n, rows), device=R.device, dtype=torch.uint8)  # integer codes (bits <= 8)
    # a block's original weights, its state, its scaled errors (w - q) / U_ii (the paper's Err1; GPTAQ: Err')
    block_rows = max(b - a for a, b in bounds)
    W0b, W1b, Errb = (torch.empty((block_rows, rows), device=R.device, dtype=dtype) for _ in range(3))
    losses = torch.empty(n, device=R.device, dtype=dtype)
    scales, zeros = [], []
    grids = None  # (scales, zeros) of the grids in use, (groups, rows); gsel: each column's row
    if row_grid is not None:
        grids = (row_grid[0][None], row_grid[1][None])
    if static_grids is not None:
        grids = tuple(torch.stack(g) for g in zip(*static_grids))
    gsel = (perm_np // width if static_grids is not None else np.zeros(n)).astype(np.int64)
    step = _ColumnSteps(codes_t, losses, maxq, cfg.ternary, gptaq, gsel, block_rows)
    with _single_thread(R.device, enabled=worker_threads > 0), \
            LazyUpdates(S, R, bounds, worker_threads) as lazy:
        for k, (i1, i2) in enumerate(bounds):
            wide_group = dynamic_groups and i1 % width == 0 and i2 - i1 < width
            if wide_group:  # its grid needs the state of columns past i2: every held correction in now
                lazy.flush()
                lazy.wait(k, len(bounds))
                if asym is not None:
                    asym.updates.flush()
            lazy.wait(k, k + 1)  # every earlier block's correction has reached S[i1:i2]
            U1 = R[i1:i2, i1:i2].contiguous()  # U[B, B] (see _fold_block_inverses)
            W0_B = columns(i1, i2, W0b[: i2 - i1])
            # the block's state W0 + S_B U_BB, transposed (GPTAQ: where its lazy updates read it)
            W1 = W1b[: i2 - i1] if asym is None else asym.updates.source(k)
            torch.add(W0_B, S[i1:i2], out=W1)
            if dynamic_groups and i1 % width == 0:
                if wide_group:
                    group = _group_state(columns, S, R, bounds, k, width, asym)
                else:  # GPTAQ: the state also holds the pending g's share, sum_k g_k U[k, j] (see _Gptaq)
                    group = W1 if asym is None else torch.addmm(W1, U1.T, asym.Gt[i1:i2])
                scale, zero = grid_of(group[:width], cfg, dim=0)
                scales.append(scale)
                zeros.append(zero)
                grids = (scale[None], zero[None])
            M1 = G1 = None
            if asym is not None:  # GPTAQ's in-block terms, kept two-level like the OBS updates
                M1, G1 = asym.M[i1:i2, i1:i2].contiguous(), asym.Gt[i1:i2]
            # S of these columns is no longer needed: the block's values Q go there (S becomes Q^T)
            Q = S[i1:i2]
            with _single_thread(R.device):
                step.block(i1, i2, W1, Errb[: i2 - i1], Q, U1, grids, M1, G1)
            if i2 < n:
                torch.sub(W0_B, Q, out=lazy.source(k))  # D = W0 - Q
                lazy.block_done(k)
                if asym is not None:
                    asym.updates.block_done(k)
    invperm = torch.argsort(perm)

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

    def original_order(t: torch.Tensor, scratch, out: torch.Tensor) -> torch.Tensor:
        """out = t^T with t's rows back in the original column order (gathered into scratch first)."""
        if reordered:
            t = torch.index_select(t, 0, invperm, out=scratch)
        return transpose_into(out, t)

    # Into buffers whose work is done (R; S, now Q^T; W0 transposed; codes_t), not new layer-sized tensors
    # where the sizes allow: a fresh one costs page faults as well as the copy.
    # With a column order, W0's transposed copy is the weight's scratch and then takes the codes.
    codes_home = columns.Wt if reordered else S
    scratch = storage_as(codes_home, S.shape, dtype, temporary=True) if reordered else None
    weight = original_order(S, scratch, storage_as(R, (rows, n), dtype))
    scratch = storage_as(S, codes_t.shape, codes_t.dtype, temporary=True) if reordered else None
    codes = original_order(codes_t, scratch, storage_as(codes_home, (rows, n), torch.int32))
    return QuantResult(
        weight=weight if rotate is None else rotate.back(weight),
        codes=codes,
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
    W = to_tensor(W, torch.device(device) if device is not None else None, dtype)
    checks.check_finite("W", bool(torch.isfinite(W).all()))
    rows, n = W.shape
    rot = rotate = None
    if cfg.rotation:
        rotate = Rotation(n, cfg.rotation_seed, like=W)
        rot = rotate.matrix()
        W = rotate.weight(W)
    width = cfg.group_width(n)
    Q = torch.empty_like(W)
    codes = torch.empty((rows, n), device=W.device, dtype=torch.int32)
    scales, zeros = [], []
    for s in range(0, n, width):
        scale, zero = grid_of(W[:, s : s + width], cfg)
        c, Q[:, s : s + width] = quantize(W[:, s : s + width], scale[:, None], zero[:, None], cfg.maxq,
                                           cfg.ternary)
        codes[:, s : s + width] = c.to(torch.int32)
        scales.append(scale)
        zeros.append(zero)
    zeros_t = torch.stack(zeros, dim=1)
    return QuantResult(
        weight=Q if rotate is None else rotate.back(Q),
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
