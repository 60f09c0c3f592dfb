"""The configuration grid the engine's equivalence tests share (as QuantConfig keywords): the NumPy and torch
paths, the compiled and NumPy column step, and the Layer Lab's recorded loop must agree on every one
(tests/test_engine_kernel.py and tests/test_engine_methods.py). Plain GPTQ first, then the methods beyond
the paper; each label is unique, so it is the test id."""

from __future__ import annotations

import numpy as np

from gptq_explorer.engine import Hessian, QuantConfig

CONFIGS = [
    # plain GPTQ
    dict(),
    dict(bits=3, sym=False, group_size=32, desc_act=True),
    dict(static_groups=True, desc_act=True, group_size=32),
    dict(bits=8, group_size=-1),
    dict(group_size=64, block_size=16),  # a group wider than a block
    dict(group_size=40, block_size=32),  # groups and blocks that do not align
    # MSE grid
    dict(mse_norm=2.4),
    dict(mse_norm=2.4, sym=False, group_size=-1),
    dict(mse_norm=2.0, bits=3, group_size=32, desc_act=True),
    # GAR
    dict(group_size=32, group_aware=True),
    dict(group_size=40, group_aware=True),  # a short last group
    # ternary
    dict(ternary=True),
    dict(ternary=True, sym=False, group_size=32),
    # GPTAQ
    dict(gptaq_alpha=0.25, group_size=32),
    dict(gptaq_alpha=1.0, group_size=-1, desc_act=True),
    dict(gptaq_alpha=0.5, group_size=64, block_size=16),  # a group wider than a block
    dict(gptaq_alpha=0.5, static_groups=True, desc_act=True, group_size=32),
    # Hadamard rotation, and methods together
    dict(rotation="hadamard"),
    dict(rotation="hadamard", rotation_seed=3, gptaq_alpha=0.25, group_size=32, mse_norm=2.4),
    dict(gptaq_alpha=0.3, group_size=40, group_aware=True, block_size=8),
]
IDS = [QuantConfig(**kw).label() for kw in CONFIGS]
assert len(set(IDS)) == len(IDS), "two configurations with one label: their test ids would clash"


def correlated_layer(d_in: int = 96):
    """W (40, d_in) and the Hessian of correlated inputs with an outlier channel (index 3), with GPTAQ's
    statistic: X_fp differs from X by a few %. Returns W, h, X, X_fp."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(d_in, d_in))
    A[:, 3] *= 8
    X = rng.normal(size=(3000, d_in)) @ A
    X_fp = X + 0.03 * rng.normal(size=X.shape) @ A
    W = rng.normal(size=(40, d_in))
    return W, Hessian(d_in).add_batch(X, X_fp=X_fp), X, X_fp
