"""What the layer Hessian looks like to GPTQ: its spectrum, the damping, dead inputs and the diag(H) spread.

    spec = hessian_spectrum(H, cfg)                  # the costly part: eigvalsh of the n x n H (and one
                                                     # Cholesky); depends on H, rotation and its seed only
    view = hessian_view(H, cfg, damp_used=0.01, spectrum=spec)   # a dict of numbers and arrays

It follows the engine's preparation (engine/gptq.py, prepare_layer) step by step, on the matrix the engine
factors:
  1. rotation (cfg.rotation): H' = R H R^T, the basis GPTQ works in. Its eigenvalues are those of H (R is
     orthogonal); its diagonal is not (the outlier channels are spread over every input);
  2. dead inputs, diag == 0 in that basis (an input that was zero for every calibration token): the engine
     sets their diagonal to 1 and their weights to 0. Each then adds the eigenvalue 1 to the spectrum;
  3. damping: lambda = damp_percent * mean(diag H) (after step 2) is added to the diagonal, which shifts
     every eigenvalue by lambda. If the Cholesky factorization of H + lambda I fails, the engine retries
     with damp_percent x10 (engine/checks.py damping_schedule: up to 100% of mean diag H) and warns.
The column order (desc_act, GAR) permutes H, which changes none of these numbers. desc_act orders the
columns by diag(H): the spread max/median of the live inputs' diag(H) says how much there is to order.

The condition number is lambda_max / lambda_min of the symmetric H (infinite when lambda_min <= 0: then H
is not positive definite and Cholesky fails without damping). Damping makes it
(lambda_max + lambda) / (lambda_min + lambda).
"""

from __future__ import annotations

import math

import numpy as np

from ..engine import QuantConfig
from ..engine.checks import damping_schedule
from ..engine.gptq import hinv_cholesky_upper, rotation_matrix

ROTATED_BASIS = "rotated: H' = R H Rᵀ, the basis GPTQ works in"
ORIGINAL_BASIS = "original inputs: H = 2/n XᵀX"


def working_hessian(H, cfg: QuantConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(the matrix the engine damps, its dead inputs (bool, that basis), R or None): H rotated when
    cfg.rotation is on, then every dead input's diagonal set to 1 (engine/gptq.py prepare_layer)."""
    Hw = np.array(H, dtype=np.float64, copy=True)
    if Hw.ndim != 2 or Hw.shape[0] != Hw.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {Hw.shape}")
    if not np.all(np.isfinite(Hw)):
        raise ValueError("H contains NaN or Inf: the Hessian needs finite calibration inputs")
    R = None
    if cfg.rotation:
        R = rotation_matrix(Hw.shape[0], cfg)
        Hw = R @ Hw @ R.T
        Hw = (Hw + Hw.T) / 2  # exactly symmetric again, as the engine does
    dead = np.diag(Hw) == 0
    Hw[dead, dead] = 1.0
    return Hw, dead, R


def _cholesky_ok(H: np.ndarray) -> bool:
    try:
        hinv_cholesky_upper(H)  # the engine's own factorization
        return True
    except np.linalg.LinAlgError:
        return False


def hessian_spectrum(H, cfg: QuantConfig) -> dict:
    """The part of the view that does not depend on the damping: {eigenvalues (descending) of the matrix the
    engine damps, diag (that basis, before the dead-input fix), dead (bool), diag_original (H's own, only
    when rotated), mean_diag (after the fix: lambda's unit), cholesky_undamped (whether the engine's
    Cholesky succeeds on it without damping), rotated}."""
    Hw, dead, R = working_hessian(H, cfg)
    diag = np.diag(Hw).copy()
    diag[dead] = 0.0
    return {
        "eigenvalues": np.linalg.eigvalsh(Hw)[::-1].copy(),
        "diag": diag,
        "dead": dead,
        "diag_original": None if R is None else np.diag(np.asarray(H, dtype=np.float64)).copy(),
        "mean_diag": float(np.mean(np.diag(Hw))),
        "cholesky_undamped": _cholesky_ok(Hw),
        "rotated": R is not None,
    }


def predicted_damping(H, cfg: QuantConfig) -> float | None:
    """The damp_percent the engine's schedule ends with on H (None: every try fails, the engine raises),
    tried in column order; the engine factors H in its processing order, which can differ in the last
    digits, so prefer the damping the engine reports (QuantResult.damp_percent_used)."""
    Hw, _, _ = working_hessian(H, cfg)
    mean_diag = float(np.mean(np.diag(Hw)))
    eye = np.eye(Hw.shape[0])
    for damp in damping_schedule(cfg.damp_percent):
        if _cholesky_ok(Hw + damp * mean_diag * eye):
            return damp
    return None


def condition(eigenvalues: np.ndarray, shift: float = 0.0) -> float:
    """(lambda_max + shift) / (lambda_min + shift) of a symmetric matrix's eigenvalues; inf when the
    smallest is not positive (the matrix is not positive definite)."""
    lo, hi = float(np.min(eigenvalues)) + shift, float(np.max(eigenvalues)) + shift
    return hi / lo if lo > 0 else math.inf


def spread(diag: np.ndarray, live: np.ndarray) -> float:
    """max / median of the live inputs' diag(H) (inf when the median is 0, nan when no input is live)."""
    d = np.asarray(diag, dtype=np.float64)[live]
    if d.size == 0:
        return math.nan
    med = float(np.median(d))
    return float(d.max()) / med if med > 0 else math.inf


def hessian_view(H, cfg: QuantConfig, *, damp_used: float | None = None,
                 spectrum: dict | None = None) -> dict:
    """Everything the Hessian view shows, as numbers and arrays (see the module doc). `damp_used`: the
    damp_percent the engine reports it used (QuantResult.damp_percent_used, Run.summary); None: predicted
    here (predicted_damping). `spectrum`: hessian_spectrum(H, cfg), when it is already known.

    Keys: n, rotated, basis; eigenvalues, eigenvalues_damped (descending, + lambda_used); diag (the working
    basis), diag_sorted (descending: desc_act's order); dead (indices), n_dead, dead_original (indices in
    the original inputs, when rotated; else the same); mean_diag; damp_percent, lam (what was asked),
    damp_used, lam_used, retries (x10 steps the engine took), damp_reported (damp_used came from the
    engine); failed (no damping in the schedule made H positive definite); lambda_max, lambda_min,
    n_nonpositive, n_zero (zero up to rounding: the rank deficit), n_below_lambda (eigenvalues < lambda_used:
    the directions damping dominates); cond, cond_asked (at lam), cond_damped (at lam_used);
    cholesky_undamped; diag_spread, diag_spread_original."""
    spec = spectrum if spectrum is not None else hessian_spectrum(H, cfg)
    eig, diag, dead = spec["eigenvalues"], spec["diag"], spec["dead"]
    n = int(eig.size)
    mean_diag = spec["mean_diag"]
    reported = damp_used is not None
    if not reported:
        damp_used = predicted_damping(H, cfg)
    failed = damp_used is None
    used = cfg.damp_percent if failed else float(damp_used)
    retries = max(int(round(math.log10(used / cfg.damp_percent))), 0)
    lam, lam_used = cfg.damp_percent * mean_diag, used * mean_diag
    dead_idx = np.flatnonzero(dead)
    if spec["rotated"]:
        dead_original = np.flatnonzero(spec["diag_original"] == 0)
        spread_original = spread(spec["diag_original"], spec["diag_original"] != 0)
    else:
        dead_original, spread_original = dead_idx, None
    return {
        "n": n,
        "rotated": spec["rotated"],
        "basis": ROTATED_BASIS if spec["rotated"] else ORIGINAL_BASIS,
        "eigenvalues": eig,
        "eigenvalues_damped": eig + lam_used,
        "diag": diag,
        "diag_sorted": np.sort(diag)[::-1],
        "dead": dead_idx,
        "n_dead": int(dead_idx.size),
        "dead_original": dead_original,
        "mean_diag": mean_diag,
        "damp_percent": cfg.damp_percent,
        "lam": lam,
        "damp_used": used,
        "lam_used": lam_used,
        "retries": retries,
        "damp_reported": reported,
        "failed": failed,
        "lambda_max": float(eig.max()),
        "lambda_min": float(eig.min()),
        "n_nonpositive": int(np.sum(eig <= 0)),
        # zero up to rounding (eigvalsh's error is about n * eps * lambda_max): H's rank deficit
        "n_zero": int(np.sum(eig <= n * np.finfo(np.float64).eps * max(float(eig.max()), 0.0))),
        "n_below_lambda": int(np.sum(eig < lam_used)),
        "cond": condition(eig),
        "cond_asked": condition(eig, lam),
        "cond_damped": condition(eig, lam_used),
        "cholesky_undamped": spec["cholesky_undamped"],
        "diag_spread": spread(diag, ~dead),
        "diag_spread_original": spread_original,
    }
