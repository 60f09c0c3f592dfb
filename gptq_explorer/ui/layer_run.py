"""The numbers behind the Layer Lab: one GPTQ run per config, replayable at any column in O(crop).

`compute_run(data, cfg)` runs the engine's stepper once over every column (its column loop as
engine.column_kernel.record_columns lays it out for speed: the same steps, equal up to rounding) and keeps,
in processing order (the desc_act order when it is on):
  W0   the weights before any step (the engine's prepared W: permuted, dead columns zeroed)
  U    the upper Cholesky factor of (H + lambda I)^-1
  Err  the scaled errors e_p = (w_p - q_p) / U_pp of every step (the reference's Err1)
  Wq   each column as it was when it got quantized (w_p, every earlier update applied)
  Q    the quantized columns
Because every update is linear, the state of the not-yet-quantized columns after step k is one matmul:

    W_state[:, j] = W0[:, j] - Err[:, :k+1] @ U[:k+1, j]        (j > k)

so `frame(run, k, ...)` rebuilds any moment of the algorithm on a crop without re-running it.

What the methods beyond the paper add (the engine's stepper shows each):
  GPTAQ     each step also moves the later columns by its pre-rounding value: + w_p (x) P[p, p+1:], with
            P = alpha triu_1(dXXT U^T) U (kept as P); so W_state gains + Wq[:, :k+1] @ P[:k+1, j], and
            frame() shows that correction apart from the OBS update.
  rotation  the stepper works on W R^T with H' = R H R^T (kept as R): every array above is in the rotated
            basis; frame(..., basis="original") multiplies each view by R (the views' not-yet values as 0),
            so column j is original input j again. diag_h is diag(H'), diag_h_orig diag(H).
  GAR, MSE grid, ternary change the order or the grid: nothing new to keep.

Running output-error curves (GPTQ vs RTN, per column): with D_k = W - (the layer after k columns: quantized
columns so far, the rest as GPTQ left them), 1/2 tr(D_k (H + lambda I) D_k^T) is exactly the running OBS
loss of the first k columns (the engine's running_loss). For RTN the same expression with the RTN-rounded
columns and the rest untouched. Divided by d_out, both read as the calibration output MSE per element
(H = 2/n X^T X, so 1/2 tr(D H D^T) = ||X D^T||^2 / n).
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import blas

from ..engine import QuantConfig, gptq_quantize, rtn_quantize
from ..engine.blocks import block_bounds
from ..engine.column_kernel import record_columns
from ..engine.gptq import prepare_layer
from ..services.layer_source import LayerData


@dataclass
class Run:
    cfg: QuantConfig
    name: str
    perm: np.ndarray  # processing position -> original column
    W0: np.ndarray  # (d_out, n) processing order
    U: np.ndarray  # (n, n)
    Err: np.ndarray  # (d_out, n)
    Wq: np.ndarray  # (d_out, n)
    Q: np.ndarray  # (d_out, n)
    group: np.ndarray  # (n,) index into scales
    scales: np.ndarray  # (d_out, n_groups)
    hinv_diag: np.ndarray  # (n,) U[p, p]
    losses: np.ndarray  # (n,) OBS loss of each step
    running: np.ndarray  # (n,) running OBS loss, GPTQ
    running_rtn: np.ndarray  # (n,) the same for RTN
    diag_h: np.ndarray  # (n,) undamped diag(H), processing order
    group_starts: np.ndarray  # positions where a new group starts
    block_starts: np.ndarray  # positions where a lazy-update block starts
    summary: dict
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    P: np.ndarray | None = None  # (n, n) GPTAQ's alpha triu_1(dXXT U^T) U, processing order
    R: np.ndarray | None = None  # (n, n) the rotation: the arrays above are in the basis W R^T
    diag_h_orig: np.ndarray | None = None  # (n,) undamped diag(H) of the original inputs, original order

    @property
    def n(self) -> int:
        return self.W0.shape[1]

    @property
    def d_out(self) -> int:
        return self.W0.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.W0, self.U, self.Err, self.Wq, self.Q, self.P, self.R)
                   if a is not None)

    @property
    def curve_gptq(self) -> np.ndarray:
        """Calibration output MSE per element of the layer after each step (GPTQ)."""
        return self.running / self.d_out

    @property
    def curve_rtn(self) -> np.ndarray:
        return self.running_rtn / self.d_out

    def state(self, k: int, cols: slice | None = None) -> np.ndarray:
        """The engine's working weights after step k (every column in processing order: quantized columns
        keep the value they had when quantized, later ones carry every update so far)."""
        cols = cols or slice(0, self.n)
        idx = np.arange(self.n)[cols]
        out = np.empty((self.d_out, idx.size))
        done = idx <= k
        out[:, done] = self.Wq[:, idx[done]]
        rest = idx[~done]
        if rest.size:
            out[:, ~done] = self.pending(slice(None), k, rest)
        return out

    def pending(self, r, k: int, cols) -> np.ndarray:
        """Rows r of the not-yet-quantized columns `cols` (all > k) after step k."""
        out = self.W0[r][:, cols] - self.Err[r, : k + 1] @ self.U[: k + 1, cols]
        if self.P is not None:  # GPTAQ: every step also added w_p (x) P[p, later]
            out += self.Wq[r, : k + 1] @ self.P[: k + 1, cols]
        return out

    def update(self, r, k: int, cols) -> tuple[np.ndarray, np.ndarray | None]:
        """(total update step k applied to rows r of the later columns `cols`, GPTAQ's part of it or None)."""
        obs = -np.outer(self.Err[r, k], self.U[k, cols])
        if self.P is None:
            return obs, None
        correction = np.outer(self.Wq[r, k], self.P[k, cols])
        return obs + correction, correction

    def next_boundary(self, k: int, kind: str) -> int:
        starts = self.group_starts if kind == "group" else self.block_starts
        later = starts[starts > k]
        return int(later[0]) if later.size else self.n - 1

    def block_of(self, k: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.block_starts, k, side="right")) - 1
        end = int(self.block_starts[i + 1]) if i + 1 < self.block_starts.size else self.n
        return int(self.block_starts[i]), end


def _gram(D: np.ndarray) -> np.ndarray:
    """D^T D, its upper triangle only (the rest 0): BLAS syrk, half a matmul's work."""
    D = np.asarray(D, dtype=np.float64)
    return blas.dsyrk(1.0, D, trans=1) if D.flags.f_contiguous else blas.dsyrk(1.0, D.T, trans=0)


def _weighted_columns(G: np.ndarray, H: np.ndarray) -> np.ndarray:
    """c[j] = sum_{i<=j} (2 - [i == j]) G_ij H_ij for G from _gram, so that
    sum_{i,j<=k} (D^T D)_ij H_ij = cumsum(c)[k]."""
    M = G * H
    return 2.0 * M.sum(axis=0) - np.diag(M)


def _running_loss(G: np.ndarray, H: np.ndarray) -> np.ndarray:
    """r[k] = 1/2 sum_{i,j<=k} (D^T D)_ij H_ij (G = _gram(D)): the loss of a layer whose first k+1 columns
    carry D."""
    return 0.5 * np.cumsum(_weighted_columns(G, H))


def _heldout_mse(G: np.ndarray, H_heldout: np.ndarray, d_out: int) -> float:
    """metrics.layer_error.output_mse_from_hessian from G = _gram(W - Q): tr(D H D^T) / (2 d_out)."""
    return float(_weighted_columns(G, H_heldout).sum()) / (2.0 * d_out)


# RTN's side of a run (rounding, its running loss, its held-out error: BLAS and whole-array NumPy, which
# release the GIL) runs beside the stepper's column loop (Python-bound): a faster control change. So does
# GPTAQ's comparison, plain GPTQ on the same inputs.
_RTN_SIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-run-rtn")


def _errors(data: LayerData, Q: np.ndarray, key: str, G: np.ndarray | None = None) -> dict:
    """The held-out output MSE of Q (and, with the full-precision stream, its distance from the
    full-precision model's output) and its weight MSE, named for `key` ("gptq", "rtn", "gptq0").
    G: _gram(W - Q) where the caller has it."""
    D = data.W - Q
    G = _gram(D) if G is None else G
    out = {f"weight_mse_{key}": float(np.mean(D**2)),
           f"heldout_mse_{key}": _heldout_mse(G, data.H_heldout, D.shape[0])}
    if data.has_fp:
        out[f"heldout_fp_mse_{key}"] = data.heldout_fp_mse(Q)
    return out


def _rtn_side(data: LayerData, cfg: QuantConfig, perm: np.ndarray, H: np.ndarray, R: np.ndarray | None):
    W = data.W
    rtn = rtn_quantize(W, cfg)
    G = _gram(W - rtn.weight)  # one Gram matrix for the curve and the held-out error
    Gp = G if R is None else _gram((W - rtn.weight) @ R.T)  # the curve in the stepper's (rotated) basis
    if not np.array_equal(perm, np.arange(perm.size)):  # ... and order, like GPTQ's
        Gp = np.triu((Gp + np.triu(Gp, 1).T)[np.ix_(perm, perm)])
    return _running_loss(Gp, H), _errors(data, rtn.weight, "rtn", G)


def _plain_gptq_side(data: LayerData, cfg: QuantConfig) -> dict:
    res = gptq_quantize(data.W, data.H, cfg.replace(gptaq_alpha=0.0))
    return {**_errors(data, res.weight, "gptq0"), "loss_gptq0": res.loss}


# The run uses the compiled column step (engine.column_kernel, numba) only where something else has loaded it
# (record_columns' default): in a kernel, loading it (numba's import and compiled code, about a second of
# CPU) made a visitor's first change 0.5-0.7 s instead of 0.13 s, for a run only about 8 ms faster
# (docs/performance.md, "The app in a browser").


def compute_run(data: LayerData, cfg: QuantConfig) -> Run:
    """Run GPTQ (the engine's stepper, every column recorded) and RTN on one layer, with the summary.
    GPTAQ needs data with the full-precision stream (source.load_pair()), and then also runs plain GPTQ
    on the same inputs, for the summary."""
    t0 = time.perf_counter()
    W = data.W
    gptaq = cfg.gptaq_alpha > 0
    if gptaq and not data.has_fp:
        raise ValueError("GPTAQ needs the full-precision model's inputs too: load the layer with load_pair()")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # prepares the layer as the stepper does: rotation, permutation, damped H, U (and GPTAQ's P)
        prep = prepare_layer(W, data.H, cfg, dXXT=data.dXXT if gptaq else None)
        rtn_side = _RTN_SIDE.submit(_rtn_side, data, cfg, prep.perm, prep.H, prep.rotation)
        plain_side = _RTN_SIDE.submit(_plain_gptq_side, data, cfg) if gptaq else None
        # the stepper's column loop, every step's arrays kept (the steps' error, weight, quantized, group)
        result, Err, Wq, Q, group, losses = record_columns(prep, cfg)
    perm, R = prep.perm, prep.rotation
    n = W.shape[1]
    hinv_diag = np.diag(prep.U).copy()
    running = np.cumsum(losses)  # in step order, as the stepper adds them up

    group_starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    block_starts = np.array([a for a, _ in block_bounds(n, cfg)], dtype=np.int64)  # the engine's blocks

    diag_orig = np.diag(data.H)
    # diag(R H R^T) without forming it: row i of R H dotted with row i of R
    diag = diag_orig if R is None else np.einsum("ij,ij->i", R @ data.H, R)
    running_rtn, rtn_errors = rtn_side.result()
    summary = {
        **_errors(data, result.weight, "gptq"), **rtn_errors,
        "loss_gptq": result.loss,
        "loss_rtn": float(running_rtn[-1]),
        "calib_tokens": int(data.X_calib.shape[0]),
        "heldout_tokens": int(data.X_heldout.shape[0]),
        "damp_percent_used": prep.damp_percent_used,
    }
    mse_g, mse_r = summary["heldout_mse_gptq"], summary["heldout_mse_rtn"]
    summary["heldout_ratio"] = mse_r / mse_g if mse_g > 0 else float("inf")
    if plain_side is not None:
        summary.update(plain_side.result())
    return Run(
        cfg=cfg, name=data.name, perm=perm, W0=prep.W, U=prep.U, Err=Err, Wq=Wq, Q=Q, group=group,
        scales=np.asarray(result.scales), hinv_diag=hinv_diag, losses=losses, running=running,
        running_rtn=running_rtn, diag_h=diag[perm].copy(), group_starts=group_starts,
        block_starts=block_starts, summary=summary, warnings=[str(w.message) for w in caught],
        seconds=time.perf_counter() - t0, P=prep.P, R=R, diag_h_orig=None if R is None else diag_orig.copy(),
    )


@dataclass
class Window:
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.r0, self.r1)

    @property
    def cols(self) -> np.ndarray:
        return np.arange(self.c0, self.c1)


def window(run: Run, k: int, rows: int, cols: int, row0: int) -> Window:
    """The crop: `rows` rows from row0 and `cols` columns around the cursor k (clipped to the layer).

    The column window turns pages rather than scrolling: pages start every cols - 2*margin columns, so k
    is always at least `margin` columns from an edge (except at the layer's ends), and the window stays
    still for most frames: easier to watch, and its coordinates need not be re-sent. It depends on k
    alone, so a link reproduces it."""
    rows, cols = min(rows, run.d_out), min(cols, run.n)
    r0 = int(np.clip(row0, 0, run.d_out - rows))
    margin = cols // 8
    step = max(cols - 2 * margin, 1)
    c0 = int(np.clip((k - margin) // step * step, 0, run.n - cols))
    return Window(r0, r0 + rows, c0, c0 + cols)


BASES = ("rotated", "original")  # the views of a rotated run: the stepper's basis, or back in the original


def frame(run: Run, k: int, win: Window, basis: str = "rotated") -> dict[str, np.ndarray]:
    """The heatmaps of step k on the crop (processing order), NaN where a view has no value yet.

    W            the original weights
    updated      the engine's working weights after step k (see Run.state)
    Q            quantized columns (0..k)
    error        w - q of the quantized columns (what the updates compensate)
    compensation the update step k applied to the later columns: -e_k U[k, j] (GPTAQ: + w_k P[k, j])
    correction   (GPTAQ only) its part of that update, w_k P[k, j]
    A rotated run's views in the original basis: frame_original.
    """
    if run.R is not None and basis == "original":
        return frame_original(run, k, win)
    r, c = slice(win.r0, win.r1), slice(win.c0, win.c1)
    ncols = win.c1 - win.c0
    split = int(np.clip(k + 1 - win.c0, 0, ncols))  # crop columns [0, split) are quantized
    a = win.c0 + split  # first not-yet-quantized column of the crop
    nan = np.full((win.r1 - win.r0, ncols), np.nan)
    updated = np.empty_like(nan)
    updated[:, :split] = run.Wq[r, win.c0:a]
    Q, error, comp, correction = nan.copy(), nan.copy(), nan.copy(), nan
    Q[:, :split] = run.Q[r, win.c0:a]
    error[:, :split] = run.Wq[r, win.c0:a] - run.Q[r, win.c0:a]
    if a < win.c1:
        later = slice(a, win.c1)
        updated[:, split:] = run.pending(r, k, later)
        total, part = run.update(r, k, later)
        comp[:, split:] = total
        if part is not None:
            correction = nan.copy()
            correction[:, split:] = part
    views = {"W": run.W0[r, c], "updated": updated, "Q": Q, "error": error, "compensation": comp}
    if run.P is not None:
        views["correction"] = correction
    return views


def frame_original(run: Run, k: int, win: Window) -> dict[str, np.ndarray]:
    """A rotated run's views at step k in the original basis: each view's rows (every position; a value a
    view does not have yet counts as 0) times R, so crop column j is original input j. W is then the
    original W, and `error` (the rounding errors so far) is spread over every original column at once:
    what rotating does to the error. `updated` is the layer after step k (the quantized columns as Q, the
    rest as updated), so at the last step it is the engine's result."""
    r = slice(win.r0, win.r1)
    n, rows = run.n, win.r1 - win.r0
    done, later = slice(0, k + 1), slice(k + 1, n)
    to_original = run.R[run.perm, win.c0:win.c1]  # processing position -> original column

    def full(quantized=None, rest=None) -> np.ndarray:
        out = np.zeros((rows, n))
        if quantized is not None:
            out[:, done] = quantized
        if rest is not None and k + 1 < n:
            out[:, later] = rest
        return out @ to_original

    total, part = run.update(r, k, later)
    views = {
        "W": run.W0[r] @ to_original,
        "updated": full(run.Q[r, done], run.pending(r, k, later) if k + 1 < n else None),
        "Q": full(run.Q[r, done]),
        "error": full(run.Wq[r, done] - run.Q[r, done]),
        "compensation": full(rest=total),
    }
    if part is not None:
        views["correction"] = full(rest=part)
    return views
