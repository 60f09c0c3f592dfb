"""The column loop's fused sub-block step (engine/column_kernel.py): the compiled version (numba) equals the
NumPy one, both give the NumPy engine's codes, the Layer Lab's recorded loop equals the stepper, and
everything works without numba."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from engine_configs import CONFIGS, IDS, correlated_layer

from gptq_explorer.engine import GPTQStepper, QuantConfig, gptq_quantize
from gptq_explorer.engine import column_kernel as ck
from gptq_explorer.engine import grid as grid_np
from gptq_explorer.engine.gptq import prepare_layer

D_IN = 96


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(D_IN)[:2]


needs_numba = pytest.mark.skipif(not ck.compiled(np.float64), reason="numba is not installed")


@pytest.fixture(params=[False, True], ids=["numpy", "compiled"])
def compiled(request, monkeypatch):
    if request.param and not ck.compiled(np.float64):
        pytest.skip("numba is not installed")
    monkeypatch.setattr(ck, "COMPILED", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_rounding_equals_the_grid_rule(dtype):
    """_codes skips the tie snapping when no x = w / scale is near a half-integer: the same codes as
    grid.quantize_codes, on exact ties, float-noise ties, values just outside the band, and clipping."""
    rng = np.random.default_rng(1)
    eps = np.finfo(dtype).eps
    for maxq in (3, 15, 255):
        band = ck._tie_band(dtype, maxq)
        x = rng.uniform(-maxq - 3, maxq + 3, size=4000)
        x[:200] = np.round(x[:200]) + 0.5  # exact ties
        x[200:400] = np.round(x[200:400]) + 0.5 + rng.choice([-1, 1], 200) * rng.uniform(0, 8, 200) * eps
        x[400:600] = np.round(x[400:600]) + 0.5 + rng.choice([-1, 1], 200) * band * rng.uniform(1, 3, 200)
        scale = rng.uniform(0.01, 1, size=x.size).astype(dtype)
        w = (x * scale).astype(dtype)
        zero = rng.integers(0, maxq + 1, size=x.size).astype(dtype)
        for part in (slice(0, 4000), slice(600, 4000), slice(400, 600)):  # with ties, without, near
            out = np.empty(w[part].size, dtype)
            ck._codes(w[part], scale[part], zero[part], maxq, band, out)
            np.testing.assert_array_equal(out, grid_np.quantize_codes(w[part], scale[part], zero[part], maxq))


def _random_block(dtype, rows=300, bs=40, groups=3, seed=0):
    rng = np.random.default_rng(seed)
    W1 = rng.standard_normal((bs, rows)).astype(dtype)
    U1 = np.triu(rng.standard_normal((bs, bs)) / bs + np.eye(bs)).astype(dtype)
    scales = rng.uniform(0.1, 0.3, size=(groups, rows)).astype(dtype)
    zeros = rng.integers(0, 16, size=(groups, rows)).astype(dtype)
    gsel = rng.integers(0, groups, size=bs).astype(np.int64)
    X1 = np.triu(rng.standard_normal((bs, bs)) / bs, 1).astype(dtype)
    G = (0.01 * rng.standard_normal((bs, rows))).astype(dtype)
    return W1, U1, scales, zeros, gsel, X1, G


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", [ck.PLAIN, ck.U_FORM, ck.R_FORM])
@pytest.mark.parametrize("ternary", [False, True])
def test_compiled_sub_block_equals_numpy(dtype, mode, ternary):
    W1, U1, scales, zeros, gsel, X1, G = _random_block(dtype)
    if ternary:
        scales, zeros = np.abs(scales), -np.abs(scales)  # xmax, xmin
    d = np.ascontiguousarray(np.diag(U1))
    outs = []
    for run in (ck._call_compiled, ck.sub_block_numpy):
        W, E, Q, L = W1.copy(), np.zeros_like(W1), np.zeros_like(W1), np.zeros(len(d), dtype)
        C = np.zeros(W1.shape, np.uint8)  # the codes as bytes, as every caller keeps them
        Gc = G.copy()
        for s1 in range(0, len(d), 16):  # sub-blocks, with the caller's matmuls between them
            s2 = min(s1 + 16, len(d))
            run(W, E, Q, C, L, U1, s1, s2, scales, zeros, gsel, d, 15, ternary, mode,
                None if mode == ck.PLAIN else X1, Gc if mode == ck.R_FORM else None)
            W[s2:] -= U1[s1:s2, s2:].T @ E[s1:s2]
            if mode == ck.U_FORM:
                W[s2:] += X1[s1:s2, s2:].T @ W[s1:s2]
            if mode == ck.R_FORM:
                Gc[s2:] += X1[s1:s2, s2:].T @ W[s1:s2]
        outs.append((C, W, E, Q, L))
    (c1, *rest1), (c2, *rest2) = outs
    agree = np.mean(c1 == c2)  # float32: a value next to a tie may round the other way (sum order)
    assert agree == 1.0 if dtype == np.float64 else agree > 0.999
    tol = 1e-12 if dtype == np.float64 else 1e-4
    for a, b in zip(rest1, rest2):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_recorded_columns_equal_the_stepper(layer, compiled, kw):
    """The Layer Lab's run: every step's error, weight and value, and the result, as the stepper's."""
    W, h = layer
    cfg = QuantConfig(**kw)
    dXXT = h.dXXT if cfg.gptaq_alpha > 0 else None
    stepper = GPTQStepper(W, h.H, cfg, dXXT=dXXT)
    steps = list(stepper)
    ref = stepper.result
    res, Err, Wq, Q, groups, losses = ck.record_columns(prepare_layer(W, h.H, cfg, dXXT=dXXT), cfg,
                                                        load=compiled)
    np.testing.assert_array_equal(res.codes, ref.codes)
    for name in ("weight", "scales", "zeros"):
        np.testing.assert_allclose(getattr(res, name), getattr(ref, name), atol=1e-12)
    np.testing.assert_array_equal(res.g_idx, ref.g_idx)
    np.testing.assert_array_equal(res.perm, ref.perm)
    np.testing.assert_allclose(res.losses, ref.losses, rtol=1e-9)
    np.testing.assert_allclose(Err, np.stack([s.error for s in steps], axis=1), atol=1e-10)
    np.testing.assert_allclose(Wq, np.stack([s.weight for s in steps], axis=1), atol=1e-10)
    np.testing.assert_allclose(Q, np.stack([s.quantized for s in steps], axis=1), atol=1e-12)
    np.testing.assert_array_equal(groups, [s.group for s in steps])
    np.testing.assert_allclose(losses, [s.loss for s in steps], rtol=1e-9)


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_torch_path_gives_the_engine_codes(layer, compiled, kw):
    """The torch path's CPU column step, compiled or NumPy (the fallback without numba): the NumPy
    engine's codes, exactly, in float64."""
    W, h = layer
    cfg = QuantConfig(**kw)
    a = gptq_quantize(W, h.H, cfg, dXXT=h.dXXT)
    b = gptq_quantize(W, h.H, cfg, dXXT=h.dXXT, backend="torch", dtype=torch.float64)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-12)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-9)


@pytest.mark.parametrize("width", [64, 32, 100])
def test_factor_upper(monkeypatch, width):
    """H = R R^T, R upper triangular, by blocks of any width (the last one partial; runs of several blocks
    and a first run narrower than the others); folded, each block's panel times U_BB = R_BB^-1 and U_BB on
    the diagonal, as _fold_block_inverses makes it."""
    from gptq_explorer.engine import gptq_torch
    from gptq_explorer.engine.gptq_torch import _factor_upper, _fold_block_inverses

    monkeypatch.setattr(gptq_torch, "FACTOR_RUN", 128)
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.standard_normal((700, 300)))
    H = X.T @ X / 700
    bounds = [(a, min(a + width, 300)) for a in range(0, 300, width)]
    inverses = {}
    R = _factor_upper(H.clone(), bounds, fold=False, inverses=inverses)
    R = torch.triu(R)  # below the diagonal: scratch
    assert sorted(inverses) == [a for a, _ in bounds]
    for a, b in bounds:  # each block's triangular inverse, for the fold
        eye = torch.eye(b - a, dtype=H.dtype)
        torch.testing.assert_close(inverses[a] @ R[a:b, a:b], eye, rtol=0, atol=1e-10)
    assert bool((torch.diagonal(R) > 0).all())
    torch.testing.assert_close(R @ R.T, H, rtol=0, atol=1e-12)
    _fold_block_inverses(R, bounds, inverses)
    folded = torch.triu(_factor_upper(H.clone(), bounds))
    torch.testing.assert_close(folded, torch.triu(R), rtol=0, atol=1e-10)
    H[5, 5] = -1.0
    for fold in (True, False):
        with pytest.raises(torch.linalg.LinAlgError):
            _factor_upper(H.clone(), bounds, fold)


def test_runs():
    from gptq_explorer.engine.gptq_torch import _runs

    assert _runs([(0, 128), (128, 256), (256, 384), (384, 512)], 256) == [[(0, 128), (128, 256)],
                                                                         [(256, 384), (384, 512)]]
    assert _runs([(0, 128), (128, 256), (256, 320)], 256) == [[(0, 128), (128, 256), (256, 320)]]
    assert _runs([(0, 64), (64, 192), (192, 320)], 256) == [[(0, 64)], [(64, 192), (192, 320)]]
    assert _runs([(0, 32), (32, 300)], 256) == [[(0, 32)], [(32, 300)]]
    assert _runs([(0, 50)], 256) == [[(0, 50)]]


def test_max_asymmetry():
    """max |H - H^T| wherever the asymmetry sits: above or below the diagonal, in the last (partial) panel."""
    from gptq_explorer.engine.gptq_torch import _max_asymmetry

    rng = np.random.default_rng(0)
    for n, (i, j) in ((300, (3, 290)), (300, (290, 3)), (300, (299, 260)), (129, (128, 0)), (5, (1, 2))):
        A = torch.tensor(rng.standard_normal((n, n)))
        A = A + A.T
        assert _max_asymmetry(A) == 0.0
        A[i, j] += 0.25
        assert _max_asymmetry(A) == pytest.approx(0.25, rel=1e-12)
        assert _max_asymmetry(A.float()) == pytest.approx(float((A - A.T).abs().max()), rel=1e-6)


def test_everything_works_without_numba():
    """numba is optional: with it missing, the compiled step reports unavailable and the torch path and
    the Layer Lab's loop run the NumPy version (a fresh interpreter where `import numba` fails)."""
    code = """
import sys
sys.modules["numba"] = None  # import numba raises ImportError
import numpy as np, torch
from gptq_explorer import Hessian, QuantConfig, gptq_quantize
from gptq_explorer.engine import column_kernel as ck
from gptq_explorer.engine.gptq import prepare_layer
assert not ck.compiled(np.float32) and not ck.compiled(np.float64)
rng = np.random.default_rng(0)
X = rng.normal(size=(500, 64)); W = rng.normal(size=(8, 64)); H = Hessian(64).add_batch(X).H
cfg = QuantConfig(group_size=32, desc_act=True)
a = gptq_quantize(W, H, cfg)
b = gptq_quantize(W, H, cfg, backend="torch", dtype=torch.float64)
c = ck.record_columns(prepare_layer(W, H, cfg), cfg, load=True)[0]
assert np.array_equal(a.codes, b.codes) and np.array_equal(a.codes, c.codes)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
