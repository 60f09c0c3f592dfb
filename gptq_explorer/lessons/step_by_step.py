"""Lesson 3 (notebooks/03_gptq_step_by_step.ipynb): GPTQ step by step.

The engine's stepper as an animation on a crop of a real layer; the column order (one shared order, OBQ's
greedy order per row); lazy batch updates (the block size changes the speed, not the result); the rows of
the Cholesky factor are the downdated inverse Hessian's; and what happens when H^-1 is not downdated (the
seed lesson's loop). lesson3_summary / lesson3_claims give what the lesson quotes and states, also for the
larger run stored in data/results/lessons/full_setting.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..engine import QuantConfig, gptq_quantize, gptq_steps, rtn_quantize
from ..engine.gptq import hinv_cholesky_upper
from ..engine.grid import dequantize, grid_params, quantize_codes
from ..services.threads import single_blas_thread
from .measures import output_rel_error, rel_error


@dataclass
class StepperFrames:
    """GPTQ on a crop of a real layer, one state per step (for the animation)."""

    name: str
    rows: np.ndarray  # row indices of the crop in the layer
    cols: np.ndarray  # column indices of the crop
    W0: np.ndarray  # (r, c) the crop's original weights
    states: np.ndarray  # (c + 1, r, c): weights after 0, 1, ..., c steps (state c = the quantized crop)
    losses: np.ndarray  # (c,) OBS loss of each column
    result: object  # the engine's QuantResult for the crop

    @property
    def running_loss(self) -> np.ndarray:
        return np.cumsum(self.losses)


def stepper_frames(data, rows: slice, cols: slice, cfg: QuantConfig | None = None) -> StepperFrames:
    """Run the engine's stepper (gptq_steps) on W[rows, cols] with H[cols, cols] and rebuild the weight matrix
    after every step: column p becomes its quantized value, the columns after it receive the step's update.
    The crop is a GPTQ problem of its own: only its weights move, the rest of the layer stays FP."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(data.W, dtype=np.float64)[rows, cols]
    H = np.asarray(data.H, dtype=np.float64)[cols, cols]
    stepper = gptq_steps(W, H, cfg)
    perm = stepper.prepared.perm
    state = W.copy()
    states = [state.copy()]
    losses = np.zeros(W.shape[1])
    for step in stepper:
        state[:, step.column] = step.quantized
        state[:, perm[step.position + 1 :]] += step.update
        states.append(state.copy())
        losses[step.position] = step.loss
    r0, c0 = np.arange(data.W.shape[0])[rows], np.arange(data.W.shape[1])[cols]
    return StepperFrames(data.name, r0, c0, W, np.array(states), losses, stepper.result)


def fig_stepper(sf: StepperFrames, duration_ms: int = 600, zmax: float = 1.0):
    """A plotly animation (frames + play button + slider) of GPTQ on the crop; it plays without a kernel.

    Left: the change of every weight since the start, in steps of its row's grid: in the columns already
    done, the corrections they received before their turn plus their own rounding; in the columns still to
    do, the corrections so far. Colours saturate at +-zmax steps.
    Right: the running OBS loss."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = sf.W0.shape[1]
    step = np.asarray(sf.result.scales)[:, np.asarray(sf.result.g_idx)]  # (rows, cols) grid step per weight
    deltas = (sf.states - sf.W0[None]) / step[None]
    x = [str(c) for c in sf.cols]
    y = [str(r) for r in sf.rows]
    run = np.concatenate([[0.0], sf.running_loss])
    rows = len(sf.rows)

    def traces(p):
        cur = x[p - 1] if p > 0 else x[0]
        return [
            go.Heatmap(z=deltas[p], x=x, y=y, zmin=-zmax, zmax=zmax, colorscale="RdBu", zmid=0,
                       colorbar=dict(title="change<br>(grid steps)", x=0.55),
                       hovertemplate="row %{y}, input %{x}: %{z:.3f} steps<extra></extra>"),
            go.Scatter(x=[cur, cur], y=[y[0], y[-1]], mode="lines", line=dict(color="black", width=3),
                       showlegend=False, hoverinfo="skip", visible=p > 0),
            go.Scatter(x=list(range(p + 1)), y=run[: p + 1], mode="lines+markers", showlegend=False,
                       hovertemplate="after %{x} columns: %{y:.3e}<extra></extra>"),
        ]

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.14,
                        subplot_titles=("change of each weight so far (in grid steps)", "running OBS loss"))
    for i, tr in enumerate(traces(0)):
        fig.add_trace(tr, row=1, col=1 if i < 2 else 2)
    frames = [go.Frame(data=traces(p), name=str(p), traces=[0, 1, 2],
                       layout=go.Layout(title_text=_step_title(sf, p))) for p in range(n + 1)]
    fig.frames = frames
    fig.update_xaxes(title_text="input column", type="category", row=1, col=1)
    fig.update_yaxes(title_text="output row", type="category", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="columns quantized", range=[-0.5, n + 0.5], row=1, col=2)
    fig.update_yaxes(range=[0, float(run[-1]) * 1.05], row=1, col=2)
    play = dict(label="▶ play", method="animate",
                args=[None, dict(frame=dict(duration=duration_ms, redraw=True), fromcurrent=True,
                                 transition=dict(duration=0))])
    pause = dict(label="❚❚ pause", method="animate",
                 args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])
    steps = [dict(method="animate", label=str(p),
                  args=[[str(p)], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                       transition=dict(duration=0))]) for p in range(n + 1)]
    fig.update_layout(
        title_text=_step_title(sf, 0), height=360 + 12 * rows,
        updatemenus=[dict(type="buttons", buttons=[play, pause], direction="left", x=0.0, y=-0.18,
                          xanchor="left", yanchor="top")],
        sliders=[dict(steps=steps, active=0, x=0.16, y=-0.12, len=0.84,
                      currentvalue=dict(prefix="columns quantized: "))],
        margin=dict(t=70, b=110),
    )
    return fig


def _step_title(sf: StepperFrames, p: int) -> str:
    if p == 0:
        return f"{sf.name}: rows {sf.rows[0]}-{sf.rows[-1]}, inputs {sf.cols[0]}-{sf.cols[-1]}, before GPTQ"
    return (f"step {p}: input {sf.cols[p - 1]} rounded; the {len(sf.cols) - p} inputs to its right "
            "corrected")


# ---- column order


def gptq_in_order(W, H, order, cfg: QuantConfig) -> np.ndarray:
    """GPTQ with the columns processed in `order` (a permutation); returns Q in the original column order."""
    order = np.asarray(order)
    res = gptq_quantize(np.asarray(W)[:, order], np.asarray(H)[np.ix_(order, order)], cfg)
    Q = np.empty_like(res.weight)
    Q[:, order] = res.weight
    return Q


def order_study(data, n_random: int = 3, seed: int = 0, cfg: QuantConfig | None = None) -> list[dict]:
    """Output error of GPTQ with different column orders (one order shared by all rows, as GPTQ does).

    Default grid: 4-bit symmetric, one grid per row (group_size=-1): the grid then does not depend on the
    order, so only the order changes. Errors are relative output errors from the calibration H and the
    held-out H (lesson 1's measure)."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(data.W, dtype=np.float64)
    H = np.asarray(data.H, dtype=np.float64)
    n = W.shape[1]
    rng = np.random.default_rng(seed)
    orders = [("left to right (GPTQ)", np.arange(n)), ("right to left", np.arange(n)[::-1])]
    orders += [(f"random #{i + 1}", rng.permutation(n)) for i in range(n_random)]
    orders.append(("largest diag(H) first (desc_act)", np.argsort(-np.diag(H), kind="stable")))
    rows = []
    with single_blas_thread():
        rtn = rtn_quantize(W, cfg).weight
        rows.append({"order": "round to nearest (no order)", "calibration error": output_rel_error(W, rtn, H),
                     "held-out error": output_rel_error(W, rtn, data.H_heldout)})
        for name, order in orders:
            Q = gptq_in_order(W, H, order, cfg)
            rows.append({"order": name, "calibration error": output_rel_error(W, Q, H),
                         "held-out error": output_rel_error(W, Q, data.H_heldout)})
    return rows


def obq_greedy(W, H, cfg: QuantConfig | None = None, order=None, outlier_rule: bool = True) -> np.ndarray:
    """Optimal Brain Quantization's greedy order (OBC paper; GPTQ paper, Section 3): each row picks, at every
    step, the weight whose rounding costs least, (w_q - quant(w_q))^2 / [H_F^-1]_qq, and downdates its own
    H^-1. outlier_rule: as in OBQ's code (IST-DASLab/OBC, trueobs.py, TrueOBS.quantize), a row that has a
    weight more than half a grid step from its grid value (pushed past the grid's ends by earlier updates)
    quantizes its worst such weight next instead.
    Per-row grid (group_size=-1) from the original row; H damped like the engine (damp_percent).
    order: a fixed column order for every row instead of the greedy choice (then this is GPTQ, computed
    the slow way: a check of the downdate formula)."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    n = W.shape[1]
    Hd = H + cfg.damp_percent * np.mean(np.diag(H)) * np.eye(n)
    Hinv0 = np.linalg.inv(Hd)
    scale, zero = grid_params(W, cfg.bits, cfg.sym)
    Q = np.empty_like(W)
    with single_blas_thread():
        for r in range(W.shape[0]):
            w = W[r].copy()
            Hinv = Hinv0.copy()
            left = np.ones(n, dtype=bool)
            s, z = scale[r], zero[r]
            for step in range(n):
                qv = dequantize(quantize_codes(w, s, z, cfg.maxq), s, z)
                if order is not None:
                    q = int(order[step])
                else:
                    err2 = np.where(left, (w - qv) ** 2, 0.0)
                    if outlier_rule and np.any(err2 > 0.25 * s * s):
                        q = int(np.argmax(err2))
                    else:
                        cost = np.where(left, err2 / np.where(left, np.diag(Hinv), 1.0), np.inf)
                        q = int(np.argmin(cost))
                err = (w[q] - qv[q]) / Hinv[q, q]
                w -= err * Hinv[:, q]
                w[q] = qv[q]
                Hinv -= np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
                left[q] = False
            Q[r] = w
    return Q


def greedy_vs_fixed(data, rows: slice, cols: slice, n_random: int = 3, seed: int = 0,
                    cfg: QuantConfig | None = None) -> list[dict]:
    """On a crop: RTN, GPTQ's one shared order (and random shared orders), and OBQ's per-row greedy order."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(data.W, dtype=np.float64)[rows, cols]
    H = np.asarray(data.H, dtype=np.float64)[cols, cols]
    Hh = np.asarray(data.H_heldout, dtype=np.float64)[cols, cols]
    n = W.shape[1]
    rng = np.random.default_rng(seed)
    out = []

    def add(name, Q, seconds):
        out.append({"method": name, "calibration error": output_rel_error(W, Q, H),
                    "held-out error": output_rel_error(W, Q, Hh), "seconds": seconds})

    with single_blas_thread():
        t = time.perf_counter()
        add("round to nearest", rtn_quantize(W, cfg).weight, time.perf_counter() - t)
        t = time.perf_counter()
        add("GPTQ, left to right", gptq_in_order(W, H, np.arange(n), cfg), time.perf_counter() - t)
        for i in range(n_random):
            order = rng.permutation(n)
            t = time.perf_counter()
            add(f"GPTQ, random order #{i + 1}", gptq_in_order(W, H, order, cfg), time.perf_counter() - t)
        t = time.perf_counter()
        add("OBQ greedy, own order per row", obq_greedy(W, H, cfg), time.perf_counter() - t)
        t = time.perf_counter()
        add("greedy without OBQ's outlier rule", obq_greedy(W, H, cfg, outlier_rule=False),
            time.perf_counter() - t)
    return out


def downdate_counts(d_out: int, d_in: int) -> dict:
    """How many (d_in x d_in) inverse-Hessian downdates each scheme needs for a whole layer."""
    return {"shared order (GPTQ)": d_in, "own order per row (OBQ)": d_out * d_in}


# ---- lazy batch updates


def block_size_study(W, H, sizes=(1, 128), repeats: int = 2, cfg: QuantConfig | None = None) -> dict:
    """Same result for every block size; the time of each (best of `repeats`, one BLAS thread). The sizes
    take turns within each repeat, so that a machine busy with other work slows them alike."""
    cfg = cfg or QuantConfig()
    results, seconds = {}, dict.fromkeys(sizes, math.inf)
    with single_blas_thread():
        for _ in range(repeats):
            for b in sizes:
                t = time.perf_counter()
                results[b] = gptq_quantize(W, H, cfg.replace(block_size=b))
                seconds[b] = min(seconds[b], time.perf_counter() - t)
    ref = results[sizes[0]]
    return {
        "seconds": seconds,
        "max_abs_diff": max(float(np.max(np.abs(results[b].weight - ref.weight))) for b in sizes),
        "codes_differ": max(int(np.sum(results[b].codes != ref.codes)) for b in sizes),
        "speedup": seconds[sizes[0]] / seconds[sizes[-1]],
    }


# ---- the Cholesky trick


def cholesky_rows_check(H, damp_percent: float = 0.01, every: int = 8) -> dict:
    """Row q of U (H^-1 = U^T U, U upper) vs the first row of (H[q:, q:])^-1 divided by the square root of
    its first entry: (a) by inverting H[q:, q:] directly at every `every`-th q; (b) at every q, by
    downdating H^-1 one column at a time (H_F^-1 <- H_F^-1 - H_F^-1[:, 0] H_F^-1[0, :] / H_F^-1[0, 0])."""
    H = np.asarray(H, dtype=np.float64)
    n = H.shape[0]
    Hd = H + damp_percent * np.mean(np.diag(H)) * np.eye(n)
    with single_blas_thread():
        U = hinv_cholesky_upper(Hd)
        direct = []
        for q in range(0, n, every):
            inv = np.linalg.inv(Hd[q:, q:])
            direct.append(rel_error(U[q, q:], inv[0] / np.sqrt(inv[0, 0])))
        down = []
        Finv = np.linalg.inv(Hd)
        for q in range(n):
            down.append(rel_error(U[q, q:], Finv[0] / np.sqrt(Finv[0, 0])))
            Finv = Finv[1:, 1:] - np.outer(Finv[1:, 0], Finv[0, 1:]) / Finv[0, 0]
    return {"n": n, "checked_direct": len(direct), "max_rel_direct": float(max(direct)),
            "max_rel_downdate": float(max(down)), "condition": float(np.linalg.cond(Hd))}


# ---- what if H^-1 is not downdated


def column_loop(W, H, grid: str = "row-group", downdate: bool = True, bits: int = 4, group_size: int = 128,
                damp_percent: float = 0.01) -> np.ndarray:
    """The GPTQ column loop, one column at a time, with two switches.

    grid="row-group": the engine's grid (symmetric, one scale per row and group of `group_size` columns,
                      taken from the updated weights when the group starts);
    grid="seed-column": the seed lesson's grid (one scale per column shared by all rows, max|column| / 7,
                      from the column's current values, np.round).
    downdate=True:  update with row q of U, i.e. the inverse Hessian of the columns not yet quantized (OBS);
    downdate=False: update with row q of the full H^-1, computed once (the seed lesson's loop).
    With ("row-group", True) this is the engine's gptq_quantize (QuantConfig(bits, group_size)); with
    ("seed-column", False) it is seed_lesson.lesson_simplified_gptq."""
    W = np.array(W, dtype=np.float64, copy=True)
    H = np.asarray(H, dtype=np.float64)
    rows, n = W.shape
    Hd = H + damp_percent * np.mean(np.diag(H)) * np.eye(n)
    maxq = 2**bits - 1
    max_int = 2 ** (bits - 1) - 1
    if downdate:
        M = hinv_cholesky_upper(Hd)  # row q: (H_F^-1)_{q,:} / sqrt([H_F^-1]_qq)
    else:
        M = np.linalg.inv(Hd)
    Q = np.empty_like(W)
    scale = zero = None
    with single_blas_thread():
        for q in range(n):
            w = W[:, q]
            if grid == "row-group":
                if q % group_size == 0:
                    scale, zero = grid_params(W[:, q : q + group_size], bits, True)
                qv = dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)
            elif grid == "seed-column":
                peak = np.max(np.abs(w))
                s = peak / max_int if peak > 0 else 1.0
                qv = np.clip(np.round(w / s), -max_int, max_int) * s
            else:
                raise ValueError(f"grid must be 'row-group' or 'seed-column', got {grid!r}")
            err = (w - qv) / M[q, q]
            Q[:, q] = qv
            W[:, q + 1 :] -= np.outer(err, M[q, q + 1 :])
    return Q


def column_rtn(W, grid: str = "row-group", bits: int = 4, group_size: int = 128) -> np.ndarray:
    """Round to nearest on column_loop's grids (no updates)."""
    W = np.asarray(W, dtype=np.float64)
    if grid == "row-group":
        return rtn_quantize(W, QuantConfig(bits=bits, group_size=group_size, sym=True)).weight
    max_int = 2 ** (bits - 1) - 1
    peak = np.max(np.abs(W), axis=0)
    s = np.where(peak > 0, peak / max_int, 1.0)
    return np.clip(np.round(W / s), -max_int, max_int) * s


def downdate_study(data, bits: int = 4, group_size: int = 128) -> list[dict]:
    """Held-out and calibration output errors of RTN, the loop without downdate and with it, on both grids."""
    W = np.asarray(data.W, dtype=np.float64)
    H = np.asarray(data.H, dtype=np.float64)
    rows = []
    for grid, label in (("row-group", f"GPTQ's grid (per row, groups of {group_size})"),
                        ("seed-column", "seed lesson's grid (one scale per column)")):
        for method, Q in (("round to nearest", column_rtn(W, grid, bits, group_size)),
                          ("H^-1 not downdated", column_loop(W, H, grid, False, bits, group_size)),
                          ("H^-1 downdated (GPTQ)", column_loop(W, H, grid, True, bits, group_size))):
            rows.append({"grid": label, "method": method, "calibration error": output_rel_error(W, Q, H),
                         "held-out error": output_rel_error(W, Q, data.H_heldout)})
    return rows


# ---- what the lesson quotes and states


def lesson3_summary(data=None, *, orders=None, greedy=None, downdate=None) -> dict:
    """Lesson 3's held-out errors: column orders, greedy vs shared order on the crop, the downdate table.
    Pass the layer data to compute them, or the rows the notebook already has (orders=order_study(...),
    greedy=greedy_vs_fixed(...), downdate=downdate_study(...))."""
    if orders is None:
        orders = order_study(data)
    if greedy is None:
        greedy = greedy_vs_fixed(data, slice(0, 64), slice(0, 128))
    if downdate is None:
        downdate = downdate_study(data)
    return {
        "order_heldout": {r["order"]: r["held-out error"] for r in orders},
        "downdate_heldout": {f"{r['grid'].split()[0]} / {r['method']}": r["held-out error"]
                             for r in downdate},
        "greedy_heldout": {r["method"]: r["held-out error"] for r in greedy},
    }


def lesson3_claims(summary: dict) -> dict:
    """The relations lesson 3 states, evaluated on a lesson3_summary (this run's or the larger one)."""
    o = summary["order_heldout"]
    rtn, orders = o["round to nearest (no order)"], [v for k, v in o.items() if not k.startswith("round")]
    g = summary["greedy_heldout"]
    shared = [v for k, v in g.items() if k.startswith("GPTQ")]
    d = summary["downdate_heldout"]

    def kept(grid):
        methods = ("round to nearest", "H^-1 not downdated", "H^-1 downdated (GPTQ)")
        r, f, q = (d[f"{grid} / {m}"] for m in methods)
        return (r - f) / (r - q)

    return {
        "orders_vs_rtn": max(orders) / rtn,
        "order_spread_vs_gap": (max(orders) - min(orders)) / (rtn - max(orders)),
        "left_to_right_worst": o["left to right (GPTQ)"] == max(orders),
        "desc_act_best": o["largest diag(H) first (desc_act)"] == min(orders),
        "greedy_not_better_than_best_shared": g["OBQ greedy, own order per row"] > min(shared),
        "pure_greedy_worse_than_all_shared": g["greedy without OBQ's outlier rule"] > max(shared),
        "kept_without_downdate_gptq_grid": kept("GPTQ's"),
        "kept_without_downdate_seed_grid": kept("seed"),
    }
