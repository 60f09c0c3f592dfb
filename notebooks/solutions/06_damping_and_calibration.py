"""Lesson 6, solved: the exercises `hessian` and `damp_hessian`."""

import numpy as np


def hessian(X):
    """H (d_in, d_in) = 2/n X^T X over the n tokens of X."""
    X = X.reshape(-1, X.shape[-1])
    return 2 / X.shape[0] * X.T @ X


def damp_hessian(H, damp_percent):
    """H + lambda I, lambda = damp_percent * mean(diag H)."""
    lam = damp_percent * np.mean(np.diag(H))
    return H + lam * np.eye(len(H))
