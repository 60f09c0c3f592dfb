"""GPTQ in NumPy: the reference algorithm, readable next to the paper, steppable column by column.

Frantar, Ashkboos, Hoefler, Alistarh (2022), "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1. Symbols follow the paper and its reference code:
H (Hessian 2/n X X^T), U ("Hinv": the upper Cholesky factor of H^-1), Err1, Losses.

Per layer, GPTQ minimizes ||W X - Q X||^2 one input column at a time. Quantizing column q to Q[:, q]
leaves an error that the Optimal Brain Surgeon (OBS) update spreads over the columns not yet quantized:

    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{q,:}           (paper, Eq. 3)

with H_F the Hessian of the remaining columns. Row q of U gives exactly that update without
re-inverting H_F after every column (Step 3, the Cholesky reformulation):
U[q, q:] = (H_F^-1)_{q,:} / sqrt([H_F^-1]_qq).

Two places where the reference code is wrong and this engine is right:
  1. Groups inside a lazy-update block. With group_size < block_size the reference takes a group's
     (scale, zero) from the global W, which lacks the updates of the current block; its result then
     changes with block_size. Here block boundaries are also placed at every group start (engine.blocks),
     so a group's grid always comes from fully updated weights and the result never depends on block_size.
  2. Symmetric groups with no negative weight: see grid.grid_params.
Everywhere else the steps, their order and their quirks are the reference's.

The methods beyond the paper (docs/methods.md) change one step each: the grid (mse_norm, ternary: grid.py),
the column order (group_aware: order.py), the basis (rotation: rotation.py; W R^T and R H R^T), and, for
GPTAQ, the update: each column's pre-rounding value w also moves the later columns by w (x) P[q, q+1:],
with P = alpha * triu_1(dXXT U^T) U (GPTQModel's GPTAQ.quantize, one defect fixed: see _iterate).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy.linalg import blas

from . import checks
from .blocks import block_bounds
from .blocks import dynamic_groups as is_dynamic
from .config import QuantConfig, QuantResult
from .grid import dequantize, grid_of, quantize_codes
from .order import group_of_steps, processing_order
from .rotation import Rotation, hadamard_rotation


def hinv_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """Upper triangular U with H^-1 = U^T U (the reference's `Hinv`), from one Cholesky factorization.

    The reference forms H^-1 (cholesky_inverse) and factors it again. Reversing the order of rows and
    columns (J = the flip permutation) avoids both: if J H J = L L^T then H^-1 = (J L^-1 J)^T (J L^-1 J)
    and J L^-1 J is upper triangular with a positive diagonal, so it IS the Cholesky factor of H^-1.
    Raises np.linalg.LinAlgError when H is not positive definite.
    """
    L = np.linalg.cholesky(H[::-1, ::-1])
    (trtri,) = scipy.linalg.get_lapack_funcs(("trtri",), (L,))
    L_inv, info = trtri(L, lower=1)
    if info != 0 or not np.all(np.isfinite(L_inv)):
        raise np.linalg.LinAlgError(f"triangular inverse failed (info={info})")
    return L_inv[::-1, ::-1]  # a reversed view: the loop reads rows and blocks of it


@dataclass
class GPTQStep:
    """One column of GPTQ, as the algorithm saw it (processing order = the order of the steps).

    update is the OBS correction applied to the columns not yet quantized (processing order
    perm[position+1:]): the lazy batch schedule applies it in two parts, but its total is this.
    """

    position: int  # processing-order index p
    column: int  # original column index perm[p]
    group: int  # index into QuantResult.scales / zeros
    weight: np.ndarray  # (d_out,) column before quantization, with every earlier update applied
    quantized: np.ndarray  # (d_out,) dequantized values Q[:, column]
    codes: np.ndarray  # (d_out,) integer codes
    scale: np.ndarray  # (d_out,) grid in use
    zero: np.ndarray  # (d_out,)
    hinv_diag: float  # d = U[p, p] = sqrt([H_F^-1]_qq)
    error: np.ndarray  # (d_out,) scaled error Err1 = (w - q) / d
    hinv_row: np.ndarray  # U[p, p+1:]
    loss: float  # this column's OBS loss: sum (w - q)^2 / d^2 / 2
    running_loss: float  # sum of losses of the columns quantized so far
    asym_row: np.ndarray | None = None  # GPTAQ: P[p, p+1:] (None for plain GPTQ)

    @property
    def correction(self) -> np.ndarray | None:
        """GPTAQ's extra term for columns perm[p+1:]: w (x) P[p, p+1:] (None for plain GPTQ)."""
        return None if self.asym_row is None else np.outer(self.weight, self.asym_row)

    @property
    def update(self) -> np.ndarray:
        """(d_out, d_in - p - 1): delta W for columns perm[p+1:], i.e. -Err1 (x) U[p, p+1:] (+ GPTAQ's
        correction)."""
        obs = -np.outer(self.error, self.hinv_row)
        return obs if self.asym_row is None else obs + self.correction


@dataclass
class PreparedLayer:
    """Everything fixed before the column loop: steps 1-4 of the reference's fasterquant."""

    W: np.ndarray  # (d_out, d_in) after the dead-column fix, columns in processing order
    H: np.ndarray  # damped Hessian, processing order
    U: np.ndarray  # upper Cholesky factor of H^-1, processing order
    perm: np.ndarray  # processing order -> original column
    dead: np.ndarray  # (d_in,) bool, original order
    damp_percent_used: float
    row_grid: tuple[np.ndarray, np.ndarray] | None  # group_size == -1
    static_grids: list[tuple[np.ndarray, np.ndarray]] | None  # static_groups, original group order
    P: np.ndarray | None = None  # GPTAQ's alpha * triu_1(dXXT U^T) U, processing order
    rotation: np.ndarray | None = None  # R: W and H above are W R^T and R H R^T


def _as_float_array(name: str, x, dtype) -> np.ndarray:
    arr = np.array(x, dtype=dtype, copy=True)
    checks.check_finite(name, bool(np.isfinite(arr.min()) and np.isfinite(arr.max())))  # NaN propagates
    return arr


def prepare_layer(W, H, cfg: QuantConfig, dtype=np.float64, dXXT=None) -> PreparedLayer:
    checks.check_shapes(np.shape(W), np.shape(H))
    checks.check_gptaq(cfg, None if dXXT is None else np.shape(dXXT), np.shape(H))
    W = _as_float_array("W", W, dtype)
    H = _as_float_array("H", H, dtype)
    checks.check_symmetric(checks.max_asymmetry(H), max(-float(H.min()), float(H.max())))
    n = W.shape[1]
    width = cfg.group_width(n)
    dXXT = _as_float_array("dXXT", dXXT, dtype) if cfg.gptaq_alpha > 0 else None

    R = None
    if cfg.rotation:
        # y = W x = (W R^T)(R x): quantize W R^T for the rotated inputs, whose Hessian is R H R^T.
        rotate = Rotation(n, cfg.rotation_seed, like=W)
        R = rotate.matrix()
        W, H = rotate.weight(W), rotate.hessian(H)
        H = (H + H.T) / 2  # exactly symmetric again
        dXXT = None if dXXT is None else rotate.hessian(dXXT)

    # Per-row grid (group_size == -1): like the reference, from W as given, before the dead-column fix.
    row_grid = grid_of(W, cfg) if cfg.group_size == -1 else None

    # Dead inputs (always zero in the calibration data): H_ii = 1 and W[:, i] = 0, so they quantize
    # to exactly 0 and neither give nor receive updates.
    dead = np.diag(H) == 0
    checks.warn_all_dead(int(dead.sum()), n)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if dXXT is not None:
        dXXT[:, dead] = 0.0

    static_grids = None
    if cfg.static_groups and cfg.group_size != -1:
        # Every group's grid from the original (unpermuted, not yet updated) weights.
        static_grids = [grid_of(W[:, s : s + width], cfg) for s in range(0, n, width)]

    # desc_act or GAR (order.py): the columns with the largest diag(H) early. Stable sorts: ties keep
    # their original order (the reference's torch.argsort leaves it unspecified).
    perm = processing_order(np.diag(H), cfg)
    W = W[:, perm]
    H = H[np.ix_(perm, perm)]
    if dXXT is not None:
        dXXT = dXXT[np.ix_(perm, perm)]

    # Damping (paper, Step 3): lambda = damp_percent * mean(diag H). If H + lambda I is still not
    # positive definite, raise lambda x10 (up to 100%) and warn, instead of crashing as the reference does.
    mean_diag = float(np.mean(np.diag(H)))
    for damp in checks.damping_schedule(cfg.damp_percent):
        H_damped = H + damp * mean_diag * np.eye(n, dtype=H.dtype)
        try:
            U = hinv_cholesky_upper(H_damped)
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise checks.not_positive_definite(cfg.damp_percent)
    checks.warn_damping(cfg.damp_percent, damp)
    # GPTAQ (GPTQModel's P): strictly upper triangular, so a column only moves the columns after it.
    P = None if dXXT is None else cfg.gptaq_alpha * np.triu(dXXT @ U.T, 1) @ U
    return PreparedLayer(W, H_damped, U, perm, dead, damp, row_grid, static_grids, P, R)


def rotation_matrix(n: int, cfg: QuantConfig, dtype=np.float64) -> np.ndarray:
    """The layer's input rotation R (n, n) for cfg.rotation."""
    return hadamard_rotation(n, cfg.rotation_seed).astype(dtype, copy=False)


def _subtract_outer(A: np.ndarray, x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> None:
    """A -= alpha outer(x, y), in place (BLAS ger) on a column-major A: np.outer would allocate a new
    rows x cols matrix for every column of the loop."""
    ger = blas.get_blas_funcs("ger", (A,))
    out = ger(-alpha, x, y, a=A, overwrite_a=True)
    if not np.may_share_memory(out, A):  # BLAS worked on a copy (A not column-major): write it back
        A[...] = out


def _subtract_matmul(C: np.ndarray, A: np.ndarray, B: np.ndarray, alpha: float = 1.0) -> None:
    """C -= alpha A @ B, in place (BLAS gemm with beta = 1) on a column-major C: no rows x cols temporary."""
    gemm = blas.get_blas_funcs("gemm", (C,))
    out = gemm(-alpha, A, B, beta=1.0, c=C, overwrite_c=True)
    if not np.may_share_memory(out, C):
        C[...] = out


def _iterate(prep: PreparedLayer, cfg: QuantConfig, record: bool) -> Iterator[GPTQStep]:
    """The column loop (paper, Algorithm 1). Yields a GPTQStep per column if record; returns the result."""
    # Column-major copies: the loop walks columns, so each column is contiguous and the BLAS updates
    # below run in place.
    W, U, P, perm = np.array(prep.W, order="F"), prep.U, prep.P, prep.perm
    rows, n = W.shape
    maxq, width, ternary = cfg.maxq, cfg.group_width(n), cfg.ternary
    dynamic_groups = is_dynamic(cfg)

    Q = np.zeros_like(W)
    codes = np.zeros((rows, n), dtype=np.int32, order="F")
    losses = np.zeros(n, dtype=W.dtype)
    scales, zeros = [], []
    running_loss = 0.0
    scale = zero = None

    for i1, i2 in block_bounds(n, cfg):
        if dynamic_groups and i1 % width == 0:
            # The group's grid from the current, error-compensated weights (all updates applied).
            scale, zero = grid_of(W[:, i1 : i1 + width], cfg)
            scales.append(scale)
            zeros.append(zero)
        W1 = W[:, i1:i2].copy(order="F")
        Err1 = np.zeros_like(W1)
        Wpre1 = np.zeros_like(W1) if P is not None else None  # GPTAQ: each column's value before rounding
        for i in range(i2 - i1):
            p = i1 + i
            if prep.row_grid is not None:
                scale, zero = prep.row_grid
            elif prep.static_grids is not None:
                scale, zero = prep.static_grids[perm[p] // width]
            w = W1[:, i]
            c = quantize_codes(w, scale, zero, maxq, ternary)
            q = dequantize(c, scale, zero, ternary)
            d = U[p, p]
            err = (w - q) / d
            # OBS update of the block's remaining columns (Eq. 3 via row p of U):
            # W1[:, i+1:] -= outer(err, U[p, p+1:i2])       (GPTAQ: and += outer(w, P[p, p+1:i2]))
            if i + 1 < i2 - i1:
                _subtract_outer(W1[:, i + 1 :], err, U[p, p + 1 : i2])
                if P is not None:
                    _subtract_outer(W1[:, i + 1 :], w, P[p, p + 1 : i2], alpha=-1.0)
            if P is not None:
                Wpre1[:, i] = w
            Err1[:, i] = err
            Q[:, p] = q
            codes[:, p] = c
            losses[p] = np.sum((w - q) ** 2) / d**2 / 2
            running_loss += float(losses[p])
            if record:
                group = p // width if dynamic_groups else (perm[p] // width if prep.static_grids else 0)
                yield GPTQStep(
                    position=p,
                    column=int(perm[p]),
                    group=int(group),
                    weight=w.copy(),
                    quantized=q,
                    codes=c.astype(np.int32),
                    scale=scale,
                    zero=zero,
                    hinv_diag=float(d),
                    error=err,
                    hinv_row=U[p, p + 1 :],
                    loss=float(losses[p]),
                    running_loss=running_loss,
                    asym_row=None if P is None else P[p, p + 1 :],
                )
        # Lazy batch update (paper, Step 2): the block's errors reach all later columns at once.
        # W[:, i2:] -= Err1 @ U[i1:i2, i2:]      (GPTAQ: and += Wpre1 @ P[i1:i2, i2:])
        # GPTQModel's GPTAQ uses the block's ROUNDED values here (its in-block update has overwritten each
        # column with q by then) but the pre-rounding w in the block: its result changes with blocksize.
        # The column-by-column algorithm uses w in both places; so do we, and block_size changes nothing.
        if i2 < n:
            _subtract_matmul(W[:, i2:], Err1, U[i1:i2, i2:])
            if P is not None:
                _subtract_matmul(W[:, i2:], Wpre1, P[i1:i2, i2:], alpha=-1.0)

    return assemble_result(prep, cfg, Q, codes, losses, scales, zeros)


def assemble_result(prep: PreparedLayer, cfg: QuantConfig, Q, codes, losses, scales, zeros) -> QuantResult:
    """A column loop's QuantResult: Q, codes (d_out, n) and losses (n,) in processing order, scales/zeros the
    dynamic groups' grids in the order the loop made them; every array back in the original column order."""
    perm = prep.perm
    n = Q.shape[1]
    width = cfg.group_width(n)
    invperm = np.argsort(perm)
    if prep.row_grid is not None:
        scales_arr, zeros_arr = prep.row_grid[0][:, None], prep.row_grid[1][:, None]
        g_idx = np.zeros(n, dtype=np.int32)
    elif prep.static_grids is not None:
        scales_arr = np.stack([s for s, _ in prep.static_grids], axis=1)
        zeros_arr = np.stack([z for _, z in prep.static_grids], axis=1)
        g_idx = (np.arange(n) // width).astype(np.int32)
    elif cfg.group_aware:  # groups stayed together: store their grids in the original group order
        order = np.argsort(group_of_steps(perm, cfg))
        scales_arr, zeros_arr = np.stack(scales, axis=1)[:, order], np.stack(zeros, axis=1)[:, order]
        g_idx = (np.arange(n) // width).astype(np.int32)
    else:
        scales_arr, zeros_arr = np.stack(scales, axis=1), np.stack(zeros, axis=1)
        g_idx = (invperm // width).astype(np.int32)  # group of original column j in processing order
    identity = bool(np.array_equal(perm, np.arange(n)))
    weight = Q if identity else Q[:, invperm]
    return QuantResult(
        weight=weight if prep.rotation is None else Rotation(n, cfg.rotation_seed, like=weight).back(weight),
        codes=(codes if identity else codes[:, invperm]).astype(np.int32, copy=False),
        scales=scales_arr,
        zeros=zeros_arr if cfg.ternary else zeros_arr.astype(np.int32),
        g_idx=g_idx,
        perm=perm.astype(np.int64),
        losses=losses[invperm],
        config=cfg,
        method="gptq",
        damp_percent_used=prep.damp_percent_used,
        dead_columns=prep.dead,
        rotation=prep.rotation,
    )


def gptq_quantize_numpy(W, H, cfg: QuantConfig, dtype=np.float64, dXXT=None) -> QuantResult:
    steps = _iterate(prepare_layer(W, H, cfg, dtype, dXXT), cfg, record=False)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


class GPTQStepper:
    """Iterate GPTQ one column at a time: `for step in GPTQStepper(W, H, cfg): ...`.

    `prepared` holds the permuted weights, the damped H and U before the first step; `result` holds
    the QuantResult (identical to gptq_quantize's) once the iteration is finished. With a rotation the
    steps are in the rotated basis (prepared.rotation = R); with GPTAQ each step carries its correction.
    """

    def __init__(self, W, H, cfg: QuantConfig | None = None, dtype=np.float64, dXXT=None):
        self.config = QuantConfig.coerce(cfg)
        self.prepared = prepare_layer(W, H, self.config, dtype, dXXT)
        self.result: QuantResult | None = None

    def __len__(self) -> int:
        return self.prepared.W.shape[1]

    def __iter__(self) -> Iterator[GPTQStep]:
        self.result = yield from _iterate(self.prepared, self.config, record=True)


def gptq_steps(W, H, cfg: QuantConfig | None = None, dtype=np.float64, dXXT=None) -> GPTQStepper:
    """A GPTQStepper: one GPTQStep per column, in processing order."""
    return GPTQStepper(W, H, cfg, dtype, dXXT)
