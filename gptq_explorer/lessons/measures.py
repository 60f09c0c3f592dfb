"""The measures every lesson uses: relative errors of weights and of a layer's output, the inputs' Hessian,
and the geometric mean of an error over table rows.

Output errors are relative output errors ||X (W - Q)^T|| / ||X W^T|| from the inputs' Hessian
H = 2/n X^T X: "held-out" uses text that calibration never saw (the evaluation part of a corpus).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..engine.hessian import Hessian


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius), for NumPy arrays or torch tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).norm() / b.norm())
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def output_rel_error(W, Q, H) -> float:
    """Relative output error ||X (W - Q)^T|| / ||X W^T|| from the inputs' Hessian H = 2/n X^T X."""
    W, Q, H = (np.asarray(a, dtype=np.float64) for a in (W, Q, H))
    D = W - Q
    return float(math.sqrt(np.sum((D @ H) * D) / np.sum((W @ H) * W)))


def errors(W, Q, H_calib, H_heldout) -> dict:
    """Table columns: the output error on the calibration Hessian and on the held-out one."""
    return {"calibration error": output_rel_error(W, Q, H_calib),
            "held-out error": output_rel_error(W, Q, H_heldout)}


def hessian_from(X) -> np.ndarray:
    """H = 2/n X^T X of activations X (tokens, d_in), as the engine accumulates it."""
    X = np.asarray(X)
    return Hessian(X.shape[1]).add_batch(X).H


def mean_error(rows: list[dict], key: str = "held-out error", **match) -> float:
    """Geometric mean of `key` over the rows (layers) that match, e.g. method="GPTQ", bits=3, group=128."""
    vals = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    if not vals:
        raise KeyError(f"no rows match {match}")
    return float(np.exp(np.mean(np.log(vals))))
