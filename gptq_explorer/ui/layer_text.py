"""The Layer Lab's text: what one step does (beside the figure) and the run's numbers (the summary box).

Pure functions of a Run (layer_run) and the crop window; the colours are the figure's (layer_figure.COLORS).
"""

from __future__ import annotations

import html

import numpy as np

from .layer_figure import COLORS
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
    lazy = ""
    if i2 < n:
        lazy = (f"Lazy batches (Step 2): this is block [{i1}, {i2}); columns from {i2} on receive this "
                "update when the block ends. The total is the same; it is shown here at once.")
    return f"""<div style='font-size:13px;line-height:1.45;padding:4px 6px'>
<b>Step {k + 1} of {n}</b>: input column <b>{j}</b> (position p = {k}, group {g}){rank}.
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
<li>Loss of this column: Σ({t(COLORS['err'], 'w − q')})² / (2{t(COLORS['hinv'], 'd')}²) = {run.losses[k]:.4g}.
So far: {t(COLORS['upd'], f'GPTQ {run.running[k]:.4g}')} vs
{t(COLORS['rtn'], f'RTN {run.running_rtn[k]:.4g}')}
(same columns rounded, nothing compensated).</li>
</ol>
<small style='color:#555'>{lazy} Crop: rows {win.r0}–{win.r1 - 1}, positions {win.c0}–{win.c1 - 1}.
</small></div>"""


def summary_html(run: Run) -> str:
    """The run's numbers, GPTQ next to RTN: weight MSE, held-out output MSE, the OBS loss."""
    s = run.summary
    ratio = s["heldout_ratio"]
    rows = [
        ("weight MSE", s["weight_mse_gptq"], s["weight_mse_rtn"]),
        (f"held-out output MSE ({s['heldout_tokens']} tokens)", s["heldout_mse_gptq"],
         s["heldout_mse_rtn"]),
        ("OBS loss L (calibration)", s["loss_gptq"], s["loss_rtn"]),
    ]
    td = "<td style='text-align:right;padding-left:8px'>"
    body = "".join(f"<tr><td>{name}</td>{td}{g:.3g}</td>{td}{r:.3g}</td></tr>" for name, g, r in rows)
    damp = ("" if abs(s["damp_percent_used"] - run.cfg.damp_percent) < 1e-12 else
            f"<br><b>Damping raised to {s['damp_percent_used']:g}</b> to make H + λI invertible.")
    return f"""<div style='font-size:13px;padding:4px 6px'>
<b>{html.escape(run.cfg.label())}</b> on {html.escape(run.name)}
<table style='border-collapse:collapse;margin:6px 0'>
<tr><th></th><th style='color:{COLORS['upd']}'>GPTQ</th><th style='color:{COLORS['rtn']}'>RTN</th></tr>{body}
</table>
Held-out error RTN / GPTQ = <b>{ratio:.2f}×</b>{damp}<br>
<small style='color:#555'>L = Σ<sub>q</sub> (w<sub>q</sub> − q<sub>q</sub>)² /
(2 [H<sub>F</sub><sup>−1</sup>]<sub>qq</sub>)
= ½ tr(ΔW (H + λI) ΔWᵀ), summed over rows, with H = 2/n · XᵀX and n = {s['calib_tokens']} calibration
<i>tokens</i> (the paper's code divides by sequences, so its L is seqlen× larger). Held-out tokens were never
used to build H. GPTQ + RTN computed in {run.seconds:.2f} s.</small></div>"""
