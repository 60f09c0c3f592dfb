"""Lesson 9 (notebooks/09_after_gptq.ipynb): after GPTQ.

Five methods the production quantizers ship beyond the 2022 paper, each a QuantConfig knob of the engine
(mse_norm, group_aware, gptaq_alpha, rotation, ternary), measured on real SmolLM2 layers; and GPTQ's geometry:
GPTQ run back to front is Babai's nearest-plane algorithm on the lattice of H (Chen et al. 2025,
arXiv 2507.18553), checked code for code against the engine, with RTN and the true closest lattice point
found by enumeration.

The notebook computes one layer live; the full table (three layers, five grids, and GPTAQ on three layers)
is stored in data/results/lessons/after_gptq.json, made once with make_stored (run this module:
`python -m gptq_explorer.lessons.after_gptq`).
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..engine import Hessian, QuantConfig, gptq_quantize, gptq_steps, rtn_quantize
from ..engine.rotation import hadamard_construction, hadamard_rotation
from ..services.threads import single_blas_thread
from .measures import errors, mean_error, rel_error
from .real_layers import RealLayers, load_real_layers

MSE_NORM = 2.4  # the reference's norm p for its MSE grid search

# name -> (quantizer, changes to the base config)
METHODS: dict[str, tuple[str, dict]] = {
    "RTN": ("rtn", {}),
    "RTN + MSE grid": ("rtn", {"mse_norm": MSE_NORM}),
    "RTN + rotation": ("rtn", {"rotation": "hadamard"}),
    "GPTQ": ("gptq", {}),
    "GPTQ + MSE grid": ("gptq", {"mse_norm": MSE_NORM}),
    "GPTQ + GAR": ("gptq", {"group_aware": True}),
    "GPTQ + desc_act": ("gptq", {"desc_act": True}),
    "GPTQ + desc_act + static_groups": ("gptq", {"desc_act": True, "static_groups": True}),
    "GPTQ + rotation": ("gptq", {"rotation": "hadamard"}),
    "GPTQ + rotation + desc_act": ("gptq", {"rotation": "hadamard", "desc_act": True}),
}
# with a ternary base config ({xmin, 0, xmax}; bits is ignored)
TERNARY_METHODS: dict[str, tuple[str, dict]] = {
    "RTN": ("rtn", {}),
    "RTN + MSE grid": ("rtn", {"mse_norm": MSE_NORM}),
    "GPTQ": ("gptq", {}),
    "GPTQ + MSE grid": ("gptq", {"mse_norm": MSE_NORM}),
}
STORED_CONFIGS = (QuantConfig(bits=4), QuantConfig(bits=3), QuantConfig(bits=3, group_size=-1),
                  QuantConfig(bits=2), QuantConfig(ternary=True))
LESSON_LAYERS = [(5, "self_attn.q_proj"), (5, "mlp.up_proj"), (5, "mlp.down_proj")]
CAPTURE = {"nsamples": 16, "seqlen": 256, "heldout_tokens": 1024}


# ---- the methods on real layers


def methods_for(cfg: QuantConfig) -> dict[str, tuple[str, dict]]:
    """The methods that apply to a base config: TERNARY_METHODS for a ternary one; no GAR without groups."""
    if cfg.ternary:
        return TERNARY_METHODS
    return {k: v for k, v in METHODS.items() if cfg.group_size != -1 or not v[1].get("group_aware")}


def quantize_with(W, H, cfg: QuantConfig, method: str):
    """The dequantized weights (original basis) of one method of methods_for(cfg) on W with Hessian H."""
    kind, changes = methods_for(cfg)[method]
    c = cfg.replace(**changes)
    return rtn_quantize(W, c).weight if kind == "rtn" else gptq_quantize(W, H, c).weight


def method_study(layers: RealLayers, configs=None, names=None, methods=None) -> list[dict]:
    """Every method on every named layer (default: all) and base config (default: 3-bit g128): calibration,
    held-out and weight errors, and the seconds it took (this machine, one BLAS thread)."""
    configs = configs or (QuantConfig(bits=3),)
    rows = []
    with single_blas_thread():
        for name in names or layers.names:
            W, H, Hh = layers.W[name], layers.H(name), layers.H_heldout(name)
            for cfg in configs:
                for m in methods or methods_for(cfg):
                    t = time.perf_counter()
                    Q = quantize_with(W, H, cfg, m)
                    rows.append({"layer": layers.short(name), "config": cfg.label(), "method": m,
                                 **errors(W, Q, H, Hh), "weight error": rel_error(Q, W),
                                 "seconds": time.perf_counter() - t})
    return rows


def method_summary(rows: list[dict], key: str = "held-out error", base: str = "GPTQ") -> list[dict]:
    """Per config and method: the geometric mean of `key` over the layers, its ratio to `base` (GPTQ in the
    same config) and on how many layers the method beats it."""
    out = []
    for cfg in dict.fromkeys(r["config"] for r in rows):
        ref = {r["layer"]: r[key] for r in rows if r["config"] == cfg and r["method"] == base}
        b = mean_error(rows, key, config=cfg, method=base)
        for m in dict.fromkeys(r["method"] for r in rows if r["config"] == cfg):
            mine = [r for r in rows if r["config"] == cfg and r["method"] == m]
            e = mean_error(rows, key, config=cfg, method=m)
            wins = sum(r[key] < ref[r["layer"]] for r in mine)
            out.append({"config": cfg, "method": m, key: e, f"vs {base}": e / b,
                        f"layers better than {base}": f"{wins}/{len(mine)}"})
    return out


def pick(rows: list[dict], **match) -> dict:
    """The one row that matches, e.g. pick(summary, config="3-bit g128 sym", method="GPTQ")."""
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0]


def ratios(rows: list[dict], config: str, method: str, base: str = "GPTQ",
           key: str = "held-out error") -> dict[str, float]:
    """{layer: method's `key` / base's `key`} in one config: below 1 = the method is better on that layer."""
    return {r["layer"]: r[key] / pick(rows, config=config, method=base, layer=r["layer"])[key]
            for r in rows if r["config"] == config and r["method"] == method}


def pivot(rows: list[dict], methods, configs=None, key: str = "held-out error",
          base: str = "GPTQ") -> list[dict]:
    """A table: one line per (config, method) with `key` on each layer, their geometric mean and its ratio
    to `base` in the same config. Methods a config lacks are left out."""
    out = []
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for cfg in configs or dict.fromkeys(r["config"] for r in rows):
        ref = mean_error(rows, key, config=cfg, method=base)
        for m in methods:
            if not any(r["config"] == cfg and r["method"] == m for r in rows):
                continue
            line = {"config": cfg, "method": m}
            line.update({lay: pick(rows, config=cfg, method=m, layer=lay)[key] for lay in layers})
            e = mean_error(rows, key, config=cfg, method=m)
            line.update({"geometric mean": e, f"vs {base}": e / ref})
            out.append(line)
    return out


# ---- rotation


def incoherence(W) -> float:
    """Mean over rows of max|w| / rms(w): 1 for a row of equal magnitudes, sqrt(n) for a single spike."""
    W = np.asarray(W, dtype=np.float64)
    return float(np.mean(np.abs(W).max(axis=1) / np.sqrt(np.mean(W**2, axis=1))))


def diag_spread(H) -> float:
    """max diag(H) / median diag(H): how much one input dominates (what desc_act sorts by)."""
    d = np.diag(np.asarray(H))
    return float(d.max() / np.median(d))


def rotation_facts(W, H, seed: int = 0) -> dict:
    """What a randomized Hadamard rotation R does to a layer: W -> W R^T, H -> R H R^T."""
    n = W.shape[1]
    R = hadamard_rotation(n, seed)
    return {"construction": hadamard_construction(n), "orthogonal": bool(np.allclose(R @ R.T, np.eye(n))),
            "incoherence before": incoherence(W), "incoherence after": incoherence(W @ R.T),
            "diag(H) max/median before": diag_spread(H), "diag(H) max/median after": diag_spread(R @ H @ R.T)}


# ---- ternary


def ternary_zero_share(W, H=None, methods=("RTN", "RTN + MSE grid")) -> dict[str, float]:
    """Share of the weights a ternary grid sets to 0 (code 1), per method of TERNARY_METHODS (g128 sym)."""
    cfg = QuantConfig(ternary=True)
    out = {}
    with single_blas_thread():
        for m in methods:
            kind, changes = TERNARY_METHODS[m]
            c = cfg.replace(**changes)
            res = rtn_quantize(W, c) if kind == "rtn" else gptq_quantize(W, H, c)
            out[m] = float(np.mean(np.asarray(res.codes) == 1))
    return out


# ---- GPTAQ: the full-precision model's inputs and the quantized model's


def capture_quantized_stream(lm, layers=LESSON_LAYERS, blocks: int = 5, cfg: QuantConfig | None = None,
                             **capture) -> RealLayers:
    """The inputs `layers` receive when blocks 0..blocks-1 are RTN-quantized with `cfg` (default 4-bit g128):
    the "quantized model's" stream X, for the same tokens as load_real_layers(lm, layers, **capture), which
    gives X_fp. The model's weights are restored afterwards (also on an error)."""
    import torch

    from ..models import get_weight, set_weight

    cfg = cfg or QuantConfig()
    blocks_list = lm.adapter.get_blocks(lm.model)
    saved = []
    try:
        for b in range(blocks):
            for m in lm.adapter.linears(blocks_list[b]).values():
                W = get_weight(m).detach().clone()
                saved.append((m, W))
                set_weight(m, torch.as_tensor(rtn_quantize(W.double().numpy(), cfg).weight))
        return load_real_layers(lm, list(layers), **{**CAPTURE, **capture})
    finally:
        for m, W in saved:
            set_weight(m, W)


def fp_output_error(W, Q, X, X_fp) -> float:
    """||X Q^T - X_fp W^T|| / ||X_fp W^T||: the layer's output, fed the quantized model's inputs X, against
    the full-precision model's output for the same tokens."""
    X, X_fp = np.asarray(X, dtype=np.float64), np.asarray(X_fp, dtype=np.float64)
    Y = X_fp @ np.asarray(W).T
    return float(np.linalg.norm(X @ np.asarray(Q).T - Y) / np.linalg.norm(Y))


def gptaq_study(fp: RealLayers, q: RealLayers, cfg: QuantConfig | None = None, alphas=(0.25, 1.0),
                names=None) -> list[dict]:
    """RTN, GPTQ and GPTAQ (each alpha) on the quantized stream q, measured against the full-precision
    stream fp (same tokens): fp_output_error on calibration and held-out tokens. "layer not quantized" is
    Q = W: what the earlier blocks' error alone costs. GPTQ's H and GPTAQ's dXXT come from one Hessian
    (X and X_fp of the calibration tokens)."""
    cfg = cfg or QuantConfig()
    rows = []
    with single_blas_thread():
        for name in names or fp.names:
            key = (name, fp.corpora[0])
            W = fp.W[name]
            Xc, Xc_fp, Xh, Xh_fp = q.X_calib[key], fp.X_calib[key], q.X_heldout[key], fp.X_heldout[key]
            h = Hessian(W.shape[1]).add_batch(Xc, X_fp=Xc_fp)
            Qs = {"layer not quantized": W, "RTN": rtn_quantize(W, cfg).weight,
                  "GPTQ": gptq_quantize(W, h.H, cfg).weight}
            for a in alphas:
                res = gptq_quantize(W, h.H, cfg.replace(gptaq_alpha=a), dXXT=h.dXXT)
                Qs[f"GPTAQ alpha={a:g}"] = res.weight
            drift = rel_error(Xh, Xh_fp)
            for m, Q in Qs.items():
                rows.append({"layer": fp.short(name), "config": cfg.label(), "method": m,
                             "input drift": drift,
                             "calibration error vs FP": fp_output_error(W, Q, Xc, Xc_fp),
                             "held-out error vs FP": fp_output_error(W, Q, Xh, Xh_fp)})
    return rows


# ---- GPTQ's geometry: Babai's nearest plane


def babai_nearest_plane(B, t) -> np.ndarray:
    """Babai's nearest-plane algorithm: integer coefficients c with B c close to the target t.

    The basis vectors are the columns b_1..b_n of B; the last one is handled first. B = Q R (QR), so in the
    coordinates y = Q^T t the lattice is R c with R upper triangular: c_n = round(y_n / R_nn) picks the
    nearest of the parallel planes span(b_1..b_{n-1}) + c_n b_n, the target is projected into it, and the
    same is done for c_{n-1}, ..., c_1. No bound on c: the lattice is infinite."""
    B = np.asarray(B, dtype=np.float64)
    Q, R = np.linalg.qr(B)
    y = Q.T @ np.asarray(t, dtype=np.float64)
    n = B.shape[1]
    c = np.zeros(n)
    for i in range(n - 1, -1, -1):
        c[i] = np.round((y[i] - R[i, i + 1 :] @ c[i + 1 :]) / R[i, i])
    return c


def babai_bound(B) -> float:
    """The nearest-plane guarantee: ||B c - t||^2 <= sum_i R_ii^2 / 4 (R from B = Q R), for every target."""
    R = np.linalg.qr(np.asarray(B, dtype=np.float64))[1]
    return float(np.sum(np.diag(R) ** 2) / 4)


def closest_point(B, t, radius2: float | None = None) -> np.ndarray:
    """The true closest lattice point (its coefficients c, minimizing ||B c - t||), by enumeration: every
    lattice point inside the sphere of squared radius `radius2` around t (default: Babai's answer's), depth
    first from the last coordinate (Fincke-Pohst), the sphere shrinking to each better point found."""
    B = np.asarray(B, dtype=np.float64)
    Q, R = np.linalg.qr(B)
    y = Q.T @ np.asarray(t, dtype=np.float64)
    n = B.shape[1]
    if radius2 is None:
        radius2 = float(np.sum((B @ babai_nearest_plane(B, t) - t) ** 2))
    best = {"d": radius2 * (1 + 1e-9) + 1e-300, "c": None}
    c = np.zeros(n)

    def search(i: int, partial: float) -> None:
        center = (y[i] - R[i, i + 1 :] @ c[i + 1 :]) / R[i, i]
        half = math.sqrt(max(best["d"] - partial, 0.0)) / abs(R[i, i])
        for k in range(math.ceil(center - half), math.floor(center + half) + 1):
            d = partial + (R[i, i] * (center - k)) ** 2
            if d < best["d"]:
                c[i] = k
                if i == 0:
                    best["d"], best["c"] = d, c.copy()
                else:
                    search(i - 1, d)

    search(n - 1, 0.0)
    if best["c"] is None:  # only when radius2 was smaller than the distance to every point
        raise ValueError(f"no lattice point within squared distance {radius2}")
    return best["c"]


GRID_BITS = 8  # the unclipped runs: 8-bit codes, zero 128, a scale that keeps every code well inside 1..254


def gptq_unclipped(W, H, scale: float, order=None, damp_percent: float = 0.01):
    """GPTQ's codes on the infinite lattice scale * Z^n, from the engine's own column loop (its stepper),
    in the processing `order` (default: columns in order). The engine's grid for one scale per row is
    replaced by this fixed scale and a zero point of 128 of an 8-bit grid; the weights must stay far enough
    inside the grid that no code is clipped (checked). Returns (c, Hd): the integer coefficients c = code -
    128 (d_out, d_in) in the original column order, and the damped H the loop used (original order)."""
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    n = W.shape[1]
    order = np.arange(n) if order is None else np.asarray(order)
    cfg = QuantConfig(bits=GRID_BITS, group_size=-1, damp_percent=damp_percent)
    stepper = gptq_steps(W[:, order], np.asarray(H)[np.ix_(order, order)], cfg)
    zero = 2 ** (GRID_BITS - 1)
    stepper.prepared.row_grid = (np.full(W.shape[0], float(scale)), np.full(W.shape[0], float(zero)))
    for _ in stepper:
        pass
    codes = np.asarray(stepper.result.codes)
    if codes.min() <= 0 or codes.max() >= 2**GRID_BITS - 1:
        raise ValueError("a code reached the edge of the 8-bit grid: the lattice was clipped; use a larger "
                         "scale or smaller weights")
    c = np.empty_like(codes, dtype=np.float64)
    c[:, order] = codes - zero
    Hd = np.empty_like(stepper.prepared.H)
    Hd[np.ix_(order, order)] = stepper.prepared.H
    return c, Hd


def lattice_error(w, c, H, scale: float = 1.0) -> float:
    """(w - q)^T H (w - q) with q = scale * c: the layer's output error for one row."""
    e = np.asarray(w, dtype=np.float64) - scale * np.asarray(c, dtype=np.float64)
    return float(e @ np.asarray(H) @ e)


def upper_cholesky(H) -> np.ndarray:
    """U upper triangular with H = U^T U (numpy's lower factor, transposed)."""
    return np.linalg.cholesky(np.asarray(H, dtype=np.float64)).T


def random_problem(n: int, rng, rows: int = 1, correlation: float = 0.9):
    """A small CVP of GPTQ's kind: H = 2/m X^T X of correlated inputs (m = 4n tokens, a shared factor of
    weight `correlation`), weights uniform in [-20, 20] steps of the lattice (scale 1)."""
    m = 4 * n
    X = np.sqrt(1 - correlation**2) * rng.standard_normal((m, n)) + correlation * rng.standard_normal((m, 1))
    X = X * np.exp(0.5 * rng.standard_normal(n))
    H = 2 / m * X.T @ X
    return rng.uniform(-20, 20, size=(rows, n)), H


@dataclass
class LatticeExample:
    """One row's problem and every method's answer: coefficients c (q = scale * c) and errors."""

    w: np.ndarray  # (n,) weights, in steps of the lattice
    H: np.ndarray  # (n, n) the damped Hessian GPTQ used
    codes: dict  # method -> c (n,)
    error: dict  # method -> (w - q)^T H (w - q)
    bound: float  # Babai's guarantee for GPTQ back to front

    def rows(self) -> list[dict]:
        best = self.error["closest point (enumeration)"]
        return [{"method": k, "coefficients": str(self.codes[k].astype(int).tolist()), "error": v,
                 "vs closest point": v / best} for k, v in self.error.items()]


def lattice_example(w, H, scale: float = 1.0) -> LatticeExample:
    """RTN, GPTQ front to back (the engine's default order), GPTQ back to front, Babai with the upper
    Cholesky factor of H, and the enumerated closest point, for one row w on the lattice scale * Z^n."""
    w = np.asarray(w, dtype=np.float64)
    n = w.size
    fwd, Hd = gptq_unclipped(w[None], H, scale)
    back, _ = gptq_unclipped(w[None], H, scale, order=np.arange(n)[::-1])
    U = upper_cholesky(Hd)
    B, t = scale * U, U @ w
    codes = {"RTN": np.round(w / scale), "GPTQ (front to back)": fwd[0], "GPTQ (back to front)": back[0],
             "Babai, basis U (H = U^T U)": babai_nearest_plane(B, t)}
    codes["closest point (enumeration)"] = closest_point(
        B, t, min(lattice_error(w, c, Hd, scale) for c in codes.values()))
    err = {k: lattice_error(w, c, Hd, scale) for k, c in codes.items()}
    return LatticeExample(w, Hd, codes, err, babai_bound(B))


EXAMPLE_2D = {"w": (0.3, 0.45), "H": ((1.0, 0.8), (0.8, 1.0))}  # the figure's problem (scale 1)


def babai_agreement(dims=(2, 3, 5, 8), problems: int = 50, rows: int = 8, seed: int = 0) -> list[dict]:
    """On random problems (random_problem, scale 1) per dimension: does GPTQ's code equal Babai's, code for
    code? Back to front against the upper Cholesky factor, front to back against Babai on the same basis
    listed in reverse, and back to front against another factor of H (its symmetric square root: the
    lattice, not the factor, decides). Also how GPTQ back to front compares with RTN and the closest point,
    and whether every error respects Babai's bound."""
    rng = np.random.default_rng(seed)
    out = []
    for n in dims:
        tally = dict.fromkeys(("back = Babai(U)", "front = Babai(reversed)", "back = Babai(sqrt H)",
                               "GPTQ < RTN", "GPTQ = RTN", "GPTQ > RTN", "GPTQ = closest", "within bound"), 0)
        ratio = []
        for _ in range(problems):
            W, H = random_problem(n, rng, rows)
            back, Hd = gptq_unclipped(W, H, 1.0, order=np.arange(n)[::-1])
            fwd, _ = gptq_unclipped(W, H, 1.0)
            U, F = upper_cholesky(Hd), _lower_factor(Hd)
            vals, vecs = np.linalg.eigh(Hd)
            S = vecs @ np.diag(np.sqrt(vals)) @ vecs.T
            Jrev = np.arange(n)[::-1]
            bound = babai_bound(U)
            for r, w in enumerate(W):
                tally["back = Babai(U)"] += bool(np.array_equal(back[r], babai_nearest_plane(U, U @ w)))
                cr = babai_nearest_plane(F[:, Jrev], F @ w)  # F's columns listed back to front
                c_front = np.empty(n)
                c_front[Jrev] = cr
                tally["front = Babai(reversed)"] += bool(np.array_equal(fwd[r], c_front))
                tally["back = Babai(sqrt H)"] += bool(np.array_equal(back[r], babai_nearest_plane(S, S @ w)))
                e_g, e_r = lattice_error(w, back[r], Hd), lattice_error(w, np.round(w), Hd)
                e_best = lattice_error(w, closest_point(U, U @ w, min(e_g, e_r)), Hd)
                tally["GPTQ < RTN"] += e_g < e_r * (1 - 1e-12)
                tally["GPTQ = RTN"] += abs(e_g - e_r) <= 1e-12 * e_r
                tally["GPTQ > RTN"] += e_g > e_r * (1 + 1e-12)
                tally["GPTQ = closest"] += e_g <= e_best * (1 + 1e-12)
                tally["within bound"] += e_g <= bound * (1 + 1e-12)
                ratio.append(e_g / e_best)
        total = problems * rows
        out.append({"dimension": n, "problems": total, **{k: v / total for k, v in tally.items()},
                    "GPTQ / closest (mean)": float(np.mean(ratio)),
                    "GPTQ / closest (max)": float(np.max(ratio))})
    return out


def _lower_factor(H) -> np.ndarray:
    """F lower triangular with H = F^T F: the Cholesky factor taken from the last column (J U' J with U'
    the upper factor of the reversed H). Babai on F's columns listed back to front is GPTQ front to back."""
    J = np.arange(H.shape[0])[::-1]
    return upper_cholesky(np.asarray(H)[np.ix_(J, J)])[np.ix_(J, J)]


EXAMPLE_3D = {"w": (0.37, 0.13, 0.31), "H": ((1.0, 0.8, 0.6), (0.8, 1.0, 0.8), (0.6, 0.8, 1.0))}

MARKERS = {"RTN": ("square", "#d62728"), "GPTQ (front to back)": ("triangle-up", "#9467bd"),
           "GPTQ (back to front)": ("circle", "#1f77b4"),
           "closest point (enumeration)": ("diamond", "#2ca02c")}


def _ellipse(center, M, r2: float, k: int = 120) -> np.ndarray:
    """Points x with (x - center)^T M (x - center) = r2 (2-D), (k, 2)."""
    vals, vecs = np.linalg.eigh(M)
    th = np.linspace(0, 2 * np.pi, k)
    circle = np.stack([np.cos(th), np.sin(th)])
    return (np.asarray(center)[:, None] + vecs @ (np.sqrt(r2 / vals)[:, None] * circle)).T


def fig_lattice_2d(ex: LatticeExample, half: float = 1.6):
    """The 2-D problem in weight space (left: the lattice Z^2, the error ellipses (w-q)^T H (w-q) = error of
    each answer) and mapped by the upper Cholesky factor U of H (right: the lattice U Z^2, where the error
    is the plain distance and the ellipses are circles), `half` lattice steps around w. GPTQ back to front:
    round w_2 (the nearest of the horizontal planes), move to the best point on that plane (the OBS update;
    on the right a perpendicular drop), round w_1 there."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    w, H = ex.w, ex.H
    U = upper_cholesky(H)
    c2 = int(ex.codes["GPTQ (back to front)"][1])
    w_obs = np.array([w[0] - H[0, 1] / H[0, 0] * (c2 - w[1]), c2])  # the H-projection onto x_2 = c2
    reach = int(np.ceil(3 * half)) + 1
    lo = np.round(w).astype(int) - reach
    ks = range(lo[1], lo[1] + 2 * reach + 1)
    grid = np.array(list(itertools.product(range(lo[0], lo[0] + 2 * reach + 1), ks)), dtype=float)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=("weight space: lattice Z², error ellipses of H",
                                        "mapped by U (H = UᵀU): error = distance, ellipses = circles"))
    for col, T in ((1, np.eye(2)), (2, U)):
        P = grid @ T.T
        fig.add_trace(go.Scatter(x=P[:, 0], y=P[:, 1], mode="markers", marker=dict(size=7, color="#aaaaaa"),
                                 name="lattice points", showlegend=col == 1, hoverinfo="skip"),
                      row=1, col=col)
        for k in ks:  # the planes (here lines) c_2 = k
            ends = np.array([[lo[0] - 1.0, k], [lo[0] + 2 * reach + 1.0, k]]) @ T.T
            fig.add_trace(go.Scatter(x=ends[:, 0], y=ends[:, 1], mode="lines", hoverinfo="skip",
                                     line=dict(color="#1f77b4" if k == c2 else "#cccccc",
                                               width=2 if k == c2 else 1, dash="dot"),
                                     name="the plane GPTQ picks (c₂ fixed)",
                                     showlegend=bool(col == 1 and k == c2)),
                          row=1, col=col)
        for m, (_, color) in MARKERS.items():
            e = _ellipse(w, H, ex.error[m]) @ T.T
            fig.add_trace(go.Scatter(x=e[:, 0], y=e[:, 1], mode="lines", line=dict(color=color, width=1),
                                     showlegend=False, hoverinfo="skip"), row=1, col=col)
        for m, (symbol, color) in MARKERS.items():
            p = T @ ex.codes[m]
            closest = m.startswith("closest")
            fig.add_trace(go.Scatter(x=[p[0]], y=[p[1]], mode="markers", name=f"{m}: error {ex.error[m]:.3f}",
                                     marker=dict(symbol=symbol + ("-open" if closest else ""),
                                                 size=22 if closest else 12, color=color,
                                                 line=dict(width=3 if closest else 1)),
                                     showlegend=col == 1), row=1, col=col)
        path = np.array([w, w_obs, ex.codes["GPTQ (back to front)"]]) @ T.T
        fig.add_trace(go.Scatter(x=path[:, 0], y=path[:, 1], mode="lines+markers", marker=dict(size=5),
                                 name="GPTQ back to front: round w₂, OBS update, round w₁",
                                 line=dict(color="#1f77b4", width=2), showlegend=col == 1), row=1, col=col)
        t = T @ w
        fig.add_trace(go.Scatter(x=[t[0]], y=[t[1]], mode="markers", name="w (full precision)",
                                 marker=dict(symbol="star", size=15, color="black"), showlegend=col == 1),
                      row=1, col=col)
        fig.update_xaxes(range=[t[0] - half, t[0] + half], row=1, col=col)
        fig.update_yaxes(range=[t[1] - half, t[1] + half], row=1, col=col)
    fig.update_yaxes(scaleanchor="x", scaleratio=1, row=1, col=1)
    fig.update_yaxes(scaleanchor="x2", scaleratio=1, row=1, col=2)
    fig.update_layout(height=430, margin=dict(t=40, b=30, l=30, r=10),
                      legend=dict(font=dict(size=11), orientation="h", y=-0.08))
    return fig


def fig_lattice_3d(ex: LatticeExample, span: int = 1):
    """The 3-D problem in weight space: the lattice points near w, coloured by their error (w-q)^T H (w-q),
    and each method's answer."""
    import plotly.graph_objects as go

    lo = np.round(ex.w).astype(int) - span
    pts = np.array(list(itertools.product(*[range(a, a + 2 * span + 1) for a in lo])), dtype=float)
    err = np.array([lattice_error(ex.w, p, ex.H) for p in pts])
    fig = go.Figure(go.Scatter3d(x=pts[:, 0], y=pts[:, 1], z=pts[:, 2], mode="markers", name="lattice points",
                                 marker=dict(size=4, color=err, colorscale="Viridis", cmin=0.0,
                                             cmax=float(np.sort(err)[8]),
                                             colorbar=dict(title="error", len=0.6)),
                                 hovertemplate="%{x}, %{y}, %{z}: error %{marker.color:.3f}<extra></extra>"))
    for m, (_, color) in MARKERS.items():
        p = ex.codes[m]
        fig.add_trace(go.Scatter3d(x=[p[0]], y=[p[1]], z=[p[2]], mode="markers",
                                   name=f"{m}: error {ex.error[m]:.3f}",
                                   marker=dict(size=9, color=color, symbol="diamond" if "closest" in m else
                                               "square" if m == "RTN" else "circle")))
    fig.add_trace(go.Scatter3d(x=[ex.w[0]], y=[ex.w[1]], z=[ex.w[2]], mode="markers", name="w",
                               marker=dict(size=6, color="black", symbol="cross")))
    fig.update_layout(height=460, margin=dict(t=20, b=10, l=0, r=0), legend=dict(x=0, y=1),
                      scene=dict(aspectmode="data", camera=dict(eye=dict(x=1.7, y=-1.2, z=0.7))))
    return fig


# ---- the stored run


def round_floats(rows: list[dict], digits: int = 4) -> list[dict]:
    """Floats to `digits` significant digits (the stored file's precision)."""
    def r(v):
        return float(f"{v:.{digits}g}") if isinstance(v, float) else v

    return [{k: r(v) for k, v in row.items()} for row in rows]


def make_stored(lm, path=None) -> dict:
    """The full run the notebook quotes: method_study on LESSON_LAYERS for STORED_CONFIGS, rotation_facts per
    layer and gptaq_study at 4 and 3 bits (earlier blocks RTN 4-bit g128), with CAPTURE's tokens. Written to
    <results>/lessons/after_gptq.json (or `path`) when path is not False."""
    from . import results_folder

    t = time.perf_counter()
    fp = load_real_layers(lm, LESSON_LAYERS, **CAPTURE)
    q = capture_quantized_stream(lm, LESSON_LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        methods = method_study(fp, STORED_CONFIGS)
        gptaq = gptaq_study(fp, q, QuantConfig(bits=4)) + gptaq_study(fp, q, QuantConfig(bits=3))
    rotation = {fp.short(n): rotation_facts(fp.W[n], fp.H(n)) for n in fp.names}
    zeros = {fp.short(n): ternary_zero_share(fp.W[n], fp.H(n), tuple(TERNARY_METHODS)) for n in fp.names}
    out = {
        "how": [
            "Lesson 9's full run, made once with make_stored (lessons.after_gptq) on the offline "
            "smollm2-135m: `python -m gptq_explorer.lessons.after_gptq`; floats to 4 significant digits; "
            "seconds are that machine's (2 busy cores, one BLAS thread), for scale only.",
            f"Layers {', '.join(fp.short(n) for n in fp.names)}; calibration {CAPTURE['nsamples']} x "
            f"{CAPTURE['seqlen']} prose tokens (seed 0), held-out: the first {CAPTURE['heldout_tokens']} "
            "tokens of prose's evaluation part. Errors are relative output errors "
            "||X (W - Q)^T|| / ||X W^T||.",
            "methods: method_study with the configs " + ", ".join(c.label() for c in STORED_CONFIGS)
            + f"; MSE grid norm {MSE_NORM}; rotation seed 0.",
            "ternary zeros: the share of weights set to 0 by each ternary method (ternary_zero_share).",
            "gptaq: blocks 0-4 RTN-quantized (4-bit g128 sym) give the quantized stream X, the unchanged "
            "model X_fp, same tokens; errors of X Q^T against X_fp W^T (gptaq_study).",
        ],
        "seconds": round(time.perf_counter() - t, 1),
        "numbers": {"methods": round_floats(methods), "gptaq": round_floats(gptaq),
                    "rotation": {k: round_floats([v])[0] for k, v in rotation.items()},
                    "ternary zeros": {k: round_floats([v])[0] for k, v in zeros.items()}},
    }
    if path is not False:
        dest = results_folder() / "after_gptq.json" if path is None else path
        dest.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    from ..models import load_model
    from .display import setup

    setup()
    res = make_stored(load_model("smollm2-135m"))
    print(f"stored in {res['seconds']} s")
