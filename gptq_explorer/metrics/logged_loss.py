"""What the "loss" a GPTQ run logs means, and how to turn it into the layer's relative output error.

Every GPTQ loop adds up the same per-column OBS losses, (w - q)^2 / (2 U_qq^2), with U the upper Cholesky
factor of (H + lambda I)^-1 and w the column's error-compensated value. Because each column's error is
carried to the later columns exactly, their sum over a layer is not an estimate: it equals

    L = 1/2 tr(dW (H + lambda I) dW^T),   dW = W - Q,   lambda = damp_percent * mean(diag H).

What the tools differ in is the scale of H and what they divide the sum by (n_tok calibration tokens,
n_seq calibration sequences):

    by            H                      logged
    "explorer"    2/n_tok sum_t x x^T    L                 (QuantResult.loss, the Layer Lab's "OBS loss")
    "gptqmodel"   2/n_tok sum_t x x^T    L / n_tok         (GPTQModel 7.6 `avg_loss`, its "loss" column)
    "paper"       2/n_seq sum_t x x^T    L * n_tok / n_seq (the reference code's printed `error`)

With H per token, L = ||X dW^T||^2 / n_tok + lambda/2 ||dW||^2 and ||X W^T||^2 = n_tok/2 tr(W H W^T), so

    ||X W^T - X Q^T||^2 / ||X W^T||^2 = (L - lambda/2 ||dW||^2) / (1/2 tr(W H W^T)).

The damping term needs dW; without it, 2 L / tr(W H W^T) is an upper bound. None of this holds for GPTAQ,
whose loop also pulls towards the full-precision model's output. NumPy only (float64).
"""

from __future__ import annotations

import numpy as np

LOGGERS = ("explorer", "gptqmodel", "paper")


def _as_looped(W, Q, H) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W, Q and H as the GPTQ loop sees them: a dead input (diag 0) gets diag 1 and weight 0, as the paper's
    code and this engine do before damping. Its input is always 0, so no output changes; only the mean of
    the diagonal (the damping) sees the 1."""
    W, Q, H = (np.array(a, dtype=np.float64) for a in (W, Q, H))
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, Q, H


def damping(H, damp_percent: float) -> float:
    """lambda = damp_percent * mean(diag H) (after the dead-input fix)."""
    d = np.diag(np.asarray(H, dtype=np.float64))
    return float(damp_percent) * float(np.mean(np.where(d == 0, 1.0, d)))


def obs_loss(W, Q, H, damp_percent: float) -> float:
    """L = 1/2 tr(dW (H + lambda I) dW^T): the sum of a GPTQ run's per-column losses, in the units of H.
    Pass the damping the run used (QuantResult.damp_percent_used: a run that had to raise it says so)."""
    W, Q, H = _as_looped(W, Q, H)
    D = W - Q
    return 0.5 * (float(((D @ H) * D).sum()) + damping(H, damp_percent) * float((D * D).sum()))


def _to_explorer(logged: float, by: str, n_tokens: int, n_sequences: int | None) -> float:
    if by == "explorer":
        return float(logged)
    if by == "gptqmodel":
        return float(logged) * n_tokens
    if by == "paper":
        if not n_sequences:
            raise ValueError("by='paper' needs n_sequences: the reference code's H divides by sequences")
        return float(logged) * n_sequences / n_tokens
    raise ValueError(f"by must be one of {list(LOGGERS)}, got {by!r}")


def logged_loss(W, Q, H, damp_percent: float, *, n_tokens: int, by: str = "gptqmodel",
                n_sequences: int | None = None) -> float:
    """What `by` would log for this layer: H is this engine's (2/n_tok sum x x^T over n_tokens tokens)."""
    L = obs_loss(W, Q, H, damp_percent)
    return L / _to_explorer(1.0, by, n_tokens, n_sequences)


def relative_error_from_logged(logged: float, W, Q, H, damp_percent: float, *, n_tokens: int,
                               by: str = "gptqmodel", n_sequences: int | None = None) -> float:
    """||X W^T - X Q^T||^2 / ||X W^T||^2 on the calibration tokens, from the loss `by` logged.

    W, Q: (out, in) original and quantized weights; H: this engine's Hessian of the same tokens
    (2/n_tok sum x x^T; hessian.Hessian builds it), undamped; damp_percent: the damping the run used."""
    W, Q, H = _as_looped(W, Q, H)
    L = _to_explorer(logged, by, n_tokens, n_sequences)
    D = W - Q
    output_part = L - 0.5 * damping(H, damp_percent) * float((D * D).sum())
    signal = 0.5 * float(((W @ H) * W).sum())
    return output_part / signal if signal > 0 else 0.0
