"""Anchors for the methods beyond the paper: our engine against other projects' code, on realistic layers.

* MSE grid (mse_norm): against our restatement of the paper's Quantizer search (engine/reference.py,
  checked bit for bit against IST-DASLab/gptq's quant.py when it was written) and against GPTQModel
  7.6.0's Quantizer, which differs from the paper for 2-bit asymmetric grids (it also tries the other
  integer next to the ideal zero point).
* ternary: against the reference's trits mode.
* GAR (group_aware): against GPTQModel's gar.py permutation, composed as its GPTQ.quantize composes it.
* GPTAQ (gptaq_alpha, Hessian dXXT): against GPTQModel's GPTAQ.process_batch and GPTAQ.quantize. Ours
  fixes one defect of GPTQModel's (its after-block update uses the rounded values of the block where the
  in-block update used the pre-rounding ones, so its result depends on blocksize): the two agree when the
  whole layer is one block, and a measured test shows GPTQModel's blocksize dependence.

GPTQModel runs in ``.venv-outside`` (see test_checkpoint_outside_loader.py): every case of this module goes
to ONE child run (tests/outside_anchors.py; importing gptqmodel alone takes ~10 s), through .npz files.
Without that environment the GPTQModel tests skip; they fail instead with GPTQ_EXPLORER_REQUIRE_OUTSIDE=1.

The data: inputs X = Z A (correlated) with uneven channel scales and a few outlier channels; X_fp, what
the full-precision model would feed the same layer, is X plus a correlated perturbation of ~3 %; weights
are heavy-tailed (Student t). Everything is seeded.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gptq_explorer.engine import Hessian, QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.engine.reference import reference_fasterquant, reference_rtn

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_VENV = ROOT / os.environ.get("GPTQ_EXPLORER_OUTSIDE_VENV", ".venv-outside")  # absolute wins
OUTSIDE_PY = OUTSIDE_VENV / "bin" / "python"
CHILD = Path(__file__).resolve().parent / "outside_anchors.py"

MSE = 2.4  # the reference's norm


# ------------------------------------------------------------------ realistic layers


def activations(tokens, d_in, seed, outliers=4, drift=0.03):
    """(X, X_fp): correlated inputs with uneven channel scales and `outliers` channels ~15x larger (as in
    LLM activations), and the full-precision model's inputs for the same tokens, X + a correlated
    perturbation of relative size `drift`."""
    rng = np.random.default_rng(seed)
    mix = np.eye(d_in) + 1.5 * rng.standard_normal((d_in, d_in)) / np.sqrt(d_in)
    scales = rng.lognormal(0.0, 0.5, d_in)
    scales[rng.choice(d_in, outliers, replace=False)] *= 15.0
    X = (rng.standard_normal((tokens, d_in)) @ mix) * scales
    noise = (rng.standard_normal((tokens, d_in)) @ mix) * scales
    X_fp = X + drift * noise * (np.linalg.norm(X) / np.linalg.norm(noise))
    return X, X_fp


def heavy_weights(d_out, d_in, seed):
    rng = np.random.default_rng(seed)
    return 0.02 * rng.standard_t(5, (d_out, d_in))


def without_sym_ties(W, width=64):
    """W with each 64-column segment of each row negated where its largest |w| is negative (the
    distribution is symmetric, so the layer stays as realistic). On a symmetric grid -max|w| sits exactly
    half-way between codes 0 and 1; in float32 GPTQModel's torch.round then decides by division noise and
    ours by snapping to half-even. Before any GPTQ update that happens in the first column processed, and
    the row then follows another path to the end (test_sym_tie_in_first_column records it). With every
    segment's extreme positive, no grid built from unions of segments (per row, g64, g128) has such a tie
    (+max|w| is harmless: codes 15 and 16 both clamp to 15)."""
    W = W.copy()
    for s in range(0, W.shape[1], width):
        seg = W[:, s : s + width]
        flip = -seg.min(1) >= seg.max(1)
        seg[flip] *= -1
    return W


@functools.cache
def layer(d_out, d_in, tokens, seed):
    """W, X, X_fp, H = 2/n X^T X and dXXT = 2/n (X_fp - X)^T X (GPTAQ's statistics, n = tokens), float64."""
    X, X_fp = activations(tokens, d_in, seed)
    W = without_sym_ties(heavy_weights(d_out, d_in, seed + 100))
    H = 2.0 / tokens * X.T @ X
    dXXT = 2.0 / tokens * (X_fp - X).T @ X
    return SimpleNamespace(W=W, X=X, X_fp=X_fp, H=H, dXXT=dXXT)


def gptaq_layer():
    return layer(96, 512, 2048, 1)


def natural_gptaq_weights():
    """gptaq_layer's weights before without_sym_ties."""
    return heavy_weights(96, 512, 101)


def mse_weights():
    return heavy_weights(192, 1024, 7)


def gar_layer():
    return layer(32, 576, 1536, 2)  # 576 = 9 x 64 = 4 x 128 + 64: SmolLM2's width


def tied_hessian(H):
    """H with its diagonal raised to the next power of two: still positive definite (only the diagonal
    grows), and many columns (and some group maxima) now tie."""
    H = H.copy()
    np.fill_diagonal(H, 2.0 ** np.ceil(np.log2(np.diag(H))))
    return H


def codes_of(Q, scale, zero, g_idx):
    """Integer codes of a fake-quantized Q on its (scale, zero) grid (d_out x n_groups)."""
    Q, scale, zero = (np.asarray(a, dtype=np.float64) for a in (Q, scale, zero))
    return np.rint(Q / scale[:, g_idx] + zero[:, g_idx])


def as_np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ------------------------------------------------------------------ the cases for GPTQModel (one child run)

# GPTAQ: (bits, group_size, sym, desc_act, static_groups); ours equals GPTQModel's where its grids are
# right: per row, or static groups
GPTAQ_GRIDS = [
    (4, -1, False, False, False),
    (4, -1, True, True, False),
    (3, 128, False, False, True),
    (4, 128, True, True, True),
]
GPTAQ_ALPHAS = [0.25, 1.0]
# GPTQ and GPTAQ on MSE grids (3 and 4 bits: GPTQModel's 2-bit asymmetric search differs, see below)
GPTAQ_MSE_GRIDS = [(4, -1, False, True, False), (3, 128, True, False, True)]
TIE_GRID = (4, 128, True, True, True)  # sym, desc_act, static g128: the first column's grid is W's own
# RTN grids for GPTQModel's Quantizer: (bits, sym, group_size)
QUANTIZER_GRIDS = [(b, s, g) for b in (2, 3, 4) for s in (False, True) for g in (-1, 128)]
# GAR: (name, group_size, diag source); on gar_layer's tied diagonal the 9 groups of 64 have maxima
# 8192, 128, 128, 64, 128, 2048, 64, 512, 256 (ties between groups too), the 4 of 128 distinct ones
GAR_CASES = [("g64", 64, "real"), ("g128-tail", 128, "real"), ("g64-ties", 64, "ties"),
             ("g128-tail-ties", 128, "ties"), ("g96", 96, "real")]


def gar_hessian(source):
    H = gar_layer().H
    return tied_hessian(H) if source == "ties" else H


def gptaq_name(grid, alpha, blocksize):
    bits, gs, sym, desc, static = grid
    return f"gptaq-{bits}b-g{gs}-{'sym' if sym else 'asym'}{'-desc' if desc else ''}" \
           f"{'-static' if static else ''}-a{alpha:g}-bs{blocksize}"


def child_cases():
    """[(case, arrays)] for tests/outside_anchors.py."""
    L = gptaq_layer()
    d_in = L.W.shape[1]
    cases = []

    def gptaq(grid, alpha, blocksize, W=L.W, H=L.H, dXXT=L.dXXT, name=None, mse=0.0):
        bits, gs, sym, desc, static = grid
        case = {"name": name or gptaq_name(grid, alpha, blocksize), "kind": "gptaq", "bits": bits,
                "group_size": gs, "sym": sym, "desc_act": desc, "static_groups": static, "alpha": alpha,
                "damp": 0.01, "blocksize": blocksize, "nsamples": L.X.shape[0], "mse": mse}
        cases.append((case, {"W": W, "H": H, "dXXT": dXXT}))

    for grid in GPTAQ_GRIDS:
        for alpha in GPTAQ_ALPHAS + [0.0]:
            gptaq(grid, alpha, d_in)
    for alpha in (0.0, 0.25):  # the blocksize dependence (alpha 0: the control, P = 0)
        gptaq(GPTAQ_GRIDS[0], alpha, 128)
        gptaq(GPTAQ_GRIDS[2], alpha, 128)
    # a dead input (zero in both models): GPTQModel zeroes its W column and dXXT column, sets H[d, d] = 1
    W, H, dXXT = L.W.copy(), L.H.copy(), L.dXXT.copy()
    H[7, :] = H[:, 7] = 0
    dXXT[7, :] = dXXT[:, 7] = 0
    gptaq(GPTAQ_GRIDS[0], 0.25, d_in, W, H, dXXT, name="gptaq-dead")
    gptaq(TIE_GRID, 0.0, d_in, W=natural_gptaq_weights(), name="gptaq-tie")
    for grid in GPTAQ_MSE_GRIDS:  # MSE grids inside GPTQ / GPTAQ, GPTQModel's Quantizer(mse) in its loop
        for alpha in (0.0, 0.25):
            gptaq(grid, alpha, d_in, name="mse-" + gptaq_name(grid, alpha, d_in), mse=MSE)

    X, X_fp = activations(300, 64, 3)
    cases.append(({"name": "stats", "kind": "gptaq_stats"}, {"X": X, "X_fp": X_fp}))

    for bits, sym, gs in QUANTIZER_GRIDS:
        case = {"name": f"quantizer-{bits}b-{'sym' if sym else 'asym'}-g{gs}", "kind": "quantizer",
                "bits": bits, "sym": sym, "group_size": gs, "mse": MSE}
        cases.append((case, {"W": mse_weights()}))

    for name, g, source in GAR_CASES:
        diag = np.diag(gar_hessian(source)).copy()
        diag[diag == 0] = 1  # what GPTQ.quantize's dead-column fix does before it orders columns
        cases.append(({"name": f"gar-{name}", "kind": "gar", "group_size": g}, {"diag": diag}))
    return cases


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """name -> {array name: array}: GPTQModel's answers for every case of child_cases(), from one run."""
    if not OUTSIDE_PY.exists():
        why = f"no outside environment at {OUTSIDE_VENV}: build it with scripts/outside_loader_env.sh"
        if os.environ.get("GPTQ_EXPLORER_REQUIRE_OUTSIDE") == "1":  # CI: never skip silently
            pytest.fail(why)
        pytest.skip(why)
    work = tmp_path_factory.mktemp("outside_anchors")
    cases = child_cases()
    arrays = {f"{c['name']}__{k}": v for c, a in cases for k, v in a.items()}
    np.savez(work / "in.npz", cases=np.array(json.dumps([c for c, _ in cases])), **arrays)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1"}
    env.setdefault("GPTQ_EXPLORER_THREADS", "2")
    t0 = time.perf_counter()
    proc = subprocess.run([str(OUTSIDE_PY), str(CHILD), str(work / "in.npz"), str(work / "out.npz")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0 or not (work / "out.npz").exists():
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"outside anchors child failed (rc {proc.returncode}):\n{tail}")
    out = np.load(work / "out.npz")
    meta = json.loads(str(out["meta"]))
    print(f"\n[outside anchors] {time.perf_counter() - t0:.1f} s in the child: {json.dumps(meta)}")
    result = {}
    for key in out.files:
        if "__" in key:
            name, field = key.split("__", 1)
            result.setdefault(name, {})[field] = out[key]
    assert set(result) == {c["name"] for c, _ in cases}
    return result


# ------------------------------------------------------------------ the child, checked on its own


def test_child_gptaq_alpha0_is_plain_gptq(outside):
    """GPTAQ with alpha = 0 is GPTQ (P = 0): the child's GPTQModel run equals our plain GPTQ, which is
    what shows the child feeds GPTQModel the layer, H and the config as we think it does."""
    L = gptaq_layer()
    for grid in GPTAQ_GRIDS:
        bits, gs, sym, desc, static = grid
        theirs = outside[gptaq_name(grid, 0.0, L.W.shape[1])]
        cfg = QuantConfig(bits=bits, group_size=gs, sym=sym, desc_act=desc, static_groups=static)
        ours = gptq_quantize(L.W.astype(np.float32), L.H.astype(np.float32), cfg, dtype=np.float32)
        their_codes = codes_of(theirs["Q"], theirs["scale"], theirs["zero"], theirs["g_idx"])
        agree = float(np.mean(ours.codes == their_codes))
        rel = float(np.linalg.norm(ours.weight - theirs["Q"]) / np.linalg.norm(theirs["Q"]))
        print(f"alpha 0 {cfg.label()}: codes agree {agree:.5f}, rel diff {rel:.2e}")
        np.testing.assert_array_equal(theirs["g_idx"], np.arange(L.W.shape[1]) // cfg.group_width(512))
        assert agree >= 0.999, (cfg.label(), agree)
        np.testing.assert_allclose(ours.scales, theirs["scale"], rtol=1e-5)


def test_sym_tie_in_first_column(outside):
    """Recorded difference, on the layer's natural weights: a row whose group extreme -max|w| is in the
    first column processed. There w / scale is -7.5 in exact arithmetic; GPTQModel (float32) computes
    -7.4999995 and rounds to code 1, ours snaps the tie and rounds half to even, code 0 (both are 1/15 of
    max|w| away). The row's later columns then take another path; every other row agrees."""
    L = gptaq_layer()
    W = natural_gptaq_weights()
    bits, gs, sym, desc, static = TIE_GRID
    first = int(np.argsort(-np.diag(L.H), kind="stable")[0])
    seg = W[:, first // gs * gs : (first // gs + 1) * gs]
    tie_rows = np.nonzero((W[:, first] == seg.min(1)) & (-seg.min(1) >= seg.max(1)))[0]
    assert len(tie_rows) >= 1  # the case this test is about
    theirs = outside["gptaq-tie"]
    cfg = QuantConfig(bits=bits, group_size=gs, sym=sym, desc_act=desc, static_groups=static)
    ours = gptq_quantize(W.astype(np.float32), L.H.astype(np.float32), cfg, dtype=np.float32)
    their_codes = codes_of(theirs["Q"], theirs["scale"], theirs["zero"], theirs["g_idx"])
    differ = ours.codes != their_codes
    print(f"tie rows {tie_rows.tolist()}: {differ[tie_rows].mean():.3f} of their codes differ; other rows "
          f"{differ.mean() - differ[tie_rows].sum() / differ.size:.2e}")
    assert np.all(ours.codes[tie_rows, first] == 0)
    assert np.all(their_codes[tie_rows, first] == 1)
    assert differ[tie_rows].mean() > 0.1
    rest = np.setdiff1d(np.arange(W.shape[0]), tie_rows)
    assert differ[rest].mean() <= 0.001


def test_child_gptaq_stats_are_2_over_n_sums(outside):
    """GPTAQ.process_batch fed one token per row: H = 2/n X^T X and dXXT = 2/n (X_fp - X)^T X, n = tokens."""
    X, X_fp = activations(300, 64, 3)
    theirs = outside["stats"]
    assert int(theirs["nsamples"]) == 300
    H = 2 / 300 * X.T @ X
    np.testing.assert_allclose(theirs["H"], H, rtol=1e-4, atol=1e-6 * np.abs(H).max())
    dxxt = 2 / 300 * (X_fp - X).T @ X
    np.testing.assert_allclose(theirs["dXXT"], dxxt, atol=1e-4 * np.abs(dxxt).max())


# ------------------------------------------------------------------ MSE grid


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_rtn_equals_reference(bits, sym, group_size):
    """Our MSE grid is the paper's Quantizer(mse=True, norm=2.4, grid=100, maxshrink=.8), group by group."""
    W = mse_weights()
    ours = rtn_quantize(W, QuantConfig(bits=bits, group_size=group_size, sym=sym, mse_norm=MSE))
    ref = reference_rtn(W, bits, group_size, sym, mse=True, dtype=torch.float64)
    Q, scale, zero = (a.numpy() for a in ref)
    ref_codes = codes_of(Q, scale, zero, ours.g_idx)
    agree = float(np.mean(ours.codes == ref_codes))
    same_scale = float(np.mean(ours.scales == scale))
    print(f"{bits}-bit {'sym' if sym else 'asym'} g{group_size}: codes {agree:.5f}, scales exactly equal "
          f"{same_scale:.4f}")
    assert agree >= 0.99
    assert same_scale >= 0.95
    np.testing.assert_array_equal(ours.zeros, zero)
    # and the search did something: the min-max grid differs on most rows
    plain = rtn_quantize(W, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    assert np.mean(plain.scales != ours.scales) > 0.5


GPTQ_MSE_CONFIGS = [
    QuantConfig(bits=3, group_size=-1, sym=False, mse_norm=MSE),
    QuantConfig(bits=4, group_size=-1, sym=True, desc_act=True, mse_norm=MSE),
    QuantConfig(bits=4, group_size=128, sym=False, block_size=128, mse_norm=MSE),
    QuantConfig(bits=2, group_size=128, sym=False, desc_act=True, static_groups=True, mse_norm=MSE),
    QuantConfig(bits=3, group_size=64, sym=True, static_groups=True, mse_norm=MSE),
]


@pytest.mark.parametrize("cfg", GPTQ_MSE_CONFIGS, ids=lambda c: c.label())
def test_mse_gptq_equals_reference(cfg):
    """GPTQ on MSE grids = the reference's fasterquant with mse=True where the reference is right (per row,
    group_size == block_size, static groups)."""
    L = gptaq_layer()
    ours = gptq_quantize(L.W, L.H, cfg)
    Q, _ = reference_fasterquant(L.W, L.H, bits=cfg.bits, groupsize=cfg.group_size, sym=cfg.sym,
                                 blocksize=cfg.block_size, actorder=cfg.desc_act,
                                 static_groups=cfg.static_groups, mse=True, dtype=torch.float64)
    same = float(np.mean(np.isclose(ours.weight, Q.numpy(), rtol=0, atol=1e-9)))
    print(f"{cfg.label()}: weights equal {same:.5f}")
    assert same >= 0.99


@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("grid", GPTAQ_MSE_GRIDS, ids=lambda g: gptaq_name(g, 0, 0)[6:-7])
def test_mse_gptq_and_gptaq_equal_gptqmodel(outside, grid, alpha):
    """GPTQModel's GPTAQ.quantize with QuantizeConfig(mse=2.4): its Quantizer searches every grid inside
    the loop (alpha 0 is its plain GPTQ arithmetic). Ours with mse_norm=2.4, in float32."""
    L = gptaq_layer()
    theirs = outside["mse-" + gptaq_name(grid, alpha, L.W.shape[1])]
    cfg = gptaq_cfg(grid, alpha).replace(mse_norm=MSE)
    W, H, dXXT = (a.astype(np.float32) for a in (L.W, L.H, L.dXXT))
    ours = gptq_quantize(W, H, cfg, dXXT=dXXT if alpha else None, dtype=np.float32)
    agree, rel, off, _ = compare_gptaq(ours, theirs, cfg.label())
    assert agree >= 0.999 and off < 1e-3
    plain = gptq_quantize(W, H, cfg.replace(mse_norm=0.0), dXXT=dXXT if alpha else None, dtype=np.float32)
    assert np.mean(plain.scales != ours.scales) > 0.5  # the search moved most grids


def quantizer_name(bits, sym, gs):
    return f"quantizer-{bits}b-{'sym' if sym else 'asym'}-g{gs}"


def pnorm_error(W, Q, width):
    """sum |Q - W|^2.4 per (row, group): what the search minimizes."""
    err = np.abs(Q - W) ** MSE
    return np.stack([err[:, s : s + width].sum(1) for s in range(0, W.shape[1], width)], 1)


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_rtn_vs_gptqmodel_quantizer(outside, bits, sym, group_size):
    """GPTQModel's Quantizer with mse=2.4 picks the paper's grids, except for 2-bit asymmetric ones: there
    it also tries the other integer next to the ideal zero point, and keeps it when its error is lower.
    Measured here: the rows where it moves, and that every move lowers the searched error."""
    W = mse_weights().astype(np.float32)
    theirs = outside[quantizer_name(bits, sym, group_size)]
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, mse_norm=MSE)
    ours = rtn_quantize(W, cfg, dtype=np.float32)
    width = W.shape[1] if group_size == -1 else group_size
    moved = (ours.zeros != theirs["zero"]) | ~np.isclose(ours.scales, theirs["scale"], rtol=1e-6, atol=0)
    share = float(moved.mean())
    e_ours, e_theirs = pnorm_error(W, ours.weight, width), pnorm_error(W, theirs["Q"], width)
    gain = float(1 - e_theirs[moved].sum() / e_ours[moved].sum()) if moved.any() else 0.0
    mse_ratio = float(np.sum((theirs["Q"] - W) ** 2) / np.sum((ours.weight - W) ** 2))
    print(f"{bits}-bit {'sym' if sym else 'asym'} g{group_size}: GPTQModel's grid differs on {share:.4f} of "
          f"the (row, group)s; there its |err|^2.4 is {gain:+.2%} lower; whole layer ||Q - W||^2 theirs/ours "
          f"{mse_ratio:.4f}")
    if bits == 2 and not sym:
        # the adjacent zero point: a real difference on a good share of the rows, always an improvement
        assert share > 0.05
        assert np.all(e_theirs[moved] <= e_ours[moved] * (1 + 1e-5))
        assert gain > 0.01
    else:
        assert share <= 0.01  # float32 near-ties between two shrink factors, at most
        their_codes = codes_of(theirs["Q"], theirs["scale"], theirs["zero"], ours.g_idx)
        assert np.mean(ours.codes == their_codes) >= 0.99


# ------------------------------------------------------------------ ternary


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_ternary_rtn_equals_reference_trits(sym, group_size):
    W = mse_weights()
    ours = rtn_quantize(W, QuantConfig(group_size=group_size, sym=sym, ternary=True))
    ref = reference_rtn(W, 4, group_size, sym, trits=True, dtype=torch.float64)
    Q, scale, zero = (a.numpy() for a in ref)
    np.testing.assert_array_equal(ours.weight, Q)
    np.testing.assert_array_equal(ours.scales, scale)  # xmax
    np.testing.assert_array_equal(ours.zeros, zero)  # xmin
    assert set(np.unique(ours.codes)) == {0, 1, 2}
    np.testing.assert_array_equal(ours.dequantize(), ours.weight)


TERNARY_CONFIGS = [
    QuantConfig(group_size=-1, sym=False, ternary=True),
    QuantConfig(group_size=-1, sym=True, desc_act=True, ternary=True),
    QuantConfig(group_size=128, sym=False, block_size=128, ternary=True),
    QuantConfig(group_size=64, sym=True, desc_act=True, static_groups=True, ternary=True),
]


@pytest.mark.parametrize("cfg", TERNARY_CONFIGS, ids=lambda c: c.label())
def test_ternary_gptq_equals_reference_trits(cfg):
    L = gptaq_layer()
    ours = gptq_quantize(L.W, L.H, cfg)
    Q, _ = reference_fasterquant(L.W, L.H, groupsize=cfg.group_size, sym=cfg.sym, blocksize=cfg.block_size,
                                 actorder=cfg.desc_act, static_groups=cfg.static_groups, trits=True,
                                 dtype=torch.float64)
    same = float(np.mean(np.isclose(ours.weight, Q.numpy(), rtol=0, atol=1e-9)))
    print(f"{cfg.label()}: weights equal {same:.5f}; zeros {np.mean(ours.codes == 1):.3f} of the codes")
    assert same >= 0.99
    assert set(np.unique(ours.codes)) == {0, 1, 2}


# ------------------------------------------------------------------ GAR


def group_aware_perm(outside, name, backend):
    """(our processing order, GPTQModel's, diag(H), d_in, group_size) for a GAR case."""
    _, group_size, source = next(c for c in GAR_CASES if c[0] == name)
    L = gar_layer()
    H = gar_hessian(source)
    diag = np.diag(H)
    assert len(np.unique(diag.astype(np.float32))) == len(np.unique(diag))  # float32 makes no new ties
    cfg = QuantConfig(group_size=group_size, group_aware=True)
    if backend == "numpy":
        res = gptq_quantize(L.W, H, cfg)
    else:
        res = gptq_quantize(torch.tensor(L.W, dtype=torch.float32), torch.tensor(H, dtype=torch.float32), cfg)
    d_in = L.W.shape[1]
    np.testing.assert_array_equal(as_np(res.g_idx), np.arange(d_in) // group_size)  # GAR keeps g_idx
    return as_np(res.perm), np.asarray(outside[f"gar-{name}"]["perm"]), diag, d_in, group_size


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", [c[0] for c in GAR_CASES if c[2] == "real"])
def test_group_aware_order_equals_gptqmodel(outside, name, backend):
    ours, theirs, diag, d_in, group_size = group_aware_perm(outside, name, backend)
    np.testing.assert_array_equal(ours, theirs)
    if d_in % group_size:  # the short last group stays last, in natural order
        tail = np.arange(d_in // group_size * group_size, d_in)
        np.testing.assert_array_equal(theirs[-len(tail):], tail)
        assert not np.array_equal(ours[: -len(tail)], np.arange(d_in - len(tail)))  # the rest did move


def tie_runs_ascending(perm, diag):
    """True when every run of equal diag values inside the order lists its columns in index order (what a
    stable sort gives)."""
    values = diag[perm]
    same = values[1:] == values[:-1]
    return bool(np.all(perm[1:][same] > perm[:-1][same]))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", [c[0] for c in GAR_CASES if c[2] == "ties"])
def test_group_aware_ties_vs_gptqmodel(outside, name, backend):
    """With ties in diag(H): the same groups in the same order (both sort group maxima with a stable
    argsort), and inside every group the same sequence of diag values. Only the order among equal values
    differs: ours is stable (index order); GPTQModel's compute_local_perms uses torch.sort(descending=True),
    which on the CPU (torch 2.13) is not stable. Pinned here, so that a change on either side is noticed.
    (Real Hessians rarely tie exactly; dead columns do, all at 1, and they are all-zero columns whose order
    changes nothing.)"""
    ours, theirs, diag, d_in, group_size = group_aware_perm(outside, name, backend)
    full = d_in // group_size * group_size
    maxima = diag[:full].reshape(-1, group_size).max(1)
    assert len(np.unique(diag)) <= 16  # the case this is about: hundreds of ties inside groups,
    assert len(np.unique(maxima)) < len(maxima) or group_size == 128  # and between group maxima (g64)
    np.testing.assert_array_equal(ours // group_size, theirs // group_size)
    np.testing.assert_array_equal(diag[ours], diag[theirs])
    assert tie_runs_ascending(ours, diag)
    differ = float(np.mean(ours != theirs))
    print(f"{name} ({backend}): {differ:.3f} of the positions differ, all inside runs of equal diag(H)")
    assert not tie_runs_ascending(theirs, diag) and differ > 0.1


# ------------------------------------------------------------------ GPTAQ


def test_hessian_dxxt_equals_gptqmodel(outside):
    X, X_fp = activations(300, 64, 3)
    h = Hessian(64)
    h.add_batch(X[:100], X_fp=X_fp[:100]).add_batch(X[100:], X_fp=X_fp[100:])
    theirs = outside["stats"]
    np.testing.assert_allclose(h.H, theirs["H"], rtol=1e-4, atol=1e-6 * np.abs(h.H).max())
    np.testing.assert_allclose(h.dXXT, theirs["dXXT"], atol=1e-4 * np.abs(h.dXXT).max())
    # torch backend, float32 accumulation
    ht = Hessian(64, backend="torch").add_batch(torch.tensor(X, dtype=torch.float32),
                                                 X_fp=torch.tensor(X_fp, dtype=torch.float32))
    np.testing.assert_allclose(as_np(ht.dXXT), theirs["dXXT"], atol=1e-4 * np.abs(h.dXXT).max())


def gptaq_cfg(grid, alpha, block_size=128):
    bits, gs, sym, desc, static = grid
    return QuantConfig(bits=bits, group_size=gs, sym=sym, desc_act=desc, static_groups=static,
                       gptaq_alpha=alpha, block_size=block_size)


def compare_gptaq(ours, theirs, label, skip_rows=()):
    """(codes agreement, relative ||Q_ours - Q_theirs||, largest difference where the codes agree, in
    units of the row's scale, the rows whose codes differ); rel leaves out skip_rows."""
    their_codes = codes_of(theirs["Q"], theirs["scale"], theirs["zero"], theirs["g_idx"])
    codes = as_np(ours.codes)
    agree = float(np.mean(codes == their_codes))
    Q = as_np(ours.weight).astype(np.float64)
    kept = np.setdiff1d(np.arange(Q.shape[0]), skip_rows)
    rel = float(np.linalg.norm(Q[kept] - theirs["Q"][kept]) / np.linalg.norm(theirs["Q"][kept]))
    step = np.asarray(theirs["scale"], dtype=np.float64)[:, theirs["g_idx"]]
    same = codes == their_codes
    off = float((np.abs(Q - theirs["Q"]) / step)[same].max())
    rows = np.flatnonzero(~same.all(axis=1))
    print(f"{label}: codes agree {agree:.5f}, rel diff {rel:.2e}, max diff where codes agree {off:.1e} steps,"
          f" rows that differ {rows.tolist()}")
    return agree, rel, off, rows


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("alpha", GPTAQ_ALPHAS)
@pytest.mark.parametrize("grid", GPTAQ_GRIDS, ids=lambda g: gptaq_name(g, 0, 0)[6:-7])
def test_gptaq_equals_gptqmodel_one_block(outside, grid, alpha, backend):
    L = gptaq_layer()
    theirs = outside[gptaq_name(grid, alpha, L.W.shape[1])]
    cfg = gptaq_cfg(grid, alpha)
    W, H, dXXT = (a.astype(np.float32) for a in (L.W, L.H, L.dXXT))
    if backend == "numpy":
        ours = gptq_quantize(W, H, cfg, dXXT=dXXT, dtype=np.float32)
    else:
        ours = gptq_quantize(torch.tensor(W), torch.tensor(H), cfg, dXXT=torch.tensor(dXXT))
    agree, rel, off, rows = compare_gptaq(ours, theirs, f"{backend} {cfg.label()}")
    # float32 (the torch path's R form sums in other orders than GPTQModel): a near-tie may round the other
    # way, and that row's later columns then follow another path. One such row at most, every other row
    # exact (measured with an AVX-512 CPU's float32 sums: 3-bit g128 static, alpha 0.25, torch, row 89
    # from column 190 on, 0.17% of the codes; our NumPy float32 and float64 agree with GPTQModel there).
    assert len(rows) <= 1 and agree >= 0.995
    assert off < 1e-3  # where the codes agree, the grids agree to float32 precision
    if len(rows):
        rel = compare_gptaq(ours, theirs, "without that row", skip_rows=rows)[1]
    assert rel < 0.01
    # and GPTAQ is not GPTQ here: alpha moved a good share of the codes
    plain = outside[gptaq_name(grid, 0.0, L.W.shape[1])]
    moved = np.mean(codes_of(plain["Q"], plain["scale"], plain["zero"], plain["g_idx"]) != as_np(ours.codes))
    assert moved > 0.05


def test_gptaq_dead_input_equals_gptqmodel(outside):
    L = gptaq_layer()
    H, dXXT = L.H.copy(), L.dXXT.copy()
    H[7, :] = H[:, 7] = 0
    dXXT[7, :] = dXXT[:, 7] = 0
    cfg = gptaq_cfg(GPTAQ_GRIDS[0], 0.25)
    ours = gptq_quantize(L.W.astype(np.float32), H.astype(np.float32), cfg, dXXT=dXXT.astype(np.float32),
                         dtype=np.float32)
    agree, rel, _, _ = compare_gptaq(ours, outside["gptaq-dead"], "dead input")
    assert np.all(ours.weight[:, 7] == 0)
    assert agree >= 0.999 and rel < 0.01


def test_gptaq_needs_dxxt():
    L = gptaq_layer()
    with pytest.raises(ValueError, match="dXXT"):
        gptq_quantize(L.W, L.H, QuantConfig(gptaq_alpha=0.25))


@pytest.mark.parametrize("grid", [GPTAQ_GRIDS[0], GPTAQ_GRIDS[2]], ids=["per-row", "static-g128"])
def test_gptaq_gptqmodel_depends_on_blocksize_ours_does_not(outside, grid):
    """GPTQModel's after-block update subtracts W1 @ P with W1 already rounded (its in-block update used the
    pre-rounding w): blocksize 128 and blocksize 512 give different layers on a 512-wide one. With alpha = 0
    (P = 0) the same two runs agree, so the difference is that term. Ours gives identical codes for every
    block size. Measured once on SmolLM2 block 5 (q_proj, down_proj; 4-bit per row and static g128, alpha
    0.25, inputs of a model RTN-quantized up to that block): blocksize 128 moves 8 % (q_proj) and 17 %
    (down_proj) of GPTQModel's codes, yet changes GPTAQ's objective ||W X_fp - Q X|| by -0.02 % to +0.17 %."""
    L = gptaq_layer()
    d_in = L.W.shape[1]

    def diff(alpha):
        a, b = outside[gptaq_name(grid, alpha, 128)], outside[gptaq_name(grid, alpha, d_in)]
        codes_a = codes_of(a["Q"], a["scale"], a["zero"], a["g_idx"])
        codes_b = codes_of(b["Q"], b["scale"], b["zero"], b["g_idx"])
        rel = np.linalg.norm(a["Q"] - b["Q"]) / np.linalg.norm(b["Q"])
        return float(np.mean(codes_a != codes_b)), float(rel)

    moved, rel = diff(0.25)
    moved0, rel0 = diff(0.0)
    print(f"GPTQModel blocksize 128 vs {d_in}: alpha 0.25 moves {moved:.4f} of the codes (rel {rel:.2e}); "
          f"alpha 0: {moved0:.5f} (rel {rel0:.2e})")
    assert moved > 0.01 and rel > 1e-3
    assert moved0 <= 0.001

    cfg = gptaq_cfg(grid, 0.25)
    runs = [gptq_quantize(L.W, L.H, cfg.replace(block_size=b), dXXT=L.dXXT) for b in (16, 128, d_in)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.codes, runs[0].codes)
