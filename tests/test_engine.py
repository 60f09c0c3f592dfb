"""The NumPy reference engine: grid, GPTQ, RTN, Hessian, stepper, and every bad input."""

import itertools

import numpy as np
import pytest
import torch

from gptq_explorer import Hessian, QuantConfig, gptq_quantize, gptq_steps, rtn_quantize
from gptq_explorer.engine.gptq import hinv_cholesky_upper
from gptq_explorer.engine.grid import grid_params
from gptq_explorer.engine.reference import reference_fasterquant


def correlated_layer(d_out=48, d_in=192, tokens=768, seed=0):
    """W and calibration inputs X with strongly correlated features (like real activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    X = rng.standard_normal((tokens, d_in)) @ (np.eye(d_in) + 2 * mix)
    X *= rng.uniform(0.2, 3.0, size=d_in)  # uneven feature scales, so desc_act matters
    W = rng.standard_normal((d_out, d_in)) * 0.05
    return W, X


def hessian_of(X):
    return Hessian(X.shape[1]).add_batch(X).H


def output_error(X, W, Q):
    return float(np.sum((X @ W.T - X @ Q.T) ** 2))


CONFIGS = [
    QuantConfig(),
    QuantConfig(bits=3, group_size=32, sym=False),
    QuantConfig(bits=2, group_size=-1, sym=False, desc_act=True),
    QuantConfig(bits=4, group_size=64, desc_act=True),
    QuantConfig(bits=4, group_size=64, desc_act=True, static_groups=True),
    QuantConfig(bits=8, group_size=128, sym=False, desc_act=True),
    QuantConfig(bits=4, group_size=50),  # groups that don't divide d_in: a short last group
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_weights_on_grid_and_codes_in_range(cfg):
    W, X = correlated_layer()
    res = gptq_quantize(W, hessian_of(X), cfg)
    assert res.codes.min() >= 0 and res.codes.max() <= cfg.maxq
    assert res.scales.shape == res.zeros.shape == (W.shape[0], cfg.n_groups(W.shape[1]))
    assert res.g_idx.shape == (W.shape[1],) and res.g_idx.max() < res.n_groups
    # weight[:, j] == scales[:, g] * (codes[:, j] - zeros[:, g]) exactly
    np.testing.assert_array_equal(res.weight, res.dequantize())
    assert np.all((res.zeros >= 0) & (res.zeros <= cfg.maxq))
    if cfg.sym:
        assert np.all(res.zeros == 2 ** (cfg.bits - 1))
    # every group uses its share of the grid: widths match group_size
    counts = np.bincount(res.g_idx, minlength=res.n_groups)
    width = cfg.group_width(W.shape[1])
    assert counts.max() == width and counts.sum() == W.shape[1]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_identity_hessian_gives_rtn(cfg):
    W, _ = correlated_layer()
    res = gptq_quantize(W, np.eye(W.shape[1]), cfg)
    rtn = rtn_quantize(W, cfg)
    np.testing.assert_array_equal(res.codes, rtn.codes)
    np.testing.assert_allclose(res.weight, rtn.weight, rtol=0, atol=1e-15)


@pytest.mark.parametrize("group_size", [-1, 16, 32, 50, 128])
@pytest.mark.parametrize("desc_act", [False, True])
def test_result_does_not_depend_on_block_size(group_size, desc_act):
    W, X = correlated_layer()
    H = hessian_of(X)
    base = gptq_quantize(W, H, QuantConfig(group_size=group_size, desc_act=desc_act, block_size=1))
    for block in (7, 32, 128, 1000):
        other = gptq_quantize(W, H, QuantConfig(group_size=group_size, desc_act=desc_act, block_size=block))
        np.testing.assert_array_equal(other.codes, base.codes)
        np.testing.assert_allclose(other.weight, base.weight, atol=1e-12)
        np.testing.assert_allclose(other.scales, base.scales, rtol=1e-10)


def test_reference_depends_on_block_size_where_we_do_not():
    """Fix 1, demonstrated: with group_size < block_size the reference's codes move with block_size."""
    W, X = correlated_layer()
    H = hessian_of(X)
    q_small, _ = reference_fasterquant(W, H, bits=3, groupsize=16, sym=False, blocksize=16,
                                       dtype=torch.float64)
    q_big, _ = reference_fasterquant(W, H, bits=3, groupsize=16, sym=False, blocksize=128,
                                     dtype=torch.float64)
    assert not torch.allclose(q_small, q_big)
    ours = gptq_quantize(W, H, QuantConfig(bits=3, group_size=16, sym=False, block_size=16))
    # with block_size == group_size the reference has no stale groups: it equals us
    np.testing.assert_allclose(ours.weight, q_small.numpy(), atol=1e-10)


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(bits=4, group_size=-1, sym=False),
        QuantConfig(bits=3, group_size=-1, sym=False, desc_act=True),
        QuantConfig(bits=4, group_size=64, sym=False, block_size=64),
        QuantConfig(bits=4, group_size=128, sym=False, desc_act=True),
        QuantConfig(bits=2, group_size=64, sym=False, desc_act=True, static_groups=True),
        QuantConfig(bits=4, group_size=32, sym=True, static_groups=True),
    ],
    ids=lambda c: c.label(),
)
def test_equals_reference_where_reference_is_right(cfg):
    W, X = correlated_layer()
    W[0, 0] = -0.3  # every row needs a negative entry for sym to be the reference's (quirk 2)
    H = hessian_of(X)
    H[5, :] = H[:, 5] = 0  # a dead input
    res = gptq_quantize(W, H, cfg)
    Q, Losses = reference_fasterquant(W, H, bits=cfg.bits, groupsize=cfg.group_size, sym=cfg.sym,
                                      blocksize=cfg.block_size, actorder=cfg.desc_act,
                                      static_groups=cfg.static_groups, dtype=torch.float64)
    np.testing.assert_allclose(res.weight, Q.numpy(), atol=1e-10)
    np.testing.assert_allclose(res.losses, Losses.sum(0).numpy(), rtol=1e-8)


def test_symmetric_nonnegative_group_is_not_clipped():
    """Fix 2: a group with no negative weight keeps its maximum (the reference clips it at 7/15)."""
    w = np.array([[0.0, 0.2, 0.5, 1.5]])
    ours = rtn_quantize(w, QuantConfig(bits=4, group_size=-1, sym=True))
    scale, zero = grid_params(w, 4, True)
    assert scale[0] == pytest.approx(3.0 / 15) and zero[0] == 8
    ref_q, _ = reference_fasterquant(w, np.eye(4), bits=4, sym=True, dtype=torch.float64)
    assert ref_q[0, 3].item() == pytest.approx(7 / 15 * 1.5)  # the reference's clip
    assert ours.weight[0, 3] == pytest.approx(1.4)  # 7 steps of 0.2: the largest symmetric code
    assert abs(ours.weight[0, 3] - 1.5) < abs(ref_q[0, 3].item() - 1.5)


def test_desc_act_permutation_and_g_idx():
    W, X = correlated_layer()
    H = hessian_of(X)
    cfg = QuantConfig(group_size=32, desc_act=True)
    res = gptq_quantize(W, H, cfg)
    diag = np.diag(H)
    np.testing.assert_array_equal(res.perm, np.argsort(-diag, kind="stable"))
    assert np.all(np.diff(diag[res.perm]) <= 0)
    invperm = np.argsort(res.perm)
    np.testing.assert_array_equal(res.g_idx, invperm // 32)
    # the first group holds the 32 largest-diag columns
    assert set(np.flatnonzero(res.g_idx == 0)) == set(res.perm[:32])
    # un-permuted: quantizing a column-permuted problem gives the column-permuted answer
    shuffle = np.random.default_rng(1).permutation(W.shape[1])
    res2 = gptq_quantize(W[:, shuffle], H[np.ix_(shuffle, shuffle)], cfg.replace(group_size=-1))
    res1 = gptq_quantize(W, H, cfg.replace(group_size=-1))
    np.testing.assert_allclose(res2.weight, res1.weight[:, shuffle], atol=1e-12)
    # static groups keep g_idx trivial even with desc_act
    static = gptq_quantize(W, H, cfg.replace(static_groups=True))
    np.testing.assert_array_equal(static.g_idx, np.arange(W.shape[1]) // 32)
    # desc_act helps on inputs with uneven scales
    assert output_error(X, W, res.weight) < output_error(X, W, gptq_quantize(W, H, cfg.replace(
        desc_act=False)).weight)


def test_dead_columns_quantize_to_zero_and_receive_no_update():
    W, X = correlated_layer()
    X[:, [3, 70]] = 0
    H = hessian_of(X)
    res = gptq_quantize(W, H, QuantConfig(group_size=32, desc_act=True, sym=False))
    assert np.all(res.weight[:, [3, 70]] == 0)
    assert res.dead_columns[[3, 70]].all() and res.dead_columns.sum() == 2
    assert np.all(res.losses[[3, 70]] == 0)


def test_invariant_to_hessian_scale():
    W, X = correlated_layer()
    H = hessian_of(X)
    a = gptq_quantize(W, H, QuantConfig(desc_act=True))
    b = gptq_quantize(W, 64.0 * H, QuantConfig(desc_act=True))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(b.losses, 64.0 * a.losses, rtol=1e-9)


def test_stepper_equals_batch_result():
    W, X = correlated_layer()
    H = hessian_of(X)
    for cfg in CONFIGS:
        batch = gptq_quantize(W, H, cfg)
        stepper = gptq_steps(W, H, cfg)
        steps = list(stepper)
        assert len(steps) == W.shape[1] == len(stepper)
        np.testing.assert_array_equal(stepper.result.weight, batch.weight)
        np.testing.assert_array_equal([s.column for s in steps], batch.perm)
        np.testing.assert_array_equal([s.position for s in steps], np.arange(W.shape[1]))
        for s in steps[:5]:
            np.testing.assert_array_equal(s.quantized, batch.weight[:, s.column])
            np.testing.assert_array_equal(s.codes, batch.codes[:, s.column])
        assert steps[-1].running_loss == pytest.approx(batch.loss, rel=1e-12)


def test_stepper_updates_reconstruct_every_column():
    """Each column as quantized = original + the sum of all earlier steps' updates to it."""
    W, X = correlated_layer(d_out=8, d_in=40)
    H = hessian_of(X)
    cfg = QuantConfig(group_size=16, desc_act=True)
    stepper = gptq_steps(W, H, cfg)
    W0 = stepper.prepared.W.copy()
    steps = list(stepper)
    state = W0.copy()
    for s in steps:
        np.testing.assert_allclose(s.weight, state[:, s.position], atol=1e-12)
        state[:, s.position + 1 :] += s.update
        np.testing.assert_allclose(s.error, (s.weight - s.quantized) / s.hinv_diag)


def test_eight_bits_is_nearly_lossless():
    W, X = correlated_layer()
    res = gptq_quantize(W, hessian_of(X), QuantConfig(bits=8, group_size=128))
    rel = np.linalg.norm(res.weight - W) / np.linalg.norm(W)
    assert rel < 0.02  # 255 levels: about 1% weight error (GPTQ moves weights to cut output error)
    rel_out = np.sqrt(output_error(X, W, res.weight)) / np.linalg.norm(X @ W.T)
    assert rel_out < 0.01
    four = gptq_quantize(W, hessian_of(X), QuantConfig(bits=4, group_size=128))
    rel_out4 = np.sqrt(output_error(X, W, four.weight)) / np.linalg.norm(X @ W.T)
    assert rel_out4 > 10 * rel_out  # 16x finer steps: roughly 16x less error


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 128), (3, 32), (2, -1)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    W, X = correlated_layer()
    X_test = correlated_layer(seed=0)[1][::-1]  # same distribution, tokens reversed (same H)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=False)
    g = gptq_quantize(W, hessian_of(X), cfg)
    r = rtn_quantize(W, cfg)
    assert output_error(X_test, W, g.weight) < 0.7 * output_error(X_test, W, r.weight)
    # GPTQ trades weight error for output error: its weights are further from W
    assert np.sum((g.weight - W) ** 2) > np.sum((r.weight - W) ** 2)


def test_obs_update_by_hand():
    """1 row, 3 columns, H chosen so every number can be checked on paper."""
    W = np.array([[0.25, 0.10, 0.30]])
    H = np.array([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    res = gptq_quantize(W, H, QuantConfig(bits=2, group_size=-1, sym=False, damp_percent=1e-12))
    # grid from [0, 0.3] with 2 bits: scale 0.1, zero 0, values 0, .1, .2, .3
    assert res.scales[0, 0] == pytest.approx(0.1) and res.zeros[0, 0] == 0
    # column 0: 0.25 -> 0.2 (round half to even), error 0.05
    assert res.weight[0, 0] == pytest.approx(0.2)
    Hinv = np.linalg.inv(H)  # [[2/3, -1/3, 0], [-1/3, 2/3, 0], [0, 0, 1]]
    delta = 0.05
    # OBS: w1 <- w1 - delta / [H^-1]_00 * [H^-1]_01 = 0.1 + 0.05 * 0.5 = 0.125 -> rounds to 0.1
    w1 = 0.10 - delta / Hinv[0, 0] * Hinv[0, 1]
    assert w1 == pytest.approx(0.125)
    assert res.weight[0, 1] == pytest.approx(0.1)
    assert res.weight[0, 2] == pytest.approx(0.3)  # uncoupled column: no update, on the grid
    # losses: delta^2 / (2 [H^-1]_qq); for column 1 the downdated inverse is 1 / H_11
    assert res.losses[0] == pytest.approx(delta**2 / Hinv[0, 0] / 2, rel=1e-9)  # 0.001875
    assert res.losses[1] == pytest.approx((0.125 - 0.1) ** 2 * H[1, 1] / 2, rel=1e-9)  # 0.000625
    assert res.losses[2] == pytest.approx(0.0, abs=1e-20)


def test_obs_loss_is_the_true_error_increase_for_one_column():
    """For the first column, the OBS loss equals the exact minimum of the quadratic error."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((1, 6))
    X = rng.standard_normal((100, 6))
    H = 2 * X.T @ X / len(X)
    res = gptq_quantize(W, H, QuantConfig(bits=3, group_size=-1, damp_percent=1e-12))
    delta = W[0, 0] - res.weight[0, 0]
    # brute force: fix w0 = q0, choose the rest to minimize (w - W) H (w - W)^T / 2
    Hff = H[1:, 1:]
    best_rest = W[0, 1:] - np.linalg.solve(Hff, H[1:, 0] * -delta) * 1.0
    dw = np.concatenate([[-delta], best_rest - W[0, 1:]])
    assert dw @ H @ dw / 2 == pytest.approx(res.losses[0], rel=1e-9)


def test_hinv_cholesky_upper_is_the_papers_factor():
    _, X = correlated_layer(d_in=64)
    H = hessian_of(X) + 0.01 * np.eye(64)
    U = hinv_cholesky_upper(H)
    expected = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor of H^-1, as the paper computes it
    np.testing.assert_allclose(U, expected, rtol=1e-9, atol=1e-12)
    assert np.allclose(np.tril(U, -1), 0)


def test_hessian_running_average_and_shapes():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 50, 16))
    h = Hessian(16)
    h.add_batch(X[0]).add_batch(X[1:])
    flat = X.reshape(-1, 16)
    np.testing.assert_allclose(h.H, 2 * flat.T @ flat / 150, rtol=1e-12)
    assert h.n_tokens == 150
    t = Hessian(16, backend="torch")
    t.add_batch(torch.tensor(X, dtype=torch.float16))
    assert t.H.dtype == torch.float32
    np.testing.assert_allclose(t.H.numpy(), 2 * flat.T @ flat / 150, rtol=2e-3, atol=2e-3)


def test_float32_input_is_accepted():
    W, X = correlated_layer()
    res64 = gptq_quantize(W, hessian_of(X))
    res32 = gptq_quantize(W.astype(np.float32), hessian_of(X).astype(np.float32))
    assert res32.weight.dtype == np.float64
    np.testing.assert_array_equal(res32.codes.shape, res64.codes.shape)
    assert np.mean(res32.codes == res64.codes) > 0.999
    # float32 arithmetic: a rare near-tie flips and the row's later columns compensate differently;
    # the layer's output error is unchanged (tests/test_torch_engine.py checks the 99.9% bound
    # on SmolLM2-sized layers)
    low = gptq_quantize(W, hessian_of(X), dtype=np.float32)
    assert low.weight.dtype == np.float32 and np.mean(low.codes == res64.codes) > 0.98
    assert output_error(X, W, low.weight) == pytest.approx(output_error(X, W, res64.weight), rel=5e-3)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 1}, "bits must be between 2 and 8"),
        ({"bits": 9}, "bits must be between 2 and 8"),
        ({"bits": 4.0}, "bits must be an integer"),
        ({"group_size": 0}, "group_size must be -1"),
        ({"group_size": -2}, "group_size must be -1"),
        ({"damp_percent": 0}, "damp_percent must be strictly between 0 and 1"),
        ({"damp_percent": 1}, "damp_percent must be strictly between 0 and 1"),
        ({"damp_percent": -0.1}, "damp_percent must be strictly between 0 and 1"),
        ({"block_size": 0}, "block_size"),
        ({"desc_act": "yes"}, "desc_act must be True or False"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_bad_arrays():
    W, X = correlated_layer(d_out=4, d_in=16)
    H = hessian_of(X)
    with pytest.raises(ValueError, match=r"H must be \(d_in, d_in\) = \(16, 16\)"):
        gptq_quantize(W, H[:8, :8])
    with pytest.raises(ValueError, match="W must be 2-D"):
        gptq_quantize(W[0], H)
    bad = W.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        gptq_quantize(bad, H)
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        rtn_quantize(bad)
    badH = H.copy()
    badH[0, 0] = np.inf
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        gptq_quantize(W, badH)
    asym = H.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="H must be symmetric"):
        gptq_quantize(W, asym)
    with pytest.raises(ValueError, match="X must be"):
        Hessian(16).add_batch(np.zeros((4, 8)))
    with pytest.raises(ValueError, match="no calibration inputs"):
        _ = Hessian(16).H


def test_damping_is_raised_when_cholesky_fails():
    W, X = correlated_layer(d_out=4, d_in=16)
    H = hessian_of(X)
    # an indefinite "Hessian": 1% damping is not enough, 100% is
    evals, evecs = np.linalg.eigh(H)
    evals[0] = -0.05 * evals.mean()
    bad = evecs @ np.diag(evals) @ evecs.T
    bad = (bad + bad.T) / 2
    with pytest.warns(RuntimeWarning, match=r"quantized with damp_percent=0\.1"):
        res = gptq_quantize(W, bad, QuantConfig(damp_percent=0.01))
    assert res.damp_percent_used == pytest.approx(0.1)
    hopeless = -np.eye(16)
    with pytest.raises(ValueError, match="not positive definite even after raising damp_percent"):
        gptq_quantize(W, hopeless)


def test_all_zero_layer():
    W = np.zeros((4, 16))
    res = gptq_quantize(W, np.eye(16), QuantConfig(sym=False))
    assert np.all(res.weight == 0)
    assert np.all(np.isfinite(res.scales))


def test_configs_are_exhaustively_valid():
    # the grid of options the UI exposes must all construct
    for bits, gs, sym, da, sg in itertools.product(range(2, 9), (-1, 32, 128), (True, False), (True, False),
                                                   (True, False)):
        QuantConfig(bits=bits, group_size=gs, sym=sym, desc_act=da, static_groups=sg)
