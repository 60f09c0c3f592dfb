"""Lesson 6 (notebooks/06_damping_and_calibration.ipynb): damping and calibration data.

Damping sweeps on a real layer, the spectrum of H, dead and near-singular inputs, and calibration on one
domain evaluated on another; whole-model runs (too slow for the notebook: stored in
data/results/lessons/whole_model.json, and repeated over calibration seeds in
data/results/lessons/calibration_seeds/).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..engine import QuantConfig, gptq_quantize, rtn_quantize
from ..services.threads import single_blas_thread
from .bits_and_groups import model_storage
from .measures import errors, hessian_from, mean_error, output_rel_error
from .real_layers import RealLayers

DAMPS = (1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.99)  # 0.01 reference/AutoGPTQ, 0.05 GPTQModel, 0.1 optimum


def damping_sweep(layers: RealLayers, name: str, token_counts=(256, 1024, 4096), damps=DAMPS,
                  cfg: QuantConfig | None = None) -> list[dict]:
    """GPTQ with every damping on the first `n` calibration tokens of one layer, for each n; held-out error on
    the layer's held-out tokens. Also RTN (no H at all) for reference."""
    import warnings

    cfg = cfg or QuantConfig()
    W, Hh = layers.W[name], layers.H_heldout(name)
    X = layers.X_calib[(name, layers.corpora[0])]
    rows = []
    with single_blas_thread():
        rtn = rtn_quantize(W, cfg).weight
        for n in token_counts:
            if n > X.shape[0]:
                raise ValueError(f"only {X.shape[0]} calibration tokens captured, asked for {n}")
            H = hessian_from(X[:n])
            rows.append({"tokens": n, "damp_percent": 0.0, "method": "RTN", **errors(W, rtn, H, Hh),
                         "damp used": None})
            for d in damps:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a raised damping is reported in the row
                    res = gptq_quantize(W, H, cfg.replace(damp_percent=d))
                rows.append({"tokens": n, "damp_percent": d, "method": "GPTQ", **errors(W, res.weight, H, Hh),
                             "damp used": res.damp_percent_used})
    return rows


def best_damp(rows: list[dict], tokens: int, key: str = "held-out error") -> dict:
    gptq = [r for r in rows if r["tokens"] == tokens and r["method"] == "GPTQ"]
    return min(gptq, key=lambda r: r[key])


def row_at(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0]


def fig_damping(rows: list[dict]):
    """Held-out (solid) and calibration (dotted) error vs damp_percent, one colour per calibration size;
    RTN as horizontal lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for i, n in enumerate(dict.fromkeys(r["tokens"] for r in rows)):
        g = [r for r in rows if r["tokens"] == n and r["method"] == "GPTQ"]
        c = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=[r["damp_percent"] for r in g], y=[r["held-out error"] for r in g],
                                 mode="lines+markers", name=f"{n} tokens: held-out", line=dict(color=c)))
        fig.add_trace(go.Scatter(x=[r["damp_percent"] for r in g], y=[r["calibration error"] for r in g],
                                 mode="lines+markers", name=f"{n} tokens: calibration",
                                 line=dict(color=c, dash="dot")))
    rtn = next(r for r in rows if r["method"] == "RTN")
    fig.add_hline(y=rtn["held-out error"], line_dash="dash", line_color="#d62728",
                  annotation_text="RTN, held-out", annotation_position="top left")
    fig.update_xaxes(type="log", title_text="damp_percent (lambda = damp_percent x mean diag H)")
    fig.update_yaxes(type="log", title_text="||X(W-Q)^T|| / ||XW^T||")
    fig.update_layout(height=460, legend=dict(orientation="h", y=-0.2), margin=dict(t=40, b=40),
                      title="GPTQ vs damping, for three calibration sizes")
    return fig


def spectrum(H, damps=DAMPS) -> dict:
    """Eigenvalues of H (ascending), its rank and condition number, and for each damping the condition
    number of H + lambda I and how many eigenvalues lie below lambda (the directions damping dominates)."""
    H = np.asarray(H, dtype=np.float64)
    ev = np.linalg.eigvalsh(H)
    mean_diag = float(np.mean(np.diag(H)))
    tol = ev[-1] * H.shape[0] * np.finfo(np.float64).eps
    out = {"n": H.shape[0], "eigenvalues": ev, "rank": int(np.sum(ev > tol)), "mean_diag": mean_diag,
           "condition": float(ev[-1] / ev[0]) if ev[0] > tol else math.inf, "damped": []}
    for d in damps:
        lam = d * mean_diag
        out["damped"].append({"damp_percent": d, "lambda": lam,
                              "condition": float((ev[-1] + lam) / (ev[0] + lam)),
                              "eigenvalues below lambda": int(np.sum(ev < lam))})
    return out


def fig_spectrum(spectra: dict, damps=(0.01, 0.1)):
    """Eigenvalues of H (descending, log scale) for each calibration size, with lambda for a few dampings."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, sp in spectra.items():
        ev = np.clip(sp["eigenvalues"][::-1], 1e-12, None)  # exact zeros cannot be drawn on a log axis
        fig.add_trace(go.Scatter(x=np.arange(1, ev.size + 1), y=ev, mode="lines", name=label))
    first = next(iter(spectra.values()))
    for d in damps:
        lam = d * first["mean_diag"]
        fig.add_hline(y=lam, line_dash="dot", annotation_text=f"lambda at damp_percent={d:g}",
                      annotation_position="top right")
    fig.update_xaxes(title_text="eigenvalue rank")
    fig.update_yaxes(type="log", title_text="eigenvalue of H (zeros drawn at 1e-12)")
    fig.update_layout(height=420, legend=dict(orientation="h", y=-0.2), margin=dict(t=40, b=40),
                      title="the spectrum of H, and what damping adds")
    return fig


def diag_profile(H) -> dict:
    """How unequal the inputs are: diag(H) relative to its mean (what damping is measured against)."""
    d = np.diag(np.asarray(H, dtype=np.float64))
    m = d.mean()
    top = np.sort(d)[::-1]
    return {"mean": float(m), "median/mean": float(np.median(d) / m), "max/mean": float(d.max() / m),
            "min/mean": float(d.min() / m), "share of top 4": float(top[:4].sum() / d.sum()),
            "dead": int(np.sum(d == 0)), "below 1% of mean": int(np.sum(d < 0.01 * m))}


def dead_input_demo(W, X_calib, X_heldout, channel: int, cfg: QuantConfig | None = None,
                    factors=(1.0, 1e-2, 1e-4, 0.0)) -> list[dict]:
    """One input channel made quiet in the calibration data only (its activations multiplied by `factor`;
    0 = dead), while held-out text uses it normally. GPTQ's held-out error and what became of that channel's
    weights: the reference (and this engine) set a dead input's weights to exactly 0."""
    cfg = cfg or QuantConfig()
    W = np.asarray(W, dtype=np.float64)
    Hh = hessian_from(X_heldout)
    rows = []
    with single_blas_thread():
        rtn = rtn_quantize(W, cfg).weight
        for f in factors:
            X = np.array(X_calib, dtype=np.float64, copy=True)
            X[:, channel] *= f
            H = hessian_from(X)
            res = gptq_quantize(W, H, cfg)
            col = res.weight[:, channel]
            rows.append({"calibration activations of the channel": "dead (x0)" if f == 0 else f"x{f:g}",
                         "dead inputs found": int(np.sum(res.dead_columns)),
                         "channel weights: rel. change": float(np.linalg.norm(col - W[:, channel])
                                                                / np.linalg.norm(W[:, channel])),
                         "held-out error": output_rel_error(W, res.weight, Hh),
                         "held-out error, RTN": output_rel_error(W, rtn, Hh)})
    return rows


def domain_study(layers: RealLayers, cfg: QuantConfig | None = None, corpora=("prose", "code")) -> list[dict]:
    """GPTQ calibrated on each corpus, and on a mix of both (the same number of tokens: the first half of
    each), evaluated on held-out tokens of every corpus. RTN needs no calibration: one row."""
    cfg = cfg or QuantConfig()
    rows = []
    with single_blas_thread():
        for name in layers.names:
            W = layers.W[name]
            Hh = {c: layers.H_heldout(name, c) for c in corpora}
            Xs = [layers.X_calib[(name, c)] for c in corpora]
            n = min(x.shape[0] for x in Xs)
            mixed = np.concatenate([x[: n // len(Xs)] for x in Xs])
            calibs = {c: layers.H(name, c) for c in corpora}
            calibs[" + ".join(corpora)] = hessian_from(mixed)
            rtn = rtn_quantize(W, cfg).weight
            rows.append({"layer": layers.short(name), "calibrated on": "- (RTN)",
                         **{f"error on {c}": output_rel_error(W, rtn, Hh[c]) for c in corpora}})
            for cal, H in calibs.items():
                Q = gptq_quantize(W, H, cfg).weight
                rows.append({"layer": layers.short(name), "calibrated on": cal,
                             **{f"error on {c}": output_rel_error(W, Q, Hh[c]) for c in corpora}})
    return rows


def domain_summary(rows: list[dict], corpora=("prose", "code")) -> list[dict]:
    """Geometric mean over the layers, per calibration set and evaluation corpus."""
    out = []
    for cal in dict.fromkeys(r["calibrated on"] for r in rows):
        out.append({"calibrated on": cal, **{f"error on {c}": mean_error(rows, f"error on {c}", **{
            "calibrated on": cal}) for c in corpora}})
    return out


def input_similarity(layers: RealLayers, name: str, a: str = "prose", b: str = "code") -> dict:
    """How different two corpora look to one layer: the relative difference of their held-out Hessians, and
    of their calibration Hessians to each other."""
    Ha, Hb = layers.H_heldout(name, a), layers.H_heldout(name, b)
    Ca, Cb = layers.H(name, a), layers.H(name, b)
    rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))  # noqa: E731
    return {"held-out a vs b": rel(Ha, Hb), "calibration a vs held-out a": rel(Ca, Ha),
            "calibration b vs held-out b": rel(Cb, Hb)}


# ---- whole-model runs


def calibration_set(tokenizer, calib: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples windows from one corpus, or 'prose + code': half from each (the same number of tokens)."""
    from ..data import calibration_windows

    parts = [c.strip() for c in calib.split("+")]
    if len(parts) == 1:
        return calibration_windows(tokenizer, parts[0], nsamples, seqlen, seed)
    k = nsamples // len(parts)
    return torch.cat([calibration_windows(tokenizer, c, k, seqlen, seed) for c in parts])


def whole_model_run(lm, cfg: QuantConfig | None, method: str = "gptq", calib: str = "prose",
                    nsamples: int = 16, seqlen: int = 512, eval_corpora=("prose", "code"),
                    eval_windows: int = 8, seed: int = 0) -> dict:
    """Quantize a copy of the model (models.quantize.quantize_model, the paper's sequential method) and
    measure its perplexity on the first eval_windows x seqlen evaluation tokens of each corpus (the same
    tokens for every seed). `seed` draws the calibration windows. cfg=None (method "fp") evaluates the
    unquantized model."""
    from ..data import evaluation_ids
    from ..metrics import perplexity
    from ..models.quantize import quantize_model

    t = time.perf_counter()
    model = lm.model
    out = {"method": method, "calib": calib if method == "gptq" else "-", "nsamples": nsamples,
           "seqlen": seqlen, "eval_windows": eval_windows, "seed": seed if method == "gptq" else None}
    if cfg is not None:
        ids = calibration_set(lm.tokenizer, calib, nsamples, seqlen, seed) if method == "gptq" else None
        qm = quantize_model(lm, ids, cfg, method=method, progress=False, inplace=False,
                            hessian_condition=False)
        model = qm.model
        out["config"] = cfg.label()
        out["bits per weight"] = model_storage(lm, cfg.bits, cfg.group_size)["linear bits per weight"]
        out["dead inputs"] = sum(r.dead_columns or 0 for r in qm.layers)
    for c in eval_corpora:
        ids = evaluation_ids(lm.tokenizer, c, n_tokens=eval_windows * seqlen)
        out[f"ppl {c}"] = perplexity(model, ids, seqlen=seqlen, progress=False).ppl
    out["seconds"] = time.perf_counter() - t
    return out


def calibration_seed_runs(folder: str | Path | None = None) -> list[dict]:
    """Lesson 6's whole-model runs repeated over calibration seeds (benchmarks/lesson6_seeds.py writes one
    JSON per run into <results>/lessons/calibration_seeds/), sorted by calibration set and seed."""
    from ..services.results import read_reports
    from . import results_folder

    folder = Path(folder) if folder is not None else results_folder() / "calibration_seeds"
    runs = read_reports(folder, "benchmarks/lesson6_seeds.py")
    return sorted(runs, key=lambda r: (r["calib"], r["seed"]))


def seed_summary(runs: list[dict], corpora=("prose", "code")) -> list[dict]:
    """Per calibration set: how many seeds, and the mean, lowest and highest perplexity on each corpus."""
    out = []
    for calib in dict.fromkeys(r["calib"] for r in runs):
        rs = [r for r in runs if r["calib"] == calib]
        row = {"calibrated on": calib, "seeds": len(rs)}
        for c in corpora:
            v = [r[f"ppl {c}"] for r in rs]
            row.update({f"{c}: mean": float(np.mean(v)), f"{c}: lowest": min(v), f"{c}: highest": max(v)})
        out.append(row)
    return out


def seed_winners(runs: list[dict], corpora=("prose", "code")) -> list[dict]:
    """For each seed that has every calibration set: the perplexity of each on each corpus, and which
    calibration set scored best on each corpus."""
    calibs = list(dict.fromkeys(r["calib"] for r in runs))
    by = {(r["calib"], r["seed"]): r for r in runs}
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        if not all((c, seed) in by for c in calibs):
            continue
        row: dict = {"seed": seed}
        for corpus in corpora:
            vals = {c: by[(c, seed)][f"ppl {corpus}"] for c in calibs}
            row.update({f"{corpus}, calibrated on {c}": v for c, v in vals.items()})
            row[f"best on {corpus}"] = min(vals, key=vals.get)
        out.append(row)
    return out
