"""Lesson 2 (notebooks/02_obs_update.ipynb): the OBS update on three real weights, checked by brute force.

Three strongly correlated inputs of a real layer (a Triplet): the layer loss is exactly quadratic in their
weights; fixing one weight and correcting the other two (the closed form, Eq. 2-3 of the paper) equals
least squares on the activations and a grid search; rounding all three in each order (GPTQ on three
weights) against every point of the grid. lesson2_summary gives the numbers the lesson quotes, also for the
larger run stored in data/results/lessons/full_setting.json.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..engine import QuantConfig, gptq_steps
from ..engine.grid import dequantize, grid_params, quantize_codes
from .measures import rel_error


@dataclass
class Triplet:
    """Three weights of one row of a real layer, with the activations of their three inputs.

    If only these three weights move (every other weight of the row stays as it is), the change of the
    row's output on token t is x_t . delta, so the layer loss is exactly
        L(delta) = mean_t (x_t . delta)^2 = 1/2 delta^T H delta,     H = 2/n X^T X   (3x3)
    a quadratic with its minimum (zero) at delta = 0.
    """

    layer: str
    row: int
    cols: tuple[int, int, int]
    w: np.ndarray  # (3,) the original weights
    X: np.ndarray  # (n, 3) calibration activations of the three inputs, float64
    scale: np.ndarray  # (3,) the row's grid for each weight's group
    zero: np.ndarray  # (3,)
    bits: int

    @property
    def H(self) -> np.ndarray:
        return 2.0 / self.X.shape[0] * (self.X.T @ self.X)

    @property
    def n_tokens(self) -> int:
        return self.X.shape[0]

    def cosine(self) -> np.ndarray:
        """Cosine similarity of the three inputs' activation vectors (over the calibration tokens)."""
        H = self.H
        d = np.sqrt(np.diag(H))
        return H / np.outer(d, d)

    def quantize(self, i: int, value: float) -> float:
        """value rounded to weight i's grid."""
        maxq = 2**self.bits - 1
        c = quantize_codes(np.array([value]), self.scale[i : i + 1], self.zero[i : i + 1], maxq)
        return float(dequantize(c, self.scale[i : i + 1], self.zero[i : i + 1])[0])

    def grid_values(self, i: int) -> np.ndarray:
        """Every value weight i can take: scale * (code - zero), code = 0 .. 2^bits - 1."""
        return self.scale[i] * (np.arange(2**self.bits) - self.zero[i])

    def loss(self, w_new) -> np.ndarray:
        """The layer loss measured directly on the activations: mean over tokens of (x . (w_new - w))^2.
        w_new: (3,) or (m, 3); evaluated in chunks, so m can be large."""
        w_new = np.atleast_2d(np.asarray(w_new, dtype=np.float64))
        out = np.empty(w_new.shape[0])
        D = w_new - self.w
        for s in range(0, D.shape[0], 2048):
            E = D[s : s + 2048] @ self.X.T
            out[s : s + 2048] = np.mean(E * E, axis=1)
        return out


def pick_triplet(data, bits: int = 4, group_size: int = 128, cols=None, row: int | None = None) -> Triplet:
    """Three strongly correlated inputs of a real layer and the row where rounding the first one costs most.

    The pair of inputs with the largest |cosine similarity| of their activations, plus the input most similar
    to both (largest min(|cos|)); the first is the pair member with the smaller index (or pass `cols`).
    The row is the one whose weight at that input, rounded to the row's grid, raises the loss most (or pass
    `row`).
    Correlated inputs are chosen on purpose: with uncorrelated inputs H is diagonal and there is nothing
    for the OBS correction to do.
    """
    H = np.asarray(data.H, dtype=np.float64)
    d = np.sqrt(np.diag(H))
    C = np.abs(H / np.outer(d, d))
    np.fill_diagonal(C, 0.0)
    i, j = np.unravel_index(int(np.argmax(C)), C.shape)
    i, j = int(min(i, j)), int(max(i, j))
    score = np.minimum(C[i], C[j])
    score[[i, j]] = -1.0
    k = int(np.argmax(score))
    cols = (i, j, k) if cols is None else tuple(int(c) for c in cols)
    W = np.asarray(data.W, dtype=np.float64)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=True)
    width = cfg.group_width(W.shape[1])
    scales, zeros = [], []
    for c in cols:
        s0 = (c // width) * width
        scale, zero = grid_params(W[:, s0 : s0 + width], bits, True)
        scales.append(scale)
        zeros.append(zero)
    scales, zeros = np.stack(scales, axis=1), np.stack(zeros, axis=1)  # (rows, 3)
    q0 = cols[0]
    col = W[:, q0]
    qcol = dequantize(quantize_codes(col, scales[:, 0], zeros[:, 0], cfg.maxq), scales[:, 0], zeros[:, 0])
    if row is None:
        row = int(np.argmax((col - qcol) ** 2 * H[q0, q0]))
    X = np.asarray(data.X_calib, dtype=np.float64)[:, list(cols)]
    return Triplet(layer=data.name, row=row, cols=cols, w=W[row, list(cols)].copy(), X=X,
                   scale=scales[row].copy(), zero=zeros[row].copy(), bits=bits)


def quadratic_check(t: Triplet, n_random: int = 1000, seed: int = 0) -> dict:
    """The second-order expansion is exact: L(delta) measured on the activations vs 1/2 delta^T H delta, at
    random delta of the size of a quantization step; plus the gradient at delta = 0 (it is exactly 0)."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_random, 3)) * t.scale
    measured = t.loss(t.w + D)
    quadratic = 0.5 * np.einsum("mi,ij,mj->m", D, t.H, D)
    # numerical gradient of the measured loss at delta = 0 (central differences), relative to the curvature
    h = 1e-3 * t.scale
    e = np.eye(3)
    grad = np.array([(t.loss(t.w + h[i] * e[i])[0] - t.loss(t.w - h[i] * e[i])[0]) / (2 * h[i])
                     for i in range(3)])
    return {"max_rel_diff": float(np.max(np.abs(measured - quadratic) / quadratic)),
            "max_abs_gradient": float(np.max(np.abs(grad))),
            "gradient_scale": float(np.max(np.diag(t.H) * t.scale))}


@dataclass
class OBSSolution:
    w_new: np.ndarray  # (3,) weights after fixing weight q to the target and correcting the others
    loss: float


def obs_closed_form(w: np.ndarray, H: np.ndarray, q: int, target: float) -> OBSSolution:
    """Fix weight q at `target`, move the others to minimize 1/2 d^T H d (paper, Eq. 2-3):
        delta = (target - w_q) / [H^-1]_qq * H^-1[:, q],     loss = (w_q - target)^2 / (2 [H^-1]_qq)."""
    Hinv = np.linalg.inv(H)
    c = target - w[q]
    delta = c / Hinv[q, q] * Hinv[:, q]
    return OBSSolution(w + delta, float(c * c / (2 * Hinv[q, q])))


def obs_lstsq(t: Triplet, q: int, target: float) -> OBSSolution:
    """The same problem solved by least squares on the activations: min over the other two weights of
    mean_t (x_tq c + x_t,rest . delta_rest)^2. No H, no inverse: a check of the closed form."""
    rest = [i for i in range(3) if i != q]
    c = target - t.w[q]
    sol, *_ = np.linalg.lstsq(t.X[:, rest], -c * t.X[:, q], rcond=None)
    w_new = t.w.copy()
    w_new[q] = target
    w_new[rest] += sol
    return OBSSolution(w_new, float(t.loss(w_new)[0]))


@dataclass
class GridSearch:
    w_new: np.ndarray
    loss: float
    cell: np.ndarray  # (2,) final grid spacing of the two free weights
    evaluations: int
    box: np.ndarray  # (2,) half-width of the first, coarse box


def obs_grid_search(t: Triplet, q: int, target: float, points: int = 81, rounds: int = 6,
                    box_factor: float = 50.0) -> GridSearch:
    """Brute force: fix weight q at target, evaluate the measured loss on a points x points grid of the other
    two weights, then zoom in around the best point (the box shrinks to +-2 cells each round).

    The first box is centred on the original weights with half-width box_factor * |c| * sqrt(H_qq / H_jj)
    per free weight j (c = target - w_q): it uses nothing from the closed form."""
    rest = [i for i in range(3) if i != q]
    H = t.H
    c = target - t.w[q]
    half = box_factor * abs(c) * np.sqrt(H[q, q] / np.diag(H)[rest])
    first_box = half.copy()
    center = t.w[rest].copy()
    evals = 0
    for _ in range(rounds):
        a = np.linspace(center[0] - half[0], center[0] + half[0], points)
        b = np.linspace(center[1] - half[1], center[1] + half[1], points)
        A, B = np.meshgrid(a, b, indexing="ij")
        cand = np.empty((A.size, 3))
        cand[:, q] = target
        cand[:, rest[0]] = A.ravel()
        cand[:, rest[1]] = B.ravel()
        losses = t.loss(cand)
        evals += losses.size
        best = int(np.argmin(losses))
        ia, ib = np.unravel_index(best, A.shape)
        if _ == 0 and (ia in (0, points - 1) or ib in (0, points - 1)):
            raise RuntimeError("grid search: the minimum is on the edge of the first box; widen box_factor")
        cell = np.array([a[1] - a[0], b[1] - b[0]])
        center = np.array([a[ia], b[ib]])
        half = 2 * cell
    w_new = cand[best].copy()
    return GridSearch(w_new, float(losses[best]), cell, evals, first_box)


@dataclass
class Rounding:
    name: str
    w_q: np.ndarray  # (3,) values on the grid
    loss: float


def sequential_obs(t: Triplet, order=(0, 1, 2), H: np.ndarray | None = None) -> Rounding:
    """GPTQ on the three weights: quantize them one by one in `order`; after each, the OBS correction moves
    the ones not yet quantized (inverse Hessian of the remaining weights only)."""
    H = t.H if H is None else H
    w = t.w.copy()
    todo = list(order)
    while todo:
        q = todo.pop(0)
        target = t.quantize(q, w[q])
        if todo:
            sub = [q, *todo]
            sol = obs_closed_form(w[sub], H[np.ix_(sub, sub)], 0, target)
            w[sub] = sol.w_new
        w[q] = target
    return Rounding("GPTQ order " + "".join(str(i + 1) for i in order), w, float(t.loss(w)[0]))


def rtn_triplet(t: Triplet) -> Rounding:
    w = np.array([t.quantize(i, t.w[i]) for i in range(3)])
    return Rounding("round to nearest", w, float(t.loss(w)[0]))


def exhaustive_triplet(t: Triplet) -> tuple[Rounding, np.ndarray]:
    """Brute force over the integer grid: every (2^bits)^3 combination of grid values, loss measured on the
    activations. Returns the best and all losses (sorted)."""
    vals = [t.grid_values(i) for i in range(3)]
    cand = np.array(list(itertools.product(*vals)))
    losses = t.loss(cand)
    best = int(np.argmin(losses))
    return Rounding("best of all grid points", cand[best], float(losses[best])), np.sort(losses)


def order_table(t: Triplet) -> list[Rounding]:
    """sequential_obs in all six orders of the three weights."""
    return [sequential_obs(t, order) for order in itertools.permutations(range(3))]


def obs_rows(t: Triplet, q: int, **solutions) -> list[dict]:
    """Table rows: the three weights and the measured loss for each named solution."""
    rows = [{"solution": "original weights", **{f"w{i + 1}": float(t.w[i]) for i in range(3)}, "loss": 0.0}]
    for name, sol in solutions.items():
        rows.append({"solution": name.replace("_", " "),
                     **{f"w{i + 1}": float(sol.w_new[i]) for i in range(3)}, "loss": float(sol.loss)})
    return rows


def engine_first_step(t: Triplet) -> dict:
    """The engine's first GPTQ step on the three weights (as a 1x3 layer) vs obs_closed_form with the same
    damped H and the same rounded value: the engine's update is the OBS correction."""
    W = t.w[None, :]
    stepper = gptq_steps(W, t.H, QuantConfig(group_size=-1))
    first = next(iter(stepper))
    Hd = stepper.prepared.H  # damped as the engine does (1% of mean diag)
    closed = obs_closed_form(t.w, Hd, 0, float(first.quantized[0]))
    engine = t.w.copy()
    engine[0] = first.quantized[0]
    engine[1:] += first.update[0]
    return {"engine": engine, "closed_form": closed.w_new, "rel_diff": rel_error(engine, closed.w_new)}


def lesson2_summary(data, cols=(247, 260, 100), row: int = 437) -> dict:
    """Lesson 2's headline numbers for a layer's data, on fixed weights (the notebook's three by default)."""
    t = pick_triplet(data, cols=cols, row=row)
    H = t.H
    rtn, orders = rtn_triplet(t), order_table(t)
    best, _ = exhaustive_triplet(t)
    return {"tokens": t.n_tokens, "correction_ratio": float(H[0, 0] * np.linalg.inv(H)[0, 0]),
            "rtn_over_gptq123": rtn.loss / orders[0].loss, "gptq123_over_best": orders[0].loss / best.loss,
            "some_order_finds_best": any(np.allclose(o.w_q, best.w_q) for o in orders)}


# ---- figures


def fig_obs_landscape(t: Triplet, q: int, target: float, closed: OBSSolution, search: GridSearch,
                      n: int = 121):
    """Contour of the measured loss over the two free weights, weight q fixed at target."""
    import plotly.graph_objects as go

    rest = [i for i in range(3) if i != q]
    span = np.abs(closed.w_new[rest] - t.w[rest]) * 1.6 + 1e-12
    lo = np.minimum(t.w[rest], closed.w_new[rest]) - 0.3 * span
    hi = np.maximum(t.w[rest], closed.w_new[rest]) + 0.3 * span
    a, b = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    A, B = np.meshgrid(a, b, indexing="ij")
    cand = np.empty((A.size, 3))
    cand[:, q] = target
    cand[:, rest[0]], cand[:, rest[1]] = A.ravel(), B.ravel()
    L = t.loss(cand).reshape(A.shape)
    names = [f"w{i + 1} (input {c})" for i, c in enumerate(t.cols)]
    fig = go.Figure(go.Contour(x=a, y=b, z=L.T, colorscale="Viridis", ncontours=30,
                               colorbar=dict(title="loss"), hovertemplate="%{x:.5f}, %{y:.5f}: %{z:.3e}"))
    pts = [("original weights (no correction)", t.w[rest], "x", "white"),
           ("closed-form OBS correction", closed.w_new[rest], "star", "red"),
           ("grid-search minimum", search.w_new[rest], "circle-open", "orange")]
    for label, p, sym, color in pts:
        marker = dict(symbol=sym, size=14, color=color, line=dict(width=2, color=color))
        fig.add_trace(go.Scatter(x=[p[0]], y=[p[1]], mode="markers", name=label, marker=marker))
    fig.update_layout(title=f"layer loss with {names[q]} fixed at its grid value", xaxis_title=names[rest[0]],
                      yaxis_title=names[rest[1]], height=480, legend=dict(orientation="h", y=-0.2))
    return fig


def fig_forced_change(t: Triplet, q: int, steps: int = 41):
    """Loss vs the forced change c of weight q: no correction (c^2 H_qq / 2), OBS correction
    (c^2 / (2 [H^-1]_qq)), and least squares on the activations at a few points."""
    import plotly.graph_objects as go

    H = t.H
    Hinv = np.linalg.inv(H)
    c = np.linspace(-1, 1, steps) * t.scale[q]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=c / t.scale[q], y=c * c * H[q, q] / 2, name="no correction: c² H_qq / 2"))
    fig.add_trace(go.Scatter(x=c / t.scale[q], y=c * c / (2 * Hinv[q, q]), name="OBS: c² / (2 [H⁻¹]_qq)"))
    cs = c[:: max(1, steps // 8)]
    ls = [obs_lstsq(t, q, t.w[q] + ci).loss for ci in cs]
    fig.add_trace(go.Scatter(x=cs / t.scale[q], y=ls, mode="markers", name="least squares on activations",
                             marker=dict(size=10, symbol="circle-open")))
    fig.update_layout(title=f"cost of moving w{q + 1} by c, with and without correcting the other two",
                      xaxis_title="c (in grid steps of this weight)", yaxis_title="layer loss", height=420,
                      legend=dict(orientation="h", y=-0.25))
    return fig
