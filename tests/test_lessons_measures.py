"""gptq_explorer.lessons.measures: the relative errors every lesson quotes, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq_explorer import QuantConfig, rtn_quantize
from gptq_explorer.lessons import measures as L
from gptq_explorer.services.layer_source import SyntheticSource


@pytest.fixture(scope="module")
def small():
    return SyntheticSource(d_out=24, d_in=48, n_calib=512, n_heldout=256, seed=1, rank=12).load()


def test_relative_errors_match_direct_computation(small):
    W = np.asarray(small.W)
    Q = rtn_quantize(W, QuantConfig(group_size=16)).weight
    X = np.asarray(small.X_calib, dtype=np.float64)
    direct = np.linalg.norm(X @ (W - Q).T) / np.linalg.norm(X @ W.T)
    assert L.output_rel_error(W, Q, small.H) == pytest.approx(direct, rel=1e-10)
    assert L.rel_error(Q, W) == pytest.approx(np.linalg.norm(W - Q) / np.linalg.norm(W))
    assert L.rel_error(torch.tensor(Q), torch.tensor(W)) == pytest.approx(L.rel_error(Q, W))
