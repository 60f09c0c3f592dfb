"""The randomized Hadamard rotation: orthogonal, +-1/sqrt(n) entries, deterministic, spreads outliers."""

import numpy as np
import pytest

from gptq_explorer.engine.rotation import (
    _block_order,
    hadamard_construction,
    hadamard_matrix,
    hadamard_rotation,
    paley_hadamard,
)

DENSE = [1, 2, 12, 20, 24, 40, 240, 576, 1536, 2048]


@pytest.mark.parametrize("n", DENSE + [6, 7, 448])
def test_orthogonal(n):
    R = hadamard_rotation(n, seed=3)
    assert R.shape == (n, n) and R.dtype == np.float64
    np.testing.assert_allclose(R @ R.T, np.eye(n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", DENSE)
def test_dense_entries_are_plus_minus_one_over_sqrt_n(n):
    R = hadamard_rotation(n, seed=1)
    np.testing.assert_allclose(np.abs(R), 1 / np.sqrt(n), rtol=1e-15)


def test_block_diagonal_11008():
    """11008 = 43 * 256: 43 orthogonal blocks on the diagonal, zeros elsewhere, so R is orthogonal."""
    n, m = 11008, 256
    assert _block_order(n) == m
    R = hadamard_rotation(n)
    assert np.count_nonzero(R) == (n // m) * m * m
    for start in range(0, n, m):
        block = R[start : start + m, start : start + m]
        np.testing.assert_allclose(np.abs(block), 1 / 16, rtol=1e-15)
        np.testing.assert_allclose(block @ block.T, np.eye(m), rtol=0, atol=1e-12)


def test_odd_width_is_random_signs_only():
    R = hadamard_rotation(7, seed=5)
    np.testing.assert_array_equal(np.abs(R), np.eye(7))
    assert hadamard_construction(7) == "random signs only: 7 has no Hadamard factor > 1 (diagonal)"


@pytest.mark.parametrize("q", [11, 19])
def test_paley_is_hadamard(q):
    H = paley_hadamard(q).astype(np.int64)
    assert set(np.unique(H)) == {-1, 1}
    np.testing.assert_array_equal(H @ H.T, (q + 1) * np.eye(q + 1, dtype=np.int64))


def test_every_block_order_up_to_300_is_hadamard():
    for n in range(1, 301):
        m = _block_order(n)
        assert n % m == 0
        H = hadamard_matrix(m).astype(np.int64)
        np.testing.assert_array_equal(H @ H.T, m * np.eye(m, dtype=np.int64))
    # 36 = 3 * 12 and 100 = 5 * 20: the largest dense order dividing n, not just its power of 2
    assert [_block_order(n) for n in (12, 36, 48, 60, 80, 100, 144)] == [12, 12, 48, 20, 80, 20, 144]


def test_constructions():
    assert hadamard_construction(576) == "Sylvester 4 (x) Paley 12 (x) Paley 12 = 576 (dense)"
    assert hadamard_construction(1536) == "Sylvester 128 (x) Paley 12 = 1536 (dense)"
    assert hadamard_construction(4096) == "Sylvester 4096 = 4096 (dense)"
    assert hadamard_construction(20) == "Paley 20 = 20 (dense)"
    assert hadamard_construction(11008) == "block-diagonal: 43 blocks of 256 (Sylvester 256) = 11008"
    assert hadamard_construction(14336) == "block-diagonal: 7 blocks of 2048 (Sylvester 2048) = 14336"


def test_deterministic_and_seed_dependent():
    a, b, c = hadamard_rotation(576, seed=0), hadamard_rotation(576, seed=0), hadamard_rotation(576, seed=1)
    np.testing.assert_array_equal(a, b)
    # same Hadamard, other signs: the columns differ by a sign flip in about half of them
    flipped = np.mean(np.all(a == -c, axis=0))
    assert np.all(np.all(a == c, axis=0) | np.all(a == -c, axis=0))
    assert 0.35 < flipped < 0.65
    with pytest.raises(ValueError, match="n must be >= 1"):
        hadamard_rotation(0)


def outlier_row(n, seed=0):
    """A weight row of N(0, 1) noise with one entry 1000 times larger: the case rotation is for."""
    w = np.random.default_rng(seed).standard_normal(n)
    w[n // 3] = 1000.0
    return w


def peak_to_rms(v):
    return float(np.abs(v).max() / np.sqrt(np.mean(v**2)))


@pytest.mark.parametrize("n", [576, 1536, 2048])
def test_rotation_spreads_an_outlier(n):
    w = outlier_row(n)
    assert peak_to_rms(w) > 0.99 * np.sqrt(n)  # 24, 39, 45: the outlier sets the grid's range
    rotated = w @ hadamard_rotation(n, seed=2).T
    assert peak_to_rms(rotated) < 1.5  # 1000/sqrt(n) +- noise in every entry: nearly flat


def test_block_diagonal_spreads_within_a_block_only():
    n, m = 448, 64  # 7 blocks of 64: the outlier lands on its block's 64 entries
    w = outlier_row(n)
    rotated = w @ hadamard_rotation(n).T
    assert abs(peak_to_rms(rotated) - np.sqrt(n / m)) < 0.2  # sqrt(7) = 2.65, not 1 and not sqrt(448)
    odd = outlier_row(21)  # odd width: signs only, the outlier stays where it was
    assert peak_to_rms(odd @ hadamard_rotation(21).T) == pytest.approx(peak_to_rms(odd), rel=1e-12)


def test_layer_product_and_hessian_preserved():
    rng = np.random.default_rng(0)
    n = 576
    W, X = rng.standard_normal((32, n)), rng.standard_normal((200, n))
    R = hadamard_rotation(n, seed=7)
    # (W R^T)(R x) = W x for every input x (rows of X)
    np.testing.assert_allclose((X @ R.T) @ (W @ R.T).T, X @ W.T, rtol=0, atol=1e-10)
    # rotated inputs have Hessian R H R^T, and the GPTQ objective tr(W H W^T) is unchanged
    H = X.T @ X
    Hr = R @ H @ R.T
    np.testing.assert_allclose((X @ R.T).T @ (X @ R.T), Hr, rtol=0, atol=1e-9)
    Wr = W @ R.T
    np.testing.assert_allclose(np.trace(Wr @ Hr @ Wr.T), np.trace(W @ H @ W.T), rtol=1e-12)
