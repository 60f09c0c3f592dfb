"""gptq_explorer.lessons.obs_update (lesson 2): the OBS step on three weights of a synthetic layer, checked
by least squares, grid search, brute force and the engine."""

from __future__ import annotations

import numpy as np
import pytest

from gptq_explorer import Hessian, QuantConfig, gptq_quantize
from gptq_explorer.engine.grid import grid_params
from gptq_explorer.lessons import obs_update as L
from gptq_explorer.lessons.measures import rel_error
from gptq_explorer.services.layer_source import LayerData


@pytest.fixture(scope="module")
def triplet(layer):
    return L.pick_triplet(layer)


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
    forced = L.pick_triplet(layer, cols=(1, 2, 3), row=5)
    assert forced.cols == (1, 2, 3) and forced.row == 5 and forced.w[2] == W[5, 3]


def test_layer_loss_is_exactly_quadratic(triplet):
    check = L.quadratic_check(triplet, n_random=200)
    assert check["max_rel_diff"] < 1e-10
    assert check["max_abs_gradient"] < 1e-9 * check["gradient_scale"]


def test_closed_form_equals_least_squares_and_grid_search(triplet):
    t = triplet
    for q in range(3):
        target = t.quantize(q, t.w[q])
        if target == t.w[q]:
            target = t.w[q] + t.scale[q] / 3
        closed = L.obs_closed_form(t.w, t.H, q, target)
        assert closed.w_new[q] == pytest.approx(target, abs=1e-15)
        lstsq = L.obs_lstsq(t, q, target)
        assert rel_error(lstsq.w_new, closed.w_new) < 1e-9
        assert t.loss(closed.w_new)[0] == pytest.approx(closed.loss, rel=1e-10)  # c^2 / (2 [H^-1]_qq)
        search = L.obs_grid_search(t, q, target)
        rest = [i for i in range(3) if i != q]
        assert np.all(np.abs(search.w_new - closed.w_new)[rest] <= search.cell)
        assert search.loss == pytest.approx(closed.loss, rel=1e-8)
        # no correction costs c^2 H_qq / 2, at least as much
        c = target - t.w[q]
        alone = t.w.copy()
        alone[q] = target
        assert t.loss(alone)[0] == pytest.approx(c * c * t.H[q, q] / 2, rel=1e-10)
        assert t.loss(alone)[0] >= closed.loss
    rows = L.obs_rows(t, 0, closed_form=closed)
    assert [r["solution"] for r in rows] == ["original weights", "closed form"]


def test_uncorrelated_inputs_need_no_correction(triplet):
    t = triplet
    sol = L.obs_closed_form(t.w, np.diag(np.diag(t.H)), 1, t.w[1] + 0.01)
    assert np.array_equal(sol.w_new[[0, 2]], t.w[[0, 2]])
    assert sol.loss == pytest.approx(0.01**2 * t.H[1, 1] / 2)


def test_sequential_obs_is_the_engine_on_three_weights(triplet):
    t = triplet
    # same grid as the engine uses for a 1 x 3 layer (per row, from the three weights), same damped H
    scale, zero = grid_params(t.w[None], 4, True)
    t3 = L.Triplet(t.layer, t.row, t.cols, t.w, t.X, np.repeat(scale, 3), np.repeat(zero, 3), 4)
    cfg = QuantConfig(group_size=-1)
    engine = gptq_quantize(t.w[None], t.H, cfg)
    Hd = t.H + 0.01 * np.mean(np.diag(t.H)) * np.eye(3)
    ours = L.sequential_obs(t3, (0, 1, 2), H=Hd)
    assert np.allclose(ours.w_q, engine.weight[0], rtol=0, atol=1e-12)
    assert L.engine_first_step(t)["rel_diff"] < 1e-12


def test_exhaustive_search_beats_or_ties_every_order(triplet):
    t = triplet
    best, losses = L.exhaustive_triplet(t)
    orders = L.order_table(t)
    assert len(orders) == 6 and len(losses) == 16**3 and np.all(np.diff(losses) >= 0)
    assert best.loss == losses[0] and all(best.loss <= o.loss * (1 + 1e-12) for o in orders)
    for r in [*orders, L.rtn_triplet(t)]:  # everything ends on the grid
        assert all(np.isclose(r.w_q[i], t.grid_values(i)).any() for i in range(3))
    assert L.rtn_triplet(t).w_q[0] == t.quantize(0, t.w[0])


def test_lesson2_figures(triplet):
    t = triplet
    target = t.quantize(0, t.w[0])
    closed = L.obs_closed_form(t.w, t.H, 0, target)
    fig = L.fig_obs_landscape(t, 0, target, closed, L.obs_grid_search(t, 0, target), n=21)
    assert fig.data[0].type == "contour" and len(fig.data) == 4
    assert len(L.fig_forced_change(t, 0, steps=9).data) == 3


def test_lesson_data_h_is_the_engine_hessian(small):
    X = np.asarray(small.X_calib, dtype=np.float64)
    assert np.allclose(small.H, Hessian(X.shape[1]).add_batch(X).H)
    fake = LayerData(np.asarray(small.W)[:, :3].copy(), X[:, :3].copy(), X[:5, :3].copy(), "fake", "")
    t = L.pick_triplet(fake, group_size=-1)
    assert sorted(t.cols) == [0, 1, 2]
