"""The randomized Hadamard rotation: orthogonal, +-1/sqrt(n) entries, deterministic, spreads outliers."""

import numpy as np
import pytest
import torch

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


# ---- the fast transform (rotation.fast_hadamard): R applied without forming it

FAST_WIDTHS = [1, 7, 12, 20, 64, 96, 300, 448, 576, 720, 1536, 2048]  # dense, block-diagonal and odd


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("n", FAST_WIDTHS)
def test_fast_transform_equals_the_dense_rotation(n, kind):
    """Rotation's products (what both engines run) equal the dense R's, on NumPy arrays and torch tensors."""
    from gptq_explorer.engine.rotation import Rotation

    rng = np.random.default_rng(n)
    R = hadamard_rotation(n, seed=4)
    X, W, M = rng.standard_normal((n, 5)), rng.standard_normal((9, n)), rng.standard_normal((n, n))
    like = np.zeros(1) if kind == "numpy" else torch.zeros(1, dtype=torch.float64)
    rotate, other_seed = Rotation(n, seed=4, like=like), Rotation(n, seed=5, like=like)
    arr = (lambda a: a) if kind == "numpy" else torch.tensor  # noqa: E731
    out = (lambda a: a) if kind == "numpy" else (lambda t: t.numpy())  # noqa: E731
    tol = dict(rtol=0, atol=1e-12 * np.sqrt(n))
    np.testing.assert_allclose(out(rotate.apply(arr(X))), R @ X, **tol)
    np.testing.assert_allclose(out(rotate.apply(arr(X), transpose=True)), R.T @ X, **tol)
    np.testing.assert_allclose(out(rotate.weight(arr(W))), W @ R.T, **tol)
    np.testing.assert_allclose(out(rotate.back(arr(W))), W @ R, **tol)
    M_rotated = R @ M @ R.T  # M is not symmetric: GPTAQ's dXXT is rotated the same way
    np.testing.assert_allclose(out(rotate.hessian(arr(M))), M_rotated, rtol=0, atol=1e-11 * n)
    np.testing.assert_array_equal(out(rotate.matrix()), R)
    assert not np.allclose(out(other_seed.apply(arr(X))), R @ X) or n == 1  # the seed's signs are used


@pytest.mark.parametrize("n", [576, 1536, 300])
def test_fast_transform_in_torch_equals_the_dense_rotation(n):
    import torch

    from gptq_explorer.engine.rotation import fast_hadamard, hadamard_parts

    pieces, d = hadamard_parts(n, seed=2)
    tp = [torch.tensor(p, dtype=torch.float64) for p in pieces]
    R = torch.tensor(hadamard_rotation(n, seed=2))
    X = torch.randn(n, 11, dtype=torch.float64)
    for transpose, want in ((False, R @ X), (True, R.T @ X)):
        got = fast_hadamard(X, tp, torch.tensor(d), transpose, torch.matmul)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * np.sqrt(n))


@pytest.mark.parametrize("m", [2, 12, 20, 48, 64, 128, 240, 576, 1536, 4096])
def test_pieces_are_the_hadamard_matrix(m):
    """kron(pieces) == hadamard_matrix(m); each piece is at most PIECE_ORDER wide unless it is one Paley
    factor; the pieces' orders sum to far less than m (the transform's work per vector, against m)."""
    from gptq_explorer.engine.rotation import PIECE_ORDER, hadamard_pieces

    pieces = hadamard_pieces(m)
    K = np.ones((1, 1), dtype=np.int64)
    for p in pieces:
        assert p.shape[0] <= max(PIECE_ORDER, 20)
        K = np.kron(K, p.astype(np.int64))
    np.testing.assert_array_equal(K, hadamard_matrix(m))
    assert [p.shape[0] for p in hadamard_pieces(576)] == [48, 12] and sum(p.shape[0] for p in pieces) <= 128


@pytest.mark.parametrize("kw", [dict(), dict(gptaq_alpha=0.25, group_size=32),
                                dict(group_size=-1, mse_norm=2.4)])
@pytest.mark.parametrize("n", [576, 300])
def test_torch_engine_rotation_matches_the_dense_products(kw, n):
    """Both engines rotate W, H and dXXT with the fast transform: the torch engine's result equals the NumPy
    engine's code for code, R is hadamard_rotation's, and the weight is dequantize() @ R."""
    import torch

    from gptq_explorer.engine import Hessian, QuantConfig, gptq_quantize, rtn_quantize

    rng = np.random.default_rng(1)
    A = rng.normal(size=(n, n)) / np.sqrt(n)
    X = rng.normal(size=(2 * n, n)) @ A
    h = Hessian(n).add_batch(X, X_fp=X + 0.03 * rng.normal(size=X.shape) @ A)
    W = rng.normal(size=(24, n))
    cfg = QuantConfig(rotation="hadamard", rotation_seed=3, **kw)
    a = gptq_quantize(W, h.H, cfg, dXXT=h.dXXT)
    b = gptq_quantize(W, h.H, cfg, dXXT=h.dXXT, backend="torch", dtype=torch.float64)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(np.asarray(b.rotation), hadamard_rotation(n, seed=3), rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(b.weight), np.asarray(b.dequantize()) @ np.asarray(b.rotation),
                               rtol=0, atol=1e-12)
    ra, rb = rtn_quantize(W, cfg), rtn_quantize(W, cfg, backend="torch", dtype=torch.float64)
    np.testing.assert_array_equal(ra.codes, rb.codes)
    np.testing.assert_allclose(np.asarray(rb.weight), ra.weight, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_rotation_raises_rtn_error_on_v_proj():
    """docs/methods.md, "Why the rotation hurts RTN": on SmolLM2's v_proj the rotation lowers RTN's weight
    error but raises its output error, all of it in H's top 1% eigendirections: plain RTN rounds the small
    weights v_proj has on the outlier inputs to 0 (error w^2, tiny), the rotated grid's error is spread
    evenly over all inputs. On q_proj, as on most linears, the rotation lowers both. Real layers from the
    layer store (16 x 256 prose windows; the first run captures them with the offline model)."""
    from gptq_explorer.engine import QuantConfig, rtn_quantize
    from gptq_explorer.services.layer_source import ModelSource

    cfg = QuantConfig(bits=3, group_size=128, sym=True)

    def measure(block: int, sublayer: str) -> dict:
        layer = ModelSource(block=block, sublayer=sublayer, nsamples=16, seqlen=256).load()
        W, H = layer.W, layer.H
        D, D_r = (W - rtn_quantize(W, c).weight for c in (cfg, cfg.replace(rotation="hadamard")))
        lam, V = np.linalg.eigh(H)
        top = V[:, -W.shape[1] // 100 :] * np.sqrt(lam[-W.shape[1] // 100 :])  # H's top 1%, scaled

        def out(E):
            return float(((E @ H) * E).sum())

        def in_top(E):
            return float(((E @ top) ** 2).sum())

        outlier_inputs = np.argsort(np.diag(H))[-W.shape[1] // 100 :]
        return {"out": out(D_r) / out(D), "weight": float((D_r**2).sum() / (D**2).sum()),
                "top": in_top(D_r) / in_top(D), "rest": (out(D_r) - in_top(D_r)) / (out(D) - in_top(D)),
                "outlier_rms": float(np.sqrt((W[:, outlier_inputs] ** 2).mean() / (W**2).mean()))}

    v = measure(13, "self_attn.v_proj")  # measured: out x2.99, weight x0.94, top x4.2, rest x0.93, rms 0.30
    assert v["out"] > 2.5 and v["weight"] < 0.97
    assert v["top"] > 3.5 and v["rest"] < 1.0
    assert v["outlier_rms"] < 0.4
    q = measure(5, "self_attn.q_proj")
    assert q["out"] < 0.95 and q["weight"] < 0.95 and q["outlier_rms"] > 0.8


@pytest.mark.cuda
def test_fast_transform_and_unpruned_mse_grid_on_cuda():
    """On CUDA the torch engine rotates with the same fast transform and searches the MSE grid without
    pruning: the codes of the CPU run (float64; CUDA's own summation order may flip a rare tie)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from gptq_explorer.engine import Hessian, QuantConfig, gptq_quantize

    rng = np.random.default_rng(0)
    n = 576
    X = rng.normal(size=(2 * n, n)) @ (rng.normal(size=(n, n)) / np.sqrt(n))
    H, W = Hessian(n).add_batch(X).H, rng.standard_t(df=4, size=(64, n))
    cfg = QuantConfig(bits=3, group_size=128, rotation="hadamard", mse_norm=2.4)
    cpu = gptq_quantize(W, H, cfg, backend="torch", dtype=torch.float64)
    gpu = gptq_quantize(W, H, cfg, backend="torch", dtype=torch.float64, device="cuda")
    assert gpu.weight.device.type == "cuda"
    assert np.mean(np.asarray(gpu.codes.cpu()) == np.asarray(cpu.codes)) >= 0.999  # as test_torch_engine
