"""gptq_explorer.lessons.after_gptq (lesson 9): the methods' tables on a synthetic layer, GPTAQ's two input
streams, Babai's nearest plane against the engine's GPTQ code for code, the enumeration against brute force,
and the claims the lesson makes from its stored run (data/results/lessons/after_gptq.json)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_lessons_real_layers import as_real_layers

from gptq_explorer import QuantConfig, gptq_quantize, lessons
from gptq_explorer.lessons import after_gptq as L

CONFIGS = (QuantConfig(bits=3, group_size=64), QuantConfig(bits=3, group_size=-1),
           QuantConfig(ternary=True, group_size=64))


@pytest.fixture(scope="module")
def study(synth):
    return L.method_study(as_real_layers(synth), CONFIGS)


def test_method_study_rows_and_tables(study):
    labels = [c.label() for c in CONFIGS]
    counts = {cfg: sum(r["config"] == cfg for r in study) for cfg in labels}
    assert counts == {labels[0]: len(L.METHODS), labels[1]: len(L.METHODS) - 1,  # no GAR without groups
                      labels[2]: len(L.TERNARY_METHODS)}
    for cfg in labels:
        gptq = L.pick(study, config=cfg, method="GPTQ")
        assert gptq["calibration error"] < L.pick(study, config=cfg, method="RTN")["calibration error"]
        assert L.ratios(study, cfg, "GPTQ") == {"block 3 down_proj": 1.0}
        for m in ("RTN + MSE grid",):  # the search lowers the weight error it is built for
            assert L.pick(study, config=cfg, method=m)["weight error"] < L.pick(study, config=cfg,
                                                                              method="RTN")["weight error"]
    summary = L.method_summary(study)
    assert all(r["vs GPTQ"] == 1.0 for r in summary if r["method"] == "GPTQ")
    assert {r["layers better than GPTQ"] for r in summary} <= {"0/1", "1/1"}
    table = L.pivot(study, ["RTN", "GPTQ", "GPTQ + GAR"], labels[:2])
    assert [(r["config"], r["method"]) for r in table] == [(labels[0], "RTN"), (labels[0], "GPTQ"),
                                                           (labels[0], "GPTQ + GAR"), (labels[1], "RTN"),
                                                           (labels[1], "GPTQ")]
    assert table[1]["vs GPTQ"] == 1.0 and table[1]["block 3 down_proj"] == table[1]["geometric mean"]
    with pytest.raises(KeyError, match="0 rows"):
        L.pick(study, method="nothing")
    with pytest.raises(KeyError, match="rows match"):
        L.pick(study, method="GPTQ")  # one per config


def test_methods_are_the_engine_knobs(synth):
    W, H = np.asarray(synth.W), np.asarray(synth.H)
    cfg = QuantConfig(bits=4, group_size=64)
    assert "GPTQ + GAR" not in L.methods_for(QuantConfig(group_size=-1))
    assert L.methods_for(QuantConfig(ternary=True)) is L.TERNARY_METHODS
    for m, changes in (("GPTQ + GAR", {"group_aware": True}), ("GPTQ + rotation", {"rotation": "hadamard"}),
                       ("GPTQ + MSE grid", {"mse_norm": 2.4})):
        ours = L.quantize_with(W, H, cfg, m)
        assert np.array_equal(ours, gptq_quantize(W, H, cfg.replace(**changes)).weight)


def test_rotation_facts_and_incoherence(synth):
    n = 192
    spike = np.zeros((1, n))
    spike[0, 5] = 3.0
    assert L.incoherence(spike) == pytest.approx(np.sqrt(n))
    assert L.incoherence(np.ones((2, n))) == pytest.approx(1.0)
    facts = L.rotation_facts(np.asarray(synth.W), np.asarray(synth.H))
    assert facts["orthogonal"] and facts["construction"].endswith("(dense)")  # 192 = 16 x 12
    assert facts["diag(H) max/median after"] < facts["diag(H) max/median before"] / 3
    assert L.diag_spread(np.eye(4)) == 1.0


def test_ternary_zero_share(synth):
    W, H = np.asarray(synth.W), np.asarray(synth.H)
    z = L.ternary_zero_share(W, H, tuple(L.TERNARY_METHODS))
    assert set(z) == set(L.TERNARY_METHODS) and all(0 < v < 1 for v in z.values())
    assert z["RTN + MSE grid"] < z["RTN"]  # a shrunk range has a smaller dead zone
    assert L.ternary_zero_share(np.zeros((2, 8)) + 1.0)["RTN"] == 0.0


def test_gptaq_study_on_a_synthetic_pair(synth):
    """X = X_fp + a small perturbation (what the synthetic source's GPTAQ construction does)."""
    rng = np.random.default_rng(0)
    Xc_fp, Xh_fp = np.asarray(synth.X_calib), np.asarray(synth.X_heldout)
    Xc = Xc_fp + 0.2 * Xc_fp.std(axis=0) * rng.standard_normal(Xc_fp.shape)
    Xh = Xh_fp + 0.2 * Xh_fp.std(axis=0) * rng.standard_normal(Xh_fp.shape)
    fp = as_real_layers(synth)
    q = as_real_layers(synth, X_calib={"prose": Xc}, X_heldout={"prose": Xh})
    rows = L.gptaq_study(fp, q, QuantConfig(bits=3, group_size=64), alphas=(0.25, 1.0))
    assert [r["method"] for r in rows] == ["layer not quantized", "RTN", "GPTQ", "GPTAQ alpha=0.25",
                                           "GPTAQ alpha=1"]
    cal = {r["method"]: r["calibration error vs FP"] for r in rows}
    assert cal["GPTAQ alpha=1"] < cal["GPTAQ alpha=0.25"] < cal["GPTQ"] < cal["RTN"]
    assert rows[0]["input drift"] == pytest.approx(np.linalg.norm(Xh - Xh_fp) / np.linalg.norm(Xh_fp))
    W = np.asarray(synth.W)
    assert L.fp_output_error(W, W, Xh_fp, Xh_fp) == 0.0
    assert rows[0]["held-out error vs FP"] == pytest.approx(L.fp_output_error(W, W, Xh, Xh_fp))


def test_capture_quantized_stream_restores_the_model(tiny_lm, monkeypatch):
    from gptq_explorer.models import get_weight, quantizable_modules

    mods = quantizable_modules(tiny_lm.model, tiny_lm.adapter)
    before = {n: get_weight(m).detach().clone() for n, m in mods.items()}
    spec, kw = [(1, "mlp.down_proj")], {"nsamples": 2, "seqlen": 32, "heldout_tokens": 64}
    fp = L.load_real_layers(tiny_lm, spec, **kw)
    qs = L.capture_quantized_stream(tiny_lm, spec, blocks=1, cfg=QuantConfig(bits=2), **kw)
    same = L.capture_quantized_stream(tiny_lm, spec, blocks=0, **kw)
    key = ("model.layers.1.mlp.down_proj", "prose")
    assert qs.X_calib[key].shape == fp.X_calib[key].shape
    assert qs.X_heldout[key].shape == fp.X_heldout[key].shape
    assert not np.allclose(qs.X_calib[key], fp.X_calib[key])  # block 0 quantized: block 1 sees other inputs
    assert np.array_equal(same.X_calib[key], fp.X_calib[key])  # nothing quantized: the same tokens, same X
    assert all(np.array_equal(get_weight(m), before[n]) for n, m in mods.items())

    def fail(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(L, "load_real_layers", fail)
    with pytest.raises(RuntimeError, match="capture failed"):
        L.capture_quantized_stream(tiny_lm, spec, blocks=2, **kw)
    assert all(np.array_equal(get_weight(m), before[n]) for n, m in mods.items())  # restored on an error


def test_babai_is_gptq_code_for_code():
    for r in L.babai_agreement(dims=(2, 4, 7), problems=8, rows=4, seed=1):
        assert r["problems"] == 32
        assert r["back = Babai(U)"] == r["front = Babai(reversed)"] == r["back = Babai(sqrt H)"] == 1.0
        assert r["within bound"] == 1.0 and r["GPTQ / closest (mean)"] >= 1.0
        assert r["GPTQ < RTN"] + r["GPTQ = RTN"] + r["GPTQ > RTN"] == pytest.approx(1.0)


def test_babai_by_hand():
    assert np.array_equal(L.babai_nearest_plane(2 * np.eye(3), [2.9, -1.1, 0.2]), [1, -1, 0])
    B = np.array([[1.0, 0.9], [0.0, 0.5]])  # columns b1 = (1, 0), b2 = (0.9, 0.5)
    # nearest plane: c2 = round(0.74 / 0.5) = 1; then c1 = round(1.2 - 0.9) = 0
    assert np.array_equal(L.babai_nearest_plane(B, [1.2, 0.74]), [0, 1])
    assert L.babai_bound(B) == pytest.approx((1 + 0.25) / 4)
    J = L._lower_factor(np.array([[2.0, 0.5], [0.5, 1.0]]))
    assert J[0, 1] == 0 and np.allclose(J.T @ J, [[2.0, 0.5], [0.5, 1.0]])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_closest_point_is_the_brute_force_minimum(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        B = (rng.standard_normal((n, n)) + 2 * np.eye(n)) @ np.diag(rng.uniform(0.3, 2, n))
        t = rng.uniform(-5, 5, n)
        c = L.closest_point(B, t)
        # brute force over the box that holds every point as close as Babai's: |c_i - x_i| <= sqrt(r G_ii)
        x, G = np.linalg.solve(B, t), np.linalg.inv(B.T @ B)
        r = np.sum((B @ L.babai_nearest_plane(B, t) - t) ** 2)
        half = np.sqrt(r * np.diag(G))
        if np.prod(2 * half + 1) > 2e4:  # an ill-conditioned basis: too large a box for brute force
            continue
        box = itertools.product(*[range(int(np.ceil(a - h)), int(np.floor(a + h)) + 1)
                                  for a, h in zip(x, half, strict=True)])
        best = min(np.sum((B @ np.array(b) - t) ** 2) for b in box)
        assert np.sum((B @ c - t) ** 2) == pytest.approx(best, rel=1e-12)
        assert np.sum((B @ c - t) ** 2) <= np.sum((B @ L.babai_nearest_plane(B, t) - t) ** 2) + 1e-12
    with pytest.raises(ValueError, match="no lattice point"):
        L.closest_point(np.eye(2), [0.5, 0.5], radius2=0.1)


def test_gptq_unclipped_refuses_clipping():
    H = np.array([[1.0, 0.5], [0.5, 1.0]])
    c, Hd = L.gptq_unclipped([[3.4, -2.6]], H, 1.0)
    assert np.array_equal(c, [[3.0, -2.0]]) or np.array_equal(c, [[3.0, -3.0]])
    assert Hd[0, 0] == pytest.approx(1.01) and Hd[0, 1] == 0.5  # the engine's 1% damping
    with pytest.raises(ValueError, match="clipped"):
        L.gptq_unclipped([[300.0, 1.0]], H, 1.0)


def test_the_lesson_examples():
    ex2 = L.lattice_example(**L.EXAMPLE_2D)
    e, c = ex2.error, ex2.codes
    assert np.array_equal(c["GPTQ (back to front)"], c["Babai, basis U (H = U^T U)"])
    assert [c[k].tolist() for k in ("RTN", "GPTQ (back to front)", "closest point (enumeration)")] == [
        [0, 0], [1, 0], [0, 1]]
    assert (e["RTN"], e["GPTQ (back to front)"], e["closest point (enumeration)"]) == pytest.approx(
        (0.511425, 0.195425, 0.132425))
    assert e["GPTQ (back to front)"] <= ex2.bound
    ex3 = L.lattice_example(**L.EXAMPLE_3D)
    e3 = ex3.error
    order = ("closest point (enumeration)", "GPTQ (back to front)", "GPTQ (front to back)", "RTN")
    assert [e3[k] for k in order] == sorted(e3[k] for k in order) and len({e3[k] for k in order}) == 4
    assert len({tuple(v) for v in ex3.codes.values()}) == 4 and e3["GPTQ (back to front)"] <= ex3.bound
    rows = ex3.rows()
    assert min(r["vs closest point"] for r in rows) == 1.0 and rows[0]["coefficients"] == "[0, 0, 0]"
    assert len(L.fig_lattice_2d(ex2).data) > 20 and len(L.fig_lattice_3d(ex3).data) == 6


# ---- the stored run and the lesson's claims


@pytest.fixture(scope="module")
def stored():
    return lessons.stored("after_gptq")


def test_stored_run_is_complete(stored):
    full = stored["methods"]
    for cfg in L.STORED_CONFIGS:
        for m in L.methods_for(cfg):
            for layer in ("block 5 q_proj", "block 5 up_proj", "block 5 down_proj"):
                L.pick(full, config=cfg.label(), method=m, layer=layer)
    assert len(full) == 3 * sum(len(L.methods_for(c)) for c in L.STORED_CONFIGS)
    assert len(stored["gptaq"]) == 3 * 2 * 5 and set(stored["rotation"]) == set(stored["ternary zeros"])


def test_stored_claims(stored):
    """The claims notebooks/09_after_gptq.ipynb asserts, on the same stored numbers."""
    full, G = stored["methods"], stored["gptaq"]
    summary = L.method_summary(full)

    def vs_gptq(cfg, m):
        return L.pick(summary, config=cfg, method=m)["vs GPTQ"]

    uniform = ("4-bit g128 sym", "3-bit g128 sym", "3-bit per-row sym", "2-bit g128 sym")
    # MSE grid: better inside GPTQ everywhere, more on coarser grids; RTN's output error up on q_proj
    gains = [vs_gptq(cfg, "GPTQ + MSE grid") for cfg in uniform]
    assert gains == sorted(gains, reverse=True) and 0.90 < gains[0] < 0.96 and 0.65 < gains[-1] < 0.73
    assert all(v < 0.97 for cfg in uniform for v in L.ratios(full, cfg, "GPTQ + MSE grid").values())
    assert L.ratios(full, "3-bit g128 sym", "RTN + MSE grid", base="RTN")["block 5 q_proj"] > 1.01
    # GAR: better than columns in order, not better than desc_act (+ static_groups)
    for cfg in ("4-bit g128 sym", "3-bit g128 sym"):
        assert all(v < 1 for v in L.ratios(full, cfg, "GPTQ + GAR").values())
        assert vs_gptq(cfg, "GPTQ + GAR") > vs_gptq(cfg, "GPTQ + desc_act")
        assert all(v > 1 for v in L.ratios(full, cfg, "GPTQ + GAR", base="GPTQ + desc_act + static_groups")
                   .values())
    # GPTAQ
    vs_fp = "held-out error vs FP"
    assert all(v < 0.95 for v in L.ratios(G, "4-bit g128 sym", "GPTAQ alpha=0.25", key=vs_fp).values())
    assert all(v < 0.99 for v in L.ratios(G, "4-bit g128 sym", "GPTAQ alpha=0.25", base="layer not quantized",
                                          key=vs_fp).values())
    assert L.ratios(G, "4-bit g128 sym", "GPTAQ alpha=1", key=vs_fp)["block 5 down_proj"] > 1.01
    assert all(0.2 < r["input drift"] < 0.5 for r in G)
    # rotation
    for cfg in uniform:
        assert all(v < 0.98 for v in L.ratios(full, cfg, "GPTQ + rotation").values())
    assert all(f["diag(H) max/median after"] < 0.1 * f["diag(H) max/median before"]
               for f in stored["rotation"].values())
    # ternary
    tern = "ternary g128 sym"
    assert L.ratios(full, tern, "GPTQ", base="RTN")["block 5 down_proj"] > 1.05
    two_bit = {r["layer"]: r["held-out error"] for r in full if r["config"] == "2-bit g128 sym"
               and r["method"] == "GPTQ"}
    assert all(r["held-out error"] < 0.95 * two_bit[r["layer"]] for r in full
               if r["config"] == tern and r["method"] == "GPTQ + MSE grid")
    assert all(z["RTN"] > 0.8 and z["RTN + MSE grid"] < 0.55 for z in stored["ternary zeros"].values())


@pytest.mark.slow
def test_live_q_proj_is_the_stored_run(smollm2, stored):
    """What the notebook computes live (block 5 q_proj) equals the stored run."""
    layers = L.load_real_layers(smollm2, L.LESSON_LAYERS[:1], **L.CAPTURE)
    live = L.method_study(layers, (QuantConfig(bits=3),),
                          methods=["RTN", "GPTQ", "GPTQ + GAR", "GPTQ + rotation"])
    q_stream = L.capture_quantized_stream(smollm2, L.LESSON_LAYERS[:1])
    live_gptaq = L.gptaq_study(layers, q_stream, QuantConfig(bits=4))
    for rows, part, key in ((live, "methods", "held-out error"),
                            (live_gptaq, "gptaq", "held-out error vs FP")):
        for r in rows:
            s = L.pick(stored[part], layer=r["layer"], config=r["config"], method=r["method"])
            assert r[key] == pytest.approx(s[key], rel=2e-3)
