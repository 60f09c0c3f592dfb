"""gptq_explorer.lessons: the logic behind notebooks 01-03, checked against direct computations.

Fast tests use synthetic layers and a tiny random LLaMA; the slow test pins the numbers the lessons quote
for the real SmolLM2 layer (the notebooks assert the same values under nbval).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest_models import make_tiny_model, one_thread  # noqa: F401

from gptq_explorer import Hessian, QuantConfig, gptq_quantize, lessons, rtn_quantize
from gptq_explorer.engine.grid import grid_params
from gptq_explorer.experiments import lesson_simplified_gptq
from gptq_explorer.ui.layer_source import LayerData, SyntheticSource


@pytest.fixture(scope="module")
def layer():
    """A correlated synthetic layer (32 x 300, so groups of 128 leave a short last group)."""
    return SyntheticSource(d_out=32, d_in=300, n_calib=1024, n_heldout=512, seed=3, rank=24).load()


@pytest.fixture(scope="module")
def small():
    return SyntheticSource(d_out=24, d_in=48, n_calib=512, n_heldout=256, seed=1, rank=12).load()


# ---------------------------------------------------------------------------------------------------------
# common


def test_setup_threads(monkeypatch):
    n = torch.get_num_threads()
    try:
        monkeypatch.setenv("GPTQ_EXPLORER_THREADS", "2")
        assert lessons.setup() == 2
        monkeypatch.setenv("GPTQ_EXPLORER_THREADS", "nonsense")
        assert lessons.setup() == 1
        assert lessons.setup(1) == 1
    finally:
        torch.set_num_threads(n)


def test_show_embeds_plotly_once_and_no_cdn(monkeypatch):
    import plotly.graph_objects as go

    monkeypatch.setattr(lessons, "_PLOTLYJS_SENT", False)
    fig = go.Figure(go.Scatter(y=[1, 3, 2]))
    first, second = lessons.show(fig).html(), lessons.show(fig)._repr_html_()
    assert len(first) > 3_000_000 and "window.Plotly = Plotly" in first  # the library, inline
    assert len(second) < 100_000 and "Plotly.newPlot" in second
    for h in (first, second):
        assert "<script src=" not in h and 'src="http' not in h  # nothing fetched: no CDN, no MathJax tag
        assert "cdnjs" not in h and "tex-svg" not in h
    assert "cdn.plot.ly" not in second  # (plotly.js itself mentions it, for geo maps we never draw)


def test_html_table_formats_and_escapes():
    t = lessons.html_table([{"a<b": 0.000012345, "x": 1234.5678, "s": "<i>"}], caption="c&d")._repr_html_()
    assert "a&lt;b" in t and "1.234e-05" in t and "1235" in t and "&lt;i&gt;" in t and "c&amp;d" in t
    assert lessons.html_table([])._repr_html_() == "<p>(empty)</p>"


def test_relative_errors_match_direct_computation(small):
    W = np.asarray(small.W)
    Q = rtn_quantize(W, QuantConfig(group_size=16)).weight
    X = np.asarray(small.X_calib, dtype=np.float64)
    direct = np.linalg.norm(X @ (W - Q).T) / np.linalg.norm(X @ W.T)
    assert lessons.output_rel_error(W, Q, small.H) == pytest.approx(direct, rel=1e-10)
    assert lessons.rel_error(Q, W) == pytest.approx(np.linalg.norm(W - Q) / np.linalg.norm(W))
    assert lessons.rel_error(torch.tensor(Q), torch.tensor(W)) == pytest.approx(lessons.rel_error(Q, W))


# ---------------------------------------------------------------------------------------------------------
# lesson 1 on a tiny random LLaMA


def test_grid_facts(small):
    f = lessons.grid_facts(small.W, QuantConfig(group_size=16))
    assert f["max_scale_rel_gap"] < 1e-12 and f["zeros"] == [8] and f["codes"] == (0, 15)
    f3 = lessons.grid_facts(small.W, QuantConfig(bits=3, group_size=-1))
    assert f3["zeros"] == [4] and f3["codes"][1] <= 7


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from gptq_explorer.models import load_model

    folder = make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return load_model(str(folder))


def test_rtn_error_study_tiny_model(tiny_lm):
    from gptq_explorer.data import evaluation_ids
    from gptq_explorer.metrics import perplexity
    from gptq_explorer.models import (
        catch_block_inputs,
        get_weight,
        quantizable_modules,
        run_blocks,
        set_weight,
    )

    model = tiny_lm.model
    before = copy.deepcopy(model.state_dict())
    cfg = QuantConfig(bits=3, group_size=32)
    s = lessons.rtn_error_study(tiny_lm, cfg, n_windows=2, seqlen=32, layer_token_stride=1, top_channels=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is restored

    assert s.n_blocks == 2 and len(s.layers) == 2 * 7 and len(s.cumulative_rest) == 2
    assert s.cumulative[0] == pytest.approx(s.isolated[0], abs=1e-12)
    assert all(0 < e < 1 for e in s.isolated) and all(0 < x <= 1 for x in s.top_share)
    assert s.amplification()[0] == pytest.approx(1.0)

    ids = evaluation_ids(tiny_lm.tokenizer, "prose", n_tokens=64)
    assert s.ppl_fp == pytest.approx(perplexity(model, ids, seqlen=32, progress=False).ppl, rel=1e-5)

    # one layer's own output error, from its FP input captured with a hook
    mod = quantizable_modules(model)["model.layers.1.mlp.down_proj"]
    seen = []
    handle = mod.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids.view(2, 32), use_cache=False)
    handle.remove()
    X, W = seen[0].double(), get_weight(mod).double()
    Q = torch.as_tensor(rtn_quantize(get_weight(mod).float().clone(), cfg).weight).double()
    direct = float((X @ (W - Q).T).norm() / (X @ W.T).norm())
    got = next(e for e in s.layers if e.name == "model.layers.1.mlp.down_proj")
    assert got.block == 1 and got.sublayer == "mlp.down_proj"
    assert got.output_rel == pytest.approx(direct, rel=1e-4)

    # every block rounded: the last hidden state and the perplexity match a fully RTN-quantized copy
    qmodel = copy.deepcopy(model)
    for m in quantizable_modules(qmodel).values():
        set_weight(m, rtn_quantize(get_weight(m).float().clone(), cfg).weight)
    assert s.ppl_rtn == pytest.approx(perplexity(qmodel, ids, seqlen=32, progress=False).ppl, rel=1e-5)
    inp = catch_block_inputs(model, ids.view(2, 32))
    fp_last = run_blocks(tiny_lm.adapter.get_blocks(model), inp)
    q_last = run_blocks(tiny_lm.adapter.get_blocks(qmodel), inp)
    assert s.cumulative[-1] == pytest.approx(lessons.rel_error(q_last, fp_last), rel=1e-4)

    summary = lessons.study_summary(s)
    assert summary["ppl_increase"] == pytest.approx(s.ppl_rtn / s.ppl_fp - 1)
    assert summary["largest_rms_jump_block"] == 1
    assert len(s.block_rows(blocks=(0, 1))) == 2 and len(s.layer_rows()) == 7
    assert len(lessons.fig_layer_errors(s).data) == 7 and len(lessons.fig_propagation(s).data) == 4


def test_full_setting_results_are_consistent():
    full = lessons.FULL_SETTING_RESULTS
    l1 = full["lesson1"]
    assert l1["ppl_increase"] == pytest.approx(l1["ppl_rtn"] / l1["ppl_fp"] - 1, abs=1e-3)
    assert l1["final_amplification"] == pytest.approx(l1["final_cumulative"] / l1["final_isolated"], abs=2e-3)
    claims = lessons.lesson3_claims(full["lesson3"])
    assert claims["left_to_right_worst"] and claims["desc_act_best"]
    assert claims["greedy_not_better_than_best_shared"] and claims["pure_greedy_worse_than_all_shared"]
    assert claims["kept_without_downdate_gptq_grid"] == pytest.approx(0.2015, abs=2e-3)
    assert full["lesson2"]["tokens"] == 128 * 512


# ---------------------------------------------------------------------------------------------------------
# lesson 2: the OBS step on three weights


@pytest.fixture(scope="module")
def triplet(layer):
    return lessons.pick_triplet(layer)


def test_pick_triplet_is_correlated_and_costly(layer, triplet):
    t = triplet
    C = np.abs(t.cosine())
    Hl = np.asarray(layer.H)
    full = np.abs(Hl / np.sqrt(np.outer(np.diag(Hl), np.diag(Hl))))
    np.fill_diagonal(full, 0)
    assert len(set(t.cols)) == 3 and C[0, 1] == pytest.approx(full.max()) and t.cols[0] < t.cols[1]
    assert np.allclose(t.H, np.asarray(layer.H)[np.ix_(t.cols, t.cols)], rtol=1e-6)
    # the row's grid for each weight is its group's grid
    W = np.asarray(layer.W)
    s0 = (t.cols[1] // 128) * 128
    scale, zero = grid_params(W[:, s0 : s0 + 128], 4, True)
    assert t.scale[1] == scale[t.row] and t.zero[1] == zero[t.row]
    assert len(t.grid_values(0)) == 16 and t.quantize(0, t.w[0]) in t.grid_values(0)
    forced = lessons.pick_triplet(layer, cols=(1, 2, 3), row=5)
    assert forced.cols == (1, 2, 3) and forced.row == 5 and forced.w[2] == W[5, 3]


def test_layer_loss_is_exactly_quadratic(triplet):
    check = lessons.quadratic_check(triplet, n_random=200)
    assert check["max_rel_diff"] < 1e-10
    assert check["max_abs_gradient"] < 1e-9 * check["gradient_scale"]


def test_closed_form_equals_least_squares_and_grid_search(triplet):
    t = triplet
    for q in range(3):
        target = t.quantize(q, t.w[q])
        if target == t.w[q]:
            target = t.w[q] + t.scale[q] / 3
        closed = lessons.obs_closed_form(t.w, t.H, q, target)
        assert closed.w_new[q] == pytest.approx(target, abs=1e-15)
        lstsq = lessons.obs_lstsq(t, q, target)
        assert lessons.rel_error(lstsq.w_new, closed.w_new) < 1e-9
        assert t.loss(closed.w_new)[0] == pytest.approx(closed.loss, rel=1e-10)  # c^2 / (2 [H^-1]_qq)
        search = lessons.obs_grid_search(t, q, target)
        rest = [i for i in range(3) if i != q]
        assert np.all(np.abs(search.w_new - closed.w_new)[rest] <= search.cell)
        assert search.loss == pytest.approx(closed.loss, rel=1e-8)
        # no correction costs c^2 H_qq / 2, at least as much
        c = target - t.w[q]
        alone = t.w.copy()
        alone[q] = target
        assert t.loss(alone)[0] == pytest.approx(c * c * t.H[q, q] / 2, rel=1e-10)
        assert t.loss(alone)[0] >= closed.loss
    rows = lessons.obs_rows(t, 0, closed_form=closed)
    assert [r["solution"] for r in rows] == ["original weights", "closed form"]


def test_uncorrelated_inputs_need_no_correction(triplet):
    t = triplet
    sol = lessons.obs_closed_form(t.w, np.diag(np.diag(t.H)), 1, t.w[1] + 0.01)
    assert np.array_equal(sol.w_new[[0, 2]], t.w[[0, 2]])
    assert sol.loss == pytest.approx(0.01**2 * t.H[1, 1] / 2)


def test_sequential_obs_is_the_engine_on_three_weights(triplet):
    t = triplet
    # same grid as the engine uses for a 1 x 3 layer (per row, from the three weights), same damped H
    scale, zero = grid_params(t.w[None], 4, True)
    t3 = lessons.Triplet(t.layer, t.row, t.cols, t.w, t.X, np.repeat(scale, 3), np.repeat(zero, 3), 4)
    cfg = QuantConfig(group_size=-1)
    engine = gptq_quantize(t.w[None], t.H, cfg)
    Hd = t.H + 0.01 * np.mean(np.diag(t.H)) * np.eye(3)
    ours = lessons.sequential_obs(t3, (0, 1, 2), H=Hd)
    assert np.allclose(ours.w_q, engine.weight[0], rtol=0, atol=1e-12)
    assert lessons.engine_first_step(t)["rel_diff"] < 1e-12


def test_exhaustive_search_beats_or_ties_every_order(triplet):
    t = triplet
    best, losses = lessons.exhaustive_triplet(t)
    orders = lessons.order_table(t)
    assert len(orders) == 6 and len(losses) == 16**3 and np.all(np.diff(losses) >= 0)
    assert best.loss == losses[0] and all(best.loss <= o.loss * (1 + 1e-12) for o in orders)
    for r in [*orders, lessons.rtn_triplet(t)]:  # everything ends on the grid
        assert all(np.isclose(r.w_q[i], t.grid_values(i)).any() for i in range(3))
    assert lessons.rtn_triplet(t).w_q[0] == t.quantize(0, t.w[0])


def test_lesson2_figures(triplet):
    t = triplet
    target = t.quantize(0, t.w[0])
    closed = lessons.obs_closed_form(t.w, t.H, 0, target)
    fig = lessons.fig_obs_landscape(t, 0, target, closed, lessons.obs_grid_search(t, 0, target), n=21)
    assert fig.data[0].type == "contour" and len(fig.data) == 4
    assert len(lessons.fig_forced_change(t, 0, steps=9).data) == 3


# ---------------------------------------------------------------------------------------------------------
# lesson 3


@pytest.mark.parametrize("desc_act", [False, True])
def test_stepper_frames_rebuild_the_engine_result(small, desc_act):
    cfg = QuantConfig(group_size=-1, desc_act=desc_act)
    sf = lessons.stepper_frames(small, rows=slice(4, 12), cols=slice(8, 20), cfg=cfg)
    assert sf.states.shape == (13, 8, 12) and np.array_equal(sf.states[0], sf.W0)
    assert np.max(np.abs(sf.states[-1] - sf.result.weight)) <= 1e-12
    assert sf.losses.sum() == pytest.approx(sf.result.loss, rel=1e-12)
    assert list(sf.rows) == list(range(4, 12)) and list(sf.cols) == list(range(8, 20))
    fig = lessons.fig_stepper(sf)
    assert len(fig.frames) == 13 and len(fig.layout.sliders[0].steps) == 13
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["▶ play", "❚❚ pause"]
    step = sf.result.scales[:, sf.result.g_idx]
    assert np.allclose(np.asarray(fig.frames[-1].data[0].z), (sf.states[-1] - sf.W0) / step)


def test_any_order_works_and_desc_act_is_an_order(layer):
    W, H = np.asarray(layer.W), np.asarray(layer.H)
    cfg = QuantConfig(group_size=-1)
    natural = lessons.gptq_in_order(W, H, np.arange(W.shape[1]), cfg)
    assert np.array_equal(natural, gptq_quantize(W, H, cfg).weight)
    desc = lessons.gptq_in_order(W, H, np.argsort(-np.diag(H), kind="stable"), cfg)
    assert np.allclose(desc, gptq_quantize(W, H, cfg.replace(desc_act=True)).weight, atol=1e-12)
    rows = lessons.order_study(layer, n_random=2)
    assert len(rows) == 6 and rows[0]["order"].startswith("round")
    assert all(r["calibration error"] < rows[0]["calibration error"] for r in rows[1:])


def test_obq_fixed_order_is_gptq_and_greedy_is_rtn_on_diagonal_h(small):
    W, H = np.asarray(small.W)[:6, :16], np.asarray(small.H)[:16, :16]
    cfg = QuantConfig(group_size=-1)
    order = np.random.default_rng(0).permutation(16)
    fixed = lessons.obq_greedy(W, H, cfg, order=order)
    assert np.allclose(fixed, lessons.gptq_in_order(W, H, order, cfg), atol=1e-12)
    D = np.diag(np.diag(H))
    assert np.allclose(lessons.obq_greedy(W, D, cfg), rtn_quantize(W, cfg).weight, atol=1e-15)
    scale, zero = grid_params(W, 4, True)
    for rule in (True, False):  # every weight ends on its row's grid
        codes = lessons.obq_greedy(W, H, cfg, outlier_rule=rule) / scale[:, None] + zero[:, None]
        assert np.allclose(codes, np.round(codes), atol=1e-9)
        assert codes.min() > -1e-9 and codes.max() < 15 + 1e-9
    rows = lessons.greedy_vs_fixed(small, rows=slice(0, 6), cols=slice(0, 16), n_random=1)
    assert [r["method"] for r in rows][-2].startswith("OBQ") and len(rows) == 5
    counts = lessons.downdate_counts(576, 576)
    assert counts == {"shared order (GPTQ)": 576, "own order per row (OBQ)": 331_776}


def test_block_size_changes_speed_not_result(layer):
    r = lessons.block_size_study(np.asarray(layer.W), np.asarray(layer.H), sizes=(1, 7, 128), repeats=1)
    assert r["codes_differ"] == 0 and r["max_abs_diff"] < 1e-12
    assert set(r["seconds"]) == {1, 7, 128} and r["speedup"] > 0


def test_rows_of_u_are_the_downdated_inverse_rows(layer):
    c = lessons.cholesky_rows_check(layer.H, every=5)
    assert c["n"] == 300 and c["checked_direct"] == 60
    assert c["max_rel_direct"] < 1e-10 and c["max_rel_downdate"] < 1e-10


def test_column_loop_reproduces_engine_and_seed_loop(layer):
    W, H = np.asarray(layer.W), np.asarray(layer.H)
    X = np.asarray(layer.X_calib, dtype=np.float64)
    engine = gptq_quantize(W, H, QuantConfig()).weight
    assert np.allclose(lessons.column_loop(W, H, "row-group", True), engine, atol=1e-12)
    seed = lesson_simplified_gptq(W, X)
    assert np.allclose(lessons.column_loop(W, H, "seed-column", False), seed, atol=1e-12)
    assert np.array_equal(lessons.column_rtn(W), rtn_quantize(W, QuantConfig()).weight)
    seed_rtn = lessons.column_rtn(W, "seed-column")
    # each column's peak is on its grid
    assert np.allclose(np.abs(seed_rtn).max(axis=0), np.abs(W).max(axis=0))
    with pytest.raises(ValueError, match="grid"):
        lessons.column_loop(W, H, "per-tensor")


def test_downdate_study_table(layer):
    rows = lessons.downdate_study(layer)
    assert len(rows) == 6
    err = {(r["grid"].split()[0], r["method"]): r["calibration error"] for r in rows}
    for grid in ("GPTQ's", "seed"):
        assert err[(grid, "H^-1 downdated (GPTQ)")] < err[(grid, "round to nearest")]
    s = lessons.lesson3_summary(orders=lessons.order_study(layer, n_random=1), downdate=rows,
                                greedy=lessons.greedy_vs_fixed(layer, slice(0, 4), slice(0, 12), n_random=1))
    assert set(lessons.lesson3_claims(s)) >= {"orders_vs_rtn", "kept_without_downdate_seed_grid"}


def test_lesson_data_h_is_the_engine_hessian(small):
    X = np.asarray(small.X_calib, dtype=np.float64)
    assert np.allclose(small.H, Hessian(X.shape[1]).add_batch(X).H)
    fake = LayerData(np.asarray(small.W)[:, :3].copy(), X[:, :3].copy(), X[:5, :3].copy(), "fake", "")
    t = lessons.pick_triplet(fake, group_size=-1)
    assert sorted(t.cols) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------
# the real layer of lessons 2 and 3


@pytest.mark.slow
def test_real_layer_numbers_quoted_by_lessons_2_and_3():
    from gptq_explorer.ui.layer_source import ModelSource

    source = ModelSource(block=5, sublayer="self_attn.q_proj", nsamples=16, seqlen=256, heldout_tokens=1024)
    layer = source.load()
    t = lessons.pick_triplet(layer)
    assert t.row == 437 and t.cols == (247, 260, 100)
    s2 = lessons.lesson2_summary(layer)
    assert s2["correction_ratio"] == pytest.approx(22.13, abs=0.05)
    assert s2["rtn_over_gptq123"] == pytest.approx(2.201, abs=0.01)
    assert s2["gptq123_over_best"] == pytest.approx(12.34, abs=0.05) and s2["some_order_finds_best"]
    s3 = lessons.lesson3_summary(layer)
    d = s3["downdate_heldout"]
    assert d["GPTQ's / round to nearest"] == pytest.approx(0.0871, abs=5e-4)
    assert d["GPTQ's / H^-1 not downdated"] == pytest.approx(0.0828, abs=5e-4)
    assert d["GPTQ's / H^-1 downdated (GPTQ)"] == pytest.approx(0.0536, abs=5e-4)
    c = lessons.lesson3_claims(s3)
    assert c["left_to_right_worst"] and c["desc_act_best"] and c["greedy_not_better_than_best_shared"]
    assert c["kept_without_downdate_gptq_grid"] < 0.3 and c["kept_without_downdate_seed_grid"] < 0.3
    assert math.isclose(c["orders_vs_rtn"], 0.6234, abs_tol=0.01)
