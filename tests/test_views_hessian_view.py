"""views.hessian_view: the numbers of the Layer Lab's Hessian view, on Hessians whose answers are known, and
checked against what the engine itself does with them (gptq_quantize's damp_percent_used, dead columns)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gptq_explorer.engine import QuantConfig, gptq_quantize
from gptq_explorer.views.hessian_view import (
    ORIGINAL_BASIS,
    ROTATED_BASIS,
    condition,
    hessian_spectrum,
    hessian_view,
    predicted_damping,
    spread,
)


def with_eigenvalues(values, seed: int = 0) -> np.ndarray:
    """Q diag(values) Q^T for a random orthogonal Q: a symmetric matrix with exactly these eigenvalues."""
    n = len(values)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    H = Q @ np.diag(values) @ Q.T
    return (H + H.T) / 2


def embed_dead(H: np.ndarray, dead: list[int]) -> np.ndarray:
    """H with zero rows and columns inserted at the `dead` positions (inputs zero for every token)."""
    n = H.shape[0] + len(dead)
    live = [i for i in range(n) if i not in dead]
    out = np.zeros((n, n))
    out[np.ix_(live, live)] = H
    return out


def engine_run(H: np.ndarray, cfg: QuantConfig):
    W = np.random.default_rng(1).standard_normal((8, H.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the x10 retry warns; asserted through its number
        return gptq_quantize(W, H, cfg)


def test_dead_inputs_and_the_condition_number_of_a_known_hessian():
    """Eigenvalues 100, 10, 1, 1e-3 and two dead inputs (2 and 5): the engine gives each dead input a diagonal
    of 1, so the matrix it damps has eigenvalues 100, 10, 1, 1, 1, 1e-3, condition number 1e5; lambda is
    damp_percent x the mean of that diagonal, and shifts every eigenvalue."""
    H = embed_dead(with_eigenvalues([100.0, 10.0, 1.0, 1e-3]), [2, 5])
    cfg = QuantConfig(damp_percent=0.01, group_size=-1)
    v = hessian_view(H, cfg)
    np.testing.assert_allclose(v["eigenvalues"], [100, 10, 1, 1, 1, 1e-3], rtol=1e-9, atol=1e-12)
    assert v["n"] == 6 and v["n_dead"] == 2
    assert list(v["dead"]) == [2, 5] and list(v["dead_original"]) == [2, 5]
    assert v["cond"] == pytest.approx(1e5, rel=1e-6)
    mean_diag = (100 + 10 + 1 + 1e-3 + 2) / 6  # the trace is the sum of the eigenvalues
    assert v["mean_diag"] == pytest.approx(mean_diag)
    lam = 0.01 * mean_diag
    assert v["lam"] == v["lam_used"] == pytest.approx(lam)
    assert v["cond_damped"] == pytest.approx((100 + lam) / (1e-3 + lam), rel=1e-6)
    np.testing.assert_allclose(v["eigenvalues_damped"], v["eigenvalues"] + lam)
    assert v["cholesky_undamped"] and v["retries"] == 0 and not v["failed"] and v["n_nonpositive"] == 0
    assert v["n_below_lambda"] == 1  # only 1e-3 is below lambda = 0.19
    assert v["basis"] == ORIGINAL_BASIS and v["diag_spread_original"] is None
    # what the engine did with the same H
    res = engine_run(H, cfg)
    assert res.damp_percent_used == v["damp_used"] == 0.01
    assert list(np.flatnonzero(np.asarray(res.dead_columns))) == [2, 5]


def test_a_singular_hessian_needs_the_x10_retry():
    """Eigenvalues 1, 1, 1, -0.05 (not positive definite, as rounding can leave a rank-deficient H): mean
    diag 0.7375, so 1% damping (lambda 0.0074) is not enough and 10% (0.074) is. The engine retries x10 once;
    the view predicts it, and reports what the engine says."""
    H = with_eigenvalues([1.0, 1.0, 1.0, -0.05], seed=3)
    cfg = QuantConfig(damp_percent=0.01, group_size=-1)
    assert predicted_damping(H, cfg) == pytest.approx(0.1)
    res = engine_run(H, cfg)
    assert res.damp_percent_used == pytest.approx(0.1)
    for damp_used in (None, res.damp_percent_used):
        v = hessian_view(H, cfg, damp_used=damp_used)
        assert v["damp_reported"] == (damp_used is not None)
        assert v["damp_used"] == pytest.approx(0.1) and v["retries"] == 1 and not v["failed"]
        assert v["mean_diag"] == pytest.approx(0.7375)
        assert not v["cholesky_undamped"] and v["n_nonpositive"] == 1
        assert v["cond"] == math.inf and v["cond_asked"] == math.inf  # -0.05 + 0.0074 < 0
        assert v["cond_damped"] == pytest.approx((1 + 0.07375) / (-0.05 + 0.07375), rel=1e-6)
        assert v["lam_used"] == pytest.approx(0.07375)


def test_no_damping_helps_an_indefinite_matrix():
    """A very negative eigenvalue: even 100% of mean diag H fails, as the engine does (it raises)."""
    H = with_eigenvalues([1.0, 1.0, -5.0], seed=4)
    cfg = QuantConfig(damp_percent=0.01, group_size=-1)
    assert predicted_damping(H, cfg) is None
    v = hessian_view(H, cfg)
    assert v["failed"] and v["damp_used"] == 0.01 and v["retries"] == 0
    with pytest.raises(ValueError, match="not positive definite"):
        engine_run(H, cfg)


def test_the_diag_spread_is_over_the_live_inputs():
    """diag 9, 1, 1, 3 and a dead input: max/median of the live ones is 9 / 2 = 4.5 (the 0 not counted)."""
    H = np.diag([9.0, 1.0, 0.0, 1.0, 3.0])
    v = hessian_view(H, QuantConfig(group_size=-1))
    assert v["diag_spread"] == pytest.approx(4.5) and v["n_dead"] == 1
    np.testing.assert_array_equal(v["diag_sorted"], [9, 3, 1, 1, 0])
    assert spread(np.zeros(3), np.zeros(3, bool)) != spread(np.zeros(3), np.zeros(3, bool))  # nan: none live
    assert condition(np.array([4.0, 0.0])) == math.inf and condition(np.array([4.0, 0.0]), 1.0) == 5.0


def test_rotation_keeps_the_spectrum_and_flattens_the_diagonal():
    """H' = R H R^T: the same eigenvalues (R is orthogonal), a flatter diagonal (an outlier channel spread
    over every input). A dead input of H is no dead input of H': its zero eigenvalue stays, so H' is
    singular and only damping makes it positive definite."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((400, 64)) * np.r_[20.0, np.ones(63)]  # one outlier channel
    H = 2 / 400 * X.T @ X
    plain = hessian_view(H, QuantConfig(group_size=-1))
    rotated = hessian_view(H, QuantConfig(group_size=-1, rotation="hadamard", rotation_seed=1))
    assert rotated["rotated"] and rotated["basis"] == ROTATED_BASIS
    np.testing.assert_allclose(rotated["eigenvalues"], plain["eigenvalues"], rtol=1e-9)
    assert rotated["cond"] == pytest.approx(plain["cond"], rel=1e-6)
    assert plain["diag_spread"] > 100 and rotated["diag_spread"] < 5
    assert rotated["diag_spread_original"] == pytest.approx(plain["diag_spread"])

    X[:, 7] = 0.0  # a dead input
    H = 2 / 400 * X.T @ X
    cfg = QuantConfig(group_size=-1, rotation="hadamard")
    v = hessian_view(H, cfg)
    assert v["n_dead"] == 0 and list(v["dead_original"]) == [7]
    assert v["lambda_min"] == pytest.approx(0.0, abs=1e-9 * v["lambda_max"])
    assert v["cond"] > 1e9 and v["cond_damped"] < 1e4
    res = engine_run(H, cfg)
    assert not np.any(np.asarray(res.dead_columns)) and res.damp_percent_used == v["damp_used"]


def test_the_spectrum_can_be_reused_for_another_damping():
    H = with_eigenvalues([50.0, 5.0, 0.5, 0.05], seed=6)
    spec = hessian_spectrum(H, QuantConfig(group_size=-1))
    for damp in (0.001, 0.1):
        cfg = QuantConfig(group_size=-1, damp_percent=damp)
        a, b = hessian_view(H, cfg, spectrum=spec), hessian_view(H, cfg)
        assert a["cond_damped"] == pytest.approx(b["cond_damped"])
        assert a["lam"] == pytest.approx(damp * 55.55 / 4)


def test_bad_hessians_are_refused():
    with pytest.raises(ValueError, match="square"):
        hessian_view(np.ones((2, 3)), QuantConfig())
    with pytest.raises(ValueError, match="NaN"):
        hessian_view(np.array([[1.0, np.nan], [np.nan, 1.0]]), QuantConfig())
