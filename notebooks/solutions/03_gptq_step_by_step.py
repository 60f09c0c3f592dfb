"""Lesson 3, solved: the exercise `gptq_loop`."""

import numpy as np


def gptq_loop(W, H, bits):
    """GPTQ on W (rows, cols) with the Hessian H: returns Q, de-quantized."""
    W = np.array(W, dtype=float)  # a copy: the loop changes it
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)
    amax = np.abs(W).max(axis=1)
    scale = 2 * np.where(amax > 0, amax, 1.0) / maxq  # one symmetric scale per row, from W before the loop
    Q = np.zeros_like(W)
    n = W.shape[1]
    H = H + 0.01 * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular, H^-1 = U^T U
    for q in range(n):
        codes = np.clip(np.round(W[:, q] / scale) + zero, 0, maxq)
        Q[:, q] = scale * (codes - zero)
        err = (W[:, q] - Q[:, q]) / U[q, q]
        W[:, q + 1 :] -= np.outer(err, U[q, q + 1 :])
    return Q
