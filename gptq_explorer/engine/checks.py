"""Input checks shared by the NumPy and torch engines, so both fail the same way on bad input."""

from __future__ import annotations

import warnings

from .config import MAX_DAMP_PERCENT


def check_shapes(w_shape: tuple, h_shape: tuple | None) -> None:
    if len(w_shape) != 2:
        raise ValueError(
            f"W must be 2-D (d_out, d_in), the nn.Linear.weight layout; got shape {tuple(w_shape)}"
        )
    if 0 in w_shape:
        raise ValueError(f"W must not be empty; got shape {tuple(w_shape)}")
    if h_shape is None:
        return
    d_in = w_shape[1]
    if tuple(h_shape) != (d_in, d_in):
        raise ValueError(
            f"H must be (d_in, d_in) = ({d_in}, {d_in}) to match W of shape {tuple(w_shape)}; "
            f"got {tuple(h_shape)}. W uses the nn.Linear layout (d_out, d_in): transpose a Conv1D weight."
        )


def check_gptaq(cfg, dxxt_shape: tuple | None, h_shape: tuple) -> None:
    """GPTAQ needs dXXT, shaped like H."""
    if cfg.gptaq_alpha <= 0:
        return
    if dxxt_shape is None:
        raise ValueError(
            f"GPTAQ (gptaq_alpha={cfg.gptaq_alpha:g}) needs dXXT, the full-precision inputs' statistic: "
            "build the Hessian with h.add_batch(X, X_fp=X_fp) and call gptq_quantize(W, h.H, cfg, "
            "dXXT=h.dXXT); or set "
            "gptaq_alpha=0 for plain GPTQ")
    if tuple(dxxt_shape) != tuple(h_shape):
        raise ValueError(f"dXXT must have the shape of H {tuple(h_shape)}; got {tuple(dxxt_shape)}")


# What to do about non-finite input, by what it is: weights come from a checkpoint, H from activations.
_FINITE_FIX = {
    "W": "The layer's weights are broken: reload the model in float32 (a half-precision overflow?) or "
         "re-download / re-export the checkpoint.",
    "H": "H comes from the calibration activations: one overflowed (common in float16). Run the "
         "calibration forward pass in float32, or drop the sample that produces it.",
    "dXXT": "dXXT comes from the calibration activations of both models: one overflowed (common in float16). "
            "Run the calibration forward passes in float32.",
}


def check_finite(name: str, all_finite: bool) -> None:
    if not all_finite:
        raise ValueError(
            f"{name} contains NaN or Inf; quantization needs finite values. "
            + _FINITE_FIX.get(name, "Check the model weights and calibration activations (fp16 overflow?).")
        )


def warn_all_dead(n_dead: int, n: int) -> None:
    """Every input was zero for every calibration token: GPTQ (like the reference) zeroes dead columns, so
    the whole layer would quantize to zero. Legal, but almost always a calibration mistake."""
    if n and n_dead == n:
        warnings.warn(
            f"all {n} inputs of this layer were zero in the calibration data (diag H == 0), so GPTQ sets "
            "every weight to 0. Calibrate with text that reaches this layer (check the data and the hooks).",
            RuntimeWarning,
            stacklevel=3,
        )


def max_asymmetry(H, panel: int = 256) -> float:
    """max |H - H^T| for a NumPy array or torch tensor, one row panel at a time: a whole-matrix H - H.T
    is a cache-hostile transpose plus an n x n temporary (slow for 4096^2 in float64)."""
    n = H.shape[0]
    return max(float(abs(H[a : a + panel] - H[:, a : a + panel].T).max()) for a in range(0, n, panel))


def check_symmetric(max_asymmetry: float, scale: float) -> None:
    # float32 accumulation of X^T X is symmetric up to rounding; anything larger is not a Hessian.
    if max_asymmetry > 1e-4 * max(scale, 1e-30):
        raise ValueError(
            f"H must be symmetric (a Hessian 2/n X^T X); max |H - H^T| = {max_asymmetry:.3g} "
            f"vs max |H| = {scale:.3g}. Build H with Hessian.add_batch or symmetrize it: (H + H.T) / 2."
        )


def damping_schedule(damp_percent: float):
    """damp_percent, then x10 each retry while it stays <= MAX_DAMP_PERCENT."""
    damp = damp_percent
    while damp <= MAX_DAMP_PERCENT * (1 + 1e-9):
        yield damp
        damp *= 10


def warn_damping(requested: float, used: float) -> None:
    if used != requested:
        warnings.warn(
            f"H + damping was not positive definite with damp_percent={requested:g}; "
            f"quantized with damp_percent={used:g} instead. More (or longer) calibration samples "
            f"usually fix this.",
            RuntimeWarning,
            stacklevel=3,
        )


def not_positive_definite(requested: float) -> ValueError:
    return ValueError(
        f"H is not positive definite even after raising damp_percent from {requested:g} to "
        f"{MAX_DAMP_PERCENT:g} (100% of mean diag H). H must be a valid Hessian 2/n X^T X: "
        f"check for NaN/Inf activations, or pass more calibration data."
    )
