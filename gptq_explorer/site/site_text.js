// The static Layer Lab's text beside the figure (docs/site.md): the step's explanation and the run's summary,
// in the app's wording (ui/layer_text.py: explain_html, summary_html), as functions of the numbers alone. A
// classic script (the page may be opened from file://): it sets window.gptqSiteText, which site.js reads.

"use strict";

(function () {
  // the explanation's and summary's colours: the app's text colours (layer_figure.TEXT_COLORS), the figure's
  // darkened to a contrast of 4.5:1 on white
  const COLORS = { w: "#1f77b4", q: "#b35900", err: "#d62728", hinv: "#7b4fa8", upd: "#237f23", rtn: "#666666" };
  const t = (color, s) => `<span style='color:${color};font-weight:600'>${s}</span>`;
  const ordinal = (n) => n + ((n % 100 >= 10 && n % 100 <= 20) ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th"));

  function g3(x, p = 3) {  // Python's {:.3g}
    if (!Number.isFinite(x)) return String(x);
    if (x === 0) return "0";
    const e = Math.floor(Math.log10(Math.abs(x)));
    if (e < -4 || e >= p) return x.toExponential(p - 1).replace(/\.?0+e/, "e").replace(/e([+-])(\d)$/, "e$10$2");
    return String(Number(x.toPrecision(p)));
  }

  // QuantConfig.label
  const labelOf = (cfg) => `${cfg.bits}-bit ${cfg.group_size === -1 ? "per-row" : "g" + cfg.group_size} `
    + `${cfg.sym ? "sym" : "asym"}${cfg.desc_act ? " desc_act" : ""}${cfg.static_groups ? " static" : ""}`;

  // Step m.k of a run of n columns with settings cfg (m: the frame's numbers, gptq_worker.frameOf's meta);
  // rtnRunning: RTN's running loss at the same position (undefined while RTN's curve is computed)
  function explainHtml(m, cfg, n, rtnRunning) {
    const k = m.k, [i1, i2] = m.block, scale = m.scale_mean;
    const rank = cfg.desc_act ? ` — desc_act: the input with the ${ordinal(k + 1)} largest ${t(COLORS.hinv, "diag(H)")}` : "";
    const lazy = i2 < n ? `Lazy batches (Step 2): this is block [${i1}, ${i2}); columns from ${i2} on receive this update `
      + "when the block ends. The total is the same; it is shown here at once." : "";
    return `<div style='font-size:13px;line-height:1.45;padding:4px 6px'>
<b>Step ${k + 1} of ${n}</b>: input column <b>${m.column}</b> (position p = ${k}, group ${m.group})${rank}.
<ol style='padding-left:18px;margin:6px 0'>
<li>Take the column as it is now, ${t(COLORS.w, "w")} (every earlier update applied), and round it onto
the group's ${cfg.bits}-bit ${cfg.sym ? "symmetric" : "asymmetric"} grid:
${t(COLORS.q, "q = quant(w)")}, mean scale ${g3(scale)}.</li>
<li>Its error, scaled by the inverse Hessian: ${t(COLORS.err, "e = (w − q)")} / ${t(COLORS.hinv, "d")},
with ${t(COLORS.hinv, "d = U<sub>pp</sub> = √[H<sub>F</sub><sup>−1</sup>]<sub>pp</sub>")} = ${g3(m.d, 4)};
‖${t(COLORS.err, "w − q")}‖ = ${g3(m.err_norm, 4)}.</li>
<li>Spread it over the ${n - k - 1} columns not yet quantized (OBS update, Eq. 3):
${t(COLORS.upd, "ΔW<sub>:,F</sub>")} = −${t(COLORS.err, "e")} · ${t(COLORS.hinv, "U<sub>p,F</sub>")};
largest |${t(COLORS.upd, "ΔW")}| = ${g3(m.upd_max)}.</li>
<li>Loss of this column: Σ(${t(COLORS.err, "w − q")})² / (2${t(COLORS.hinv, "d")}²) = ${g3(m.loss, 4)}.
So far: ${t(COLORS.upd, `GPTQ ${g3(m.running, 4)}`)} vs ${t(COLORS.rtn, `RTN ${rtnRunning === undefined ? "…" : g3(rtnRunning, 4)}`)}
(same columns rounded, nothing compensated).</li>
</ol>
<small style='color:#555'>${lazy} Crop: rows ${m.r0}–${m.r1 - 1}, positions ${m.c0}–${m.c1 - 1}.</small></div>`;
  }

  // The run's numbers s (the summary's keys, `<what>_gptq` and `<what>_rtn`; undefined: still computing, shown
  // as "…"), for a run with settings cfg on the layer entry (the manifest's); heldout: the layer has held-out
  // inputs; complete: every number is in; partial: GPTQ still runs; seconds: GPTQ's time in the worker
  function summaryHtml(s, { cfg, entry: e, heldout, complete, partial, seconds }) {
    const num = (x) => (x === undefined ? "…" : g3(x));
    const rows = [["weight MSE", "weight_mse"], [`calibration output MSE (${e.calibration.tokens} tokens)`, "calib_mse"]];
    if (heldout) rows.push([`held-out output MSE (${e.heldout.tokens} tokens)`, "heldout_mse"]);
    rows.push(["OBS loss L (calibration)", "loss"]);
    const td = "<td style='text-align:right;padding-left:8px'>";
    const body = rows.map(([name, key]) => `<tr><td>${name}</td>${td}${num(s[key + "_gptq"])}</td>${td}${num(s[key + "_rtn"])}</td></tr>`).join("");
    const times = (key) => (!complete ? "…" : (s[key + "_gptq"] > 0 ? s[key + "_rtn"] / s[key + "_gptq"] : Infinity).toFixed(2));
    const ratio = `calibration <b>${times("calib_mse")}×</b>` + (heldout ? `, held-out <b>${times("heldout_mse")}×</b>` : "");
    const damp = partial || Math.abs(s.damp_percent_used - cfg.damp_percent) < 1e-12 ? ""
      : `<br><b>Damping raised to ${g3(s.damp_percent_used)}</b> to make H + λI invertible.`;
    const took = partial ? "GPTQ is still running in this browser…" : `Computed in ${seconds.toFixed(2)} s in this browser.`;
    return `<div style='font-size:13px;padding:4px 6px'>
<b>${labelOf(cfg)}</b> on ${e.name}
<table><tr><td></td><th style='color:${COLORS.upd}'>GPTQ</th><th style='color:${COLORS.rtn}'>RTN</th></tr>${body}</table>
Output error RTN / GPTQ: ${ratio}${damp}<br>
<small style='color:#555'>L = Σ<sub>q</sub> (w<sub>q</sub> − q<sub>q</sub>)² / (2 [H<sub>F</sub><sup>−1</sup>]<sub>qq</sub>)
= ½ tr(ΔW (H + λI) ΔWᵀ), summed over rows, with H = 2/n · XᵀX and n = ${e.calibration.tokens} calibration
<i>tokens</i>.${heldout ? ` Held-out: ${e.heldout.what} (the app uses all ${e.heldout.of}).` : ""}
${took}</small></div>`;
  }

  window.gptqSiteText = { COLORS, g3, labelOf, explainHtml, summaryHtml };
})();
