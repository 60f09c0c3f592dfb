"""gptq_explorer.lessons.step_by_step (lesson 3) on synthetic layers, checked against the engine and direct
computations; the slow test pins the numbers lessons 2 and 3 quote for the real SmolLM2 layer (the
notebooks assert the same values under nbval)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gptq_explorer import QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.engine.grid import grid_params
from gptq_explorer.lessons import step_by_step as L
from gptq_explorer.lessons.obs_update import lesson2_summary, pick_triplet
from gptq_explorer.lessons.seed_lesson import lesson_simplified_gptq


@pytest.mark.parametrize("desc_act", [False, True])
def test_stepper_frames_rebuild_the_engine_result(small, desc_act):
    cfg = QuantConfig(group_size=-1, desc_act=desc_act)
    sf = L.stepper_frames(small, rows=slice(4, 12), cols=slice(8, 20), cfg=cfg)
    assert sf.states.shape == (13, 8, 12) and np.array_equal(sf.states[0], sf.W0)
    assert np.max(np.abs(sf.states[-1] - sf.result.weight)) <= 1e-12
    assert sf.losses.sum() == pytest.approx(sf.result.loss, rel=1e-12)
    assert list(sf.rows) == list(range(4, 12)) and list(sf.cols) == list(range(8, 20))
    fig = L.fig_stepper(sf)
    assert len(fig.frames) == 13 and len(fig.layout.sliders[0].steps) == 13
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["▶ play", "❚❚ pause"]
    step = sf.result.scales[:, sf.result.g_idx]
    assert np.allclose(np.asarray(fig.frames[-1].data[0].z), (sf.states[-1] - sf.W0) / step)


def test_any_order_works_and_desc_act_is_an_order(layer):
    W, H = np.asarray(layer.W), np.asarray(layer.H)
    cfg = QuantConfig(group_size=-1)
    natural = L.gptq_in_order(W, H, np.arange(W.shape[1]), cfg)
    assert np.array_equal(natural, gptq_quantize(W, H, cfg).weight)
    desc = L.gptq_in_order(W, H, np.argsort(-np.diag(H), kind="stable"), cfg)
    assert np.allclose(desc, gptq_quantize(W, H, cfg.replace(desc_act=True)).weight, atol=1e-12)
    rows = L.order_study(layer, n_random=2)
    assert len(rows) == 6 and rows[0]["order"].startswith("round")
    assert all(r["calibration error"] < rows[0]["calibration error"] for r in rows[1:])


def test_obq_fixed_order_is_gptq_and_greedy_is_rtn_on_diagonal_h(small):
    W, H = np.asarray(small.W)[:6, :16], np.asarray(small.H)[:16, :16]
    cfg = QuantConfig(group_size=-1)
    order = np.random.default_rng(0).permutation(16)
    fixed = L.obq_greedy(W, H, cfg, order=order)
    assert np.allclose(fixed, L.gptq_in_order(W, H, order, cfg), atol=1e-12)
    D = np.diag(np.diag(H))
    assert np.allclose(L.obq_greedy(W, D, cfg), rtn_quantize(W, cfg).weight, atol=1e-15)
    scale, zero = grid_params(W, 4, True)
    for rule in (True, False):  # every weight ends on its row's grid
        codes = L.obq_greedy(W, H, cfg, outlier_rule=rule) / scale[:, None] + zero[:, None]
        assert np.allclose(codes, np.round(codes), atol=1e-9)
        assert codes.min() > -1e-9 and codes.max() < 15 + 1e-9
    rows = L.greedy_vs_fixed(small, rows=slice(0, 6), cols=slice(0, 16), n_random=1)
    assert [r["method"] for r in rows][-2].startswith("OBQ") and len(rows) == 5
    counts = L.downdate_counts(576, 576)
    assert counts == {"shared order (GPTQ)": 576, "own order per row (OBQ)": 331_776}


def test_block_size_changes_speed_not_result(layer):
    r = L.block_size_study(np.asarray(layer.W), np.asarray(layer.H), sizes=(1, 7, 128), repeats=1)
    assert r["codes_differ"] == 0 and r["max_abs_diff"] < 1e-12
    assert set(r["seconds"]) == {1, 7, 128} and r["speedup"] > 0


def test_rows_of_u_are_the_downdated_inverse_rows(layer):
    c = L.cholesky_rows_check(layer.H, every=5)
    assert c["n"] == 300 and c["checked_direct"] == 60
    assert c["max_rel_direct"] < 1e-10 and c["max_rel_downdate"] < 1e-10


def test_column_loop_reproduces_engine_and_seed_loop(layer):
    W, H = np.asarray(layer.W), np.asarray(layer.H)
    X = np.asarray(layer.X_calib, dtype=np.float64)
    engine = gptq_quantize(W, H, QuantConfig()).weight
    assert np.allclose(L.column_loop(W, H, "row-group", True), engine, atol=1e-12)
    seed = lesson_simplified_gptq(W, X)
    assert np.allclose(L.column_loop(W, H, "seed-column", False), seed, atol=1e-12)
    assert np.array_equal(L.column_rtn(W), rtn_quantize(W, QuantConfig()).weight)
    seed_rtn = L.column_rtn(W, "seed-column")
    # each column's peak is on its grid
    assert np.allclose(np.abs(seed_rtn).max(axis=0), np.abs(W).max(axis=0))
    with pytest.raises(ValueError, match="grid"):
        L.column_loop(W, H, "per-tensor")


def test_downdate_study_table(layer):
    rows = L.downdate_study(layer)
    assert len(rows) == 6
    err = {(r["grid"].split()[0], r["method"]): r["calibration error"] for r in rows}
    for grid in ("GPTQ's", "seed"):
        assert err[(grid, "H^-1 downdated (GPTQ)")] < err[(grid, "round to nearest")]
    s = L.lesson3_summary(orders=L.order_study(layer, n_random=1), downdate=rows,
                                greedy=L.greedy_vs_fixed(layer, slice(0, 4), slice(0, 12), n_random=1))
    assert set(L.lesson3_claims(s)) >= {"orders_vs_rtn", "kept_without_downdate_seed_grid"}


@pytest.mark.slow
def test_real_layer_numbers_quoted_by_lessons_2_and_3():
    from gptq_explorer.services.layer_source import ModelSource

    source = ModelSource(block=5, sublayer="self_attn.q_proj", nsamples=16, seqlen=256, heldout_tokens=1024)
    layer = source.load()
    t = pick_triplet(layer)
    assert t.row == 437 and t.cols == (247, 260, 100)
    s2 = lesson2_summary(layer)
    assert s2["correction_ratio"] == pytest.approx(22.13, abs=0.05)
    assert s2["rtn_over_gptq123"] == pytest.approx(2.201, abs=0.01)
    assert s2["gptq123_over_best"] == pytest.approx(12.34, abs=0.05) and s2["some_order_finds_best"]
    s3 = L.lesson3_summary(layer)
    d = s3["downdate_heldout"]
    assert d["GPTQ's / round to nearest"] == pytest.approx(0.0871, abs=5e-4)
    assert d["GPTQ's / H^-1 not downdated"] == pytest.approx(0.0828, abs=5e-4)
    assert d["GPTQ's / H^-1 downdated (GPTQ)"] == pytest.approx(0.0536, abs=5e-4)
    c = L.lesson3_claims(s3)
    assert c["left_to_right_worst"] and c["desc_act_best"] and c["greedy_not_better_than_best_shared"]
    assert c["kept_without_downdate_gptq_grid"] < 0.3 and c["kept_without_downdate_seed_grid"] < 0.3
    assert math.isclose(c["orders_vs_rtn"], 0.6234, abs_tol=0.01)
