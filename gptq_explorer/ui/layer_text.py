"""The Layer Lab's text: what one step does (beside the figure) and the run's numbers (the summary box).

Pure functions of a Run (layer_run) and the crop window; the colours are the figure's hues, darker where text
needs it (layer_figure.TEXT_COLORS).
"""

from __future__ import annotations

import html

import numpy as np

from .layer_figure import TEXT_COLORS as COLORS
from .layer_run import Run, Window


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _t(color: str, s: str) -> str:
    return f"<span style='color:{color};font-weight:600'>{s}</span>"


def explain_html(run: Run, k: int, win: Window) -> str:
    """Step k of the run in words and numbers: the column, its rounding, its error, the update."""
    cfg, n = run.cfg, run.n
    j, g, d = int(run.perm[k]), int(run.group[k]), float(run.hinv_diag[k])
    w, q = run.Wq[:, k], run.Q[:, k]
    err = w - q
    upd = np.abs(run.Err[:, k]).max() * (np.abs(run.U[k, k + 1:]).max() if k + 1 < n else 0.0)
    scale = float(np.mean(run.scales[:, g])) if run.scales.size else float("nan")
    i1, i2 = run.block_of(k)
    t = _t
    rank = ""
    if cfg.desc_act:
        rank = f" — desc_act: the input with the {_ordinal(k + 1)} largest {t(COLORS['hinv'], 'diag(H)')}"
    elif cfg.group_aware:
        width = cfg.group_width(n)
        rank = (f" — GAR: original group {j // width}, the {_ordinal(k // width + 1)} group processed "
                f"(groups by their largest {t(COLORS['hinv'], 'diag(H)')}, columns inside by it)")
    basis = ""
    if run.R is not None:
        basis = (f"<br><small>Rotated: GPTQ works on W Rᵀ with H' = R H Rᵀ, so column {j} is the rotated "
                 f"input (R x)<sub>{j}</sub>, a mix of the original inputs. Toggle <i>basis</i> to see the "
                 "views · R.</small>")
    gptaq = ""
    if run.P is not None:
        # the largest |w (x) P[p, F]| without forming it
        corr = float(np.abs(w).max() * np.abs(run.P[k, k + 1:]).max()) if k + 1 < n else 0.0
        gptaq = (f"<li>GPTAQ (α = {cfg.gptaq_alpha:g}): the later columns also move by "
                 f"{t(COLORS['corr'], '+ w ⊗ P<sub>p,F</sub>')}, P = α triu(ΔXXᵀ Uᵀ) U, so the layer fits "
                 "the full-precision model's output; largest "
                 f"|{t(COLORS['corr'], 'correction')}| = {corr:.3g}.</li>")
    lazy = ""
    if i2 < n:
        lazy = (f"Lazy batches (Step 2): this is block [{i1}, {i2}); columns from {i2} on receive this "
                "update when the block ends. The total is the same; it is shown here at once.")
    return f"""<div style='font-size:13px;line-height:1.45;padding:4px 6px'>
<b>Step {k + 1} of {n}</b>: input column <b>{j}</b> (position p = {k}, group {g}){rank}.{basis}
<ol style='padding-left:18px;margin:6px 0'>
<li>Take the column as it is now, {t(COLORS['w'], 'w')} (every earlier update applied), and round it onto
the group's {cfg.bits}-bit {'symmetric' if cfg.sym else 'asymmetric'} grid:
{t(COLORS['q'], 'q = quant(w)')}, mean scale {scale:.3g}.</li>
<li>Its error, scaled by the inverse Hessian: {t(COLORS['err'], 'e = (w − q)')} / {t(COLORS['hinv'], 'd')},
with {t(COLORS['hinv'], 'd = U<sub>pp</sub> = √[H<sub>F</sub><sup>−1</sup>]<sub>pp</sub>')} = {d:.4g};
‖{t(COLORS['err'], 'w − q')}‖ = {np.linalg.norm(err):.4g}.</li>
<li>Spread it over the {n - k - 1} columns not yet quantized (OBS update, Eq. 3):
{t(COLORS['upd'], 'ΔW<sub>:,F</sub>')} = −{t(COLORS['err'], 'e')} · {t(COLORS['hinv'], 'U<sub>p,F</sub>')};
largest |{t(COLORS['upd'], 'ΔW')}| = {upd:.3g}.</li>
{gptaq}
<li>Loss of this column: Σ({t(COLORS['err'], 'w − q')})² / (2{t(COLORS['hinv'], 'd')}²) = {run.losses[k]:.4g}.
So far: {t(COLORS['upd'], f'GPTQ {run.running[k]:.4g}')} vs
{t(COLORS['rtn'], f'RTN {run.running_rtn[k]:.4g}')}
(same columns rounded, nothing compensated).</li>
</ol>
<small style='color:#555'>{lazy} Crop: rows {win.r0}–{win.r1 - 1}, positions {win.c0}–{win.c1 - 1}.
</small></div>"""


def summary_html(run: Run) -> str:
    """The run's numbers, GPTQ next to RTN: weight MSE, held-out output MSE, the OBS loss. GPTAQ's run also
    has plain GPTQ on the same inputs, and the distance from the full-precision model's output."""
    s = run.summary
    ratio = s["heldout_ratio"]
    gptaq = "heldout_mse_gptq0" in s
    keys = ("gptq", "gptq0", "rtn") if gptaq else ("gptq", "rtn")
    rows = [
        ("weight MSE", "weight_mse"),
        (f"held-out output MSE ({s['heldout_tokens']} tokens)", "heldout_mse"),
    ]
    if "heldout_fp_mse_gptq" in s:
        rows.append(("held-out vs full-precision output", "heldout_fp_mse"))
    rows.append(("OBS loss L (calibration)", "loss"))
    td = "<td style='text-align:right;padding-left:8px'>"
    body = "".join(f"<tr><td>{name}</td>" + "".join(f"{td}{s[f'{key}_{m}']:.3g}</td>" for m in keys) + "</tr>"
                   for name, key in rows)
    heads = {"gptq": (COLORS["upd"], "GPTAQ" if gptaq else "GPTQ"), "gptq0": (COLORS["corr"], "GPTQ"),
             "rtn": (COLORS["rtn"], "RTN")}
    head = "".join(f"<th style='color:{heads[m][0]}'>{heads[m][1]}</th>" for m in keys)
    damp = ("" if abs(s["damp_percent_used"] - run.cfg.damp_percent) < 1e-12 else
            f"<br><b>Damping raised to {s['damp_percent_used']:g}</b> to make H + λI invertible.")
    inputs = ""
    if "heldout_fp_mse_gptq" in s:
        inputs = ("<br><small style='color:#555'>Inputs: the quantized model's (the layers before this one "
                  "rounded); <i>vs full-precision output</i> compares X Qᵀ with the full-precision model's "
                  "X<sub>fp</sub> Wᵀ.</small>")
    return f"""<div style='font-size:13px;padding:4px 6px'>
<b>{html.escape(run.cfg.label())}</b> on {html.escape(run.name)}
<table style='border-collapse:collapse;margin:6px 0'>
<tr><td></td>{head}</tr>{body}
</table>
Held-out error RTN / GPTQ = <b>{ratio:.2f}×</b>{damp}{inputs}<br>
<small style='color:#555'>L = Σ<sub>q</sub> (w<sub>q</sub> − q<sub>q</sub>)² /
(2 [H<sub>F</sub><sup>−1</sup>]<sub>qq</sub>)
= ½ tr(ΔW (H + λI) ΔWᵀ), summed over rows, with H = 2/n · XᵀX and n = {s['calib_tokens']} calibration
<i>tokens</i> (the paper's code divides by sequences, so its L is seqlen× larger). Held-out tokens were never
used to build H. Computed in {run.seconds:.2f} s.</small></div>"""
