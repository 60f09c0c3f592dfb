// The Web Workers of the static Layer Lab (docs/site.md), on the engine in gptq_engine.js (the page starts
// each worker from the two files' text, the engine first). Two workers run this code: one runs GPTQ and
// cuts the frames, the other RTN: its Gram matrix D^T D (the costly half of RTN's running output error),
// then RTN's curve for each run, on the other core.
//
// A run tells the page as soon as it can draw: the column loop reports after each lazy block, and once it
// has passed the column the page shows (`want`), the page gets the run's "progress" and that column's frame,
// while the loop goes on; the result (codes, the whole curve, the summary) comes at the end. RTN's numbers
// come from the other worker meanwhile: the figure's scales are made from them (site.js, sceneOf).
//
// Messages: {type: "layer", W, Hu, Xh, tokens, d_out, d_in} (Float32Array; W row-major, Hu H's upper triangle
// row by row, Xh the held-out inputs (tokens, d_in) row-major) -> {type: "layer-ok"}; {type: "run", id, cfg, want, frames} -> {type: "progress", id, done, damp,
// ...} as soon as the loop has passed column `want` (what the first frame needs: diag(H), the curve so
// far, the damping used), then {type: "frames"} for each request in `frames` the loop has passed, then
// {type: "result", id, ...} (runMessage); {type: "frames", id, gen, ks, crop} -> {type: "frames", id, gen,
// frames} (one per column k: the crops the canvas draws and the step's numbers). The RTN worker: {type:
// "gram", key, cfg} -> {type: "gram", key, seconds} (G and RTN's error's colour range kept);
// {type: "rtn", id, key, desc_act, damp} -> {type: "rtn", id, key, damp, ...RTN's numbers, emax} for the
// run `id` (its order and damping), from the Gram matrix `key` (the layer and the grid), if it is the last;
// then {type: "rtn-heldout", key, heldout_mse_rtn} (after: the first frame does not wait for it).

"use strict";

// ---- the worker: one layer, its last run; the RTN worker: the last Gram matrix and a damped H to reuse

const state = { layer: null, run: null, gram: null, Hd: null };

// RTN's numbers for a run, from the Gram matrix of its grid and the run's order and damping; emax: RTN's
// error's colour range (known with the Gram matrix, before GPTQ's run ends: the heatmap's scale)
function rtnPart(G, perm, damp) {
  const layer = state.layer, { d_out, d_in: n } = layer, { diag } = layerBase(layer);
  if (!state.Hd || state.Hd.length !== n * n) state.Hd = new Float64Array(n * n);
  const running = runningLoss(G, dampedH(layer, perm, diag, damp, state.Hd), perm, n), curve = new Float64Array(n);
  let wse = 0;
  for (let j = 0; j < n; j++) wse += G[j + j * n];
  for (let p = 0; p < n; p++) curve[p] = running[p] / d_out;
  return { running_rtn: running, curve_rtn: curve, weight_mse_rtn: wse / (d_out * n), calib_mse_rtn: curve[n - 1],
           loss_rtn: running[n - 1] };
}

// A run: GPTQ on the current layer. With `post`, the page hears of it as soon as it can draw: a "progress"
// message once the loop has passed column msg.want, then the frames of msg.frames as the loop passes them
// (serveFrames); the result (returned) once every column is done.
function runMessage(msg, post = null) {
  const t0 = performance.now(), cfg = msg.cfg, layer = state.layer, { d_out, d_in: n } = layer;
  const want = Math.min(Math.max(msg.want || 0, 0), n - 1);
  const run = { id: msg.id, cfg, res: null, done: 0, first: null, waiting: (msg.frames || []).filter((f) => f.ks.length) };
  state.run = run;
  const stages = {}, res = gptq(layer, cfg, stages, (res, done) => {
    run.res = res;
    run.done = done;
    if (done === 0 || !post) return;
    if (!run.first && done > want) {
      run.first = { done, ms: performance.now() - t0 };
      post(progressMessage(run, t0));
    }
    if (run.first) serveFrames(run, post);
  });
  const perm = res.prep.perm, Wcm = colMajor(layer);
  const codes = new Int32Array(d_out * n);  // row-major, original column order
  const Drm = layer.Xh ? new Float64Array(d_out * n) : null;  // W - Q, row-major: the held-out error's
  let wseG = 0;
  for (let p = 0; p < n; p++) {
    const j = perm[p], o = p * d_out, oj = j * d_out;
    for (let r = 0; r < d_out; r++) {
      codes[r * n + j] = res.codes[o + r];
      const e = Wcm[oj + r] - res.Q[o + r];
      wseG += e * e;
      if (Drm) Drm[r * n + j] = e;
    }
  }
  const curveG = curveOf(res, n, d_out, n);
  const t1 = performance.now(), heldout = Drm ? heldoutMse(Drm, layer.Xh, d_out, n, layer.tokens) : undefined;
  stages.heldout_ms = performance.now() - t1;
  stages.total_ms = performance.now() - t0;
  return {
    type: "result", id: msg.id, codes, perm: Int32Array.from(perm), curve_gptq: curveG, diag_h: res.prep.diagH,
    group: res.group, wmax: res.prep.wmax,
    summary: {
      weight_mse_gptq: wseG / (d_out * n), calib_mse_gptq: curveG[n - 1], loss_gptq: res.running[n - 1],
      heldout_mse_gptq: heldout, damp_percent_used: res.prep.damp,
    },
    warnings: warningsOf(run), seconds: (performance.now() - t0) / 1000, stages, first: run.first,
  };
}

// GPTQ's running output error per position, for the first `done` ones (NaN after: not computed yet)
function curveOf(res, done, d_out, n) {
  const curve = new Float64Array(n).fill(NaN);
  for (let p = 0; p < done; p++) curve[p] = res.running[p] / d_out;
  return curve;
}

// What the page needs to draw a first frame of a run still going on: the order, diag(H), the curve so far,
// the damping used (RTN's curve is weighed with it)
function progressMessage(run, t0) {
  const { res, done } = run, { d_out, d_in: n } = state.layer;
  return {
    type: "progress", id: run.id, done, n, perm: Int32Array.from(res.prep.perm), diag_h: res.prep.diagH,
    curve_gptq: curveOf(res, done, d_out, n), wmax: res.prep.wmax, damp: res.prep.damp, warnings: warningsOf(run),
    seconds: (performance.now() - t0) / 1000,
  };
}

function warningsOf(run) {
  const { cfg } = run, { damp, dead } = run.res.prep, warnings = [];
  if (Math.abs(damp - cfg.damp_percent) > 1e-12) {
    warnings.push(`H + damping was not positive definite with damp_percent=${cfg.damp_percent}; quantized with `
      + `damp_percent=${damp.toPrecision(3)} instead.`);
  }
  const nDead = dead.reduce((a, b) => a + b, 0);
  if (nDead) warnings.push(`${nDead} dead input${nDead > 1 ? "s" : ""} (diag H = 0): zeroed, as the reference does.`);
  return warnings;
}

// U's columns js and max_{j > k} |U[k, j]| for the rows ks, kept for the run's later frames (a crop shows
// the same columns for several steps); those not at hand are solved for together
function uColumnsOf(run, js) {
  run.ucols = run.ucols || new Map();
  const missing = js.filter((j) => !run.ucols.has(j));
  if (missing.length) {
    if (run.ucols.size + missing.length > 512) run.ucols.clear();
    uColumns(run.res.prep.R, state.layer.d_in, missing).forEach((u, i) => run.ucols.set(missing[i], u));
  }
  return js.map((j) => run.ucols.get(j));
}
function rowMaxOf(run, ks) {
  run.rowmax = run.rowmax || new Map();
  const missing = ks.filter((k) => !run.rowmax.has(k));
  if (missing.length) {
    if (run.rowmax.size > 4096) run.rowmax.clear();
    const k0 = Math.min(...missing), k1 = Math.max(...missing) + 1;
    uRowMaxes(run.res.prep.R, state.layer.d_in, k0, k1).forEach((v, i) => run.rowmax.set(k0 + i, v));
  }
  return ks.map((k) => run.rowmax.get(k));
}

// One column's frame: the canvas's five crops (layer_run.frame) and the numbers its explanation quotes.
// It needs the columns up to k only: a run still going on can cut it once its loop has passed k.
function frameOf(k, crop) {
  const run = state.run, { res } = run, { d_out, d_in: n } = state.layer;
  const { W0, perm } = res.prep, { Wq, Q, Err1 } = res;
  const rows = Math.min(crop.rows, d_out), cols = Math.min(crop.cols, n);
  const r0 = Math.max(0, Math.min(crop.row0, d_out - rows));
  const margin = Math.floor(cols / 8), step = Math.max(cols - 2 * margin, 1);  // layer_run.window's pages
  const c0 = Math.max(0, Math.min(Math.floor((k - margin) / step) * step, n - cols)), c1 = c0 + cols;
  const size = rows * cols, z = {}, later = [];
  for (const name of ["W", "updated", "Q", "error", "compensation"]) z[name] = new Float32Array(size).fill(NaN);
  for (let j = Math.max(c0, k + 1); j < c1; j++) later.push(j);
  const us = later.length ? uColumnsOf(run, later) : [];
  const acc = new Float64Array(rows);
  for (let c = 0; c < cols; c++) {
    const j = c0 + c, o = j * d_out + r0;
    for (let i = 0; i < rows; i++) z.W[i * cols + c] = W0[o + i];
    if (j <= k) {
      for (let i = 0; i < rows; i++) {
        const at = i * cols + c;
        z.updated[at] = Wq[o + i];
        z.Q[at] = Q[o + i];
        z.error[at] = Wq[o + i] - Q[o + i];
      }
      continue;
    }
    // W0 - Err1[:, :k+1] @ U[:k+1, j] (layer_run.Run.pending), by columns of Err1 (contiguous)
    const u = us[j - later[0]];  // U[:, j]
    acc.set(W0.subarray(o, o + rows));
    for (let p = 0; p <= k; p++) {
      const up = u[p], e = p * d_out + r0;
      for (let i = 0; i < rows; i++) acc[i] -= Err1[e + i] * up;
    }
    for (let i = 0; i < rows; i++) {
      z.updated[i * cols + c] = acc[i];
      z.compensation[i * cols + c] = -Err1[k * d_out + r0 + i] * u[k];
    }
  }
  const w = new Float32Array(rows), q = new Float32Array(rows), scale = res.scales[res.group[k]];
  let errNorm = 0, errMax = 0, scaleSum = 0;
  for (let r = 0; r < d_out; r++) {
    const a = Wq[k * d_out + r], b = Q[k * d_out + r];
    errNorm += (a - b) * (a - b);
    errMax = Math.max(errMax, Math.abs(Err1[k * d_out + r]));
    scaleSum += scale[r];
    if (r >= r0 && r < r0 + rows) { w[r - r0] = a; q[r - r0] = b; }
  }
  const uMax = rowMaxOf(run, [k])[0];
  // the lazy block of k (the explanation names it): the last start <= k, and the next one
  const starts = res.starts, b = starts.findLastIndex((s) => s <= k);
  const block = [starts[b], b + 1 < starts.length ? starts[b + 1] : n];
  return {
    meta: { k, r0, r1: r0 + rows, c0, c1, column: perm[k], group: res.group[k], d: res.hinvDiag[k],
            err_norm: Math.sqrt(errNorm), upd_max: errMax * uMax, loss: res.losses[k], running: res.running[k],
            block, scale_mean: scaleSum / d_out },
    z, w, q,
  };
}

// Post the frames of every waiting request the run's loop has passed (all of them once it is done)
function serveFrames(run, post) {
  run.waiting = run.waiting.filter((req) => {
    if (Math.max(...req.ks) >= run.done) return true;
    rowMaxOf(run, req.ks);  // all the request's rows at once
    const frames = req.ks.map((k) => frameOf(k, req.crop)), buffers = [];
    for (const f of frames) buffers.push(...Object.values(f.z).map((a) => a.buffer), f.w.buffer, f.q.buffer);
    post({ type: "frames", id: run.id, gen: req.gen, frames }, buffers);
    return false;
  });
}

// H from its upper triangle, row by row (the page's data format), as a full symmetric float64 matrix
function fromUpper(Hu, n) {
  const H = new Float64Array(n * n);
  for (let i = 0, t = 0; i < n; i++) {
    for (let j = i; j < n; j++, t++) { H[i * n + j] = Hu[t]; H[j * n + i] = Hu[t]; }
  }
  return H;
}

if (typeof self !== "undefined" && typeof self.postMessage === "function" && typeof window === "undefined") {
  const post = (m, transfer) => self.postMessage(m, transfer || []);
  self.onmessage = (e) => {
    const msg = e.data;
    try {
      if (msg.type === "layer") {
        state.layer = { W: Float64Array.from(msg.W), H: fromUpper(msg.Hu, msg.d_in), d_out: msg.d_out, d_in: msg.d_in,
                        Xh: msg.Xh || null, tokens: msg.tokens || 0 };
        state.run = null;
        state.gram = null;
        state.Hd = null;
        lastFactor = null;
        post({ type: "layer-ok", token: msg.token });
      } else if (msg.type === "run") {
        const out = runMessage(msg, post);
        post(out, [out.codes.buffer]);
        serveFrames(state.run, post);  // requests the run carried for columns it passed last
      } else if (msg.type === "gram") {  // the RTN worker
        const t0 = performance.now(), { D, Drm } = rtnDelta(state.layer, msg.cfg);
        state.gram = null;
        const G = gram(D, Drm, state.layer.d_out, state.layer.d_in);
        state.gram = { key: msg.key, G, emax: absPercentile(D, 99.5), Drm, heldout: undefined };
        post({ type: "gram", key: msg.key, seconds: (performance.now() - t0) / 1000 });
      } else if (msg.type === "rtn") {  // the RTN worker: a run's RTN numbers (the page asks after "gram")
        if (!state.gram || state.gram.key !== msg.key) return;  // a newer grid was asked for meanwhile
        const perm = permOf(layerBase(state.layer).diag, msg.desc_act);
        post({ type: "rtn", id: msg.id, key: msg.key, damp: msg.damp, ...rtnPart(state.gram.G, perm, msg.damp),
               emax: state.gram.emax });
        const g = state.gram, { d_out, d_in, Xh, tokens } = state.layer;
        if (Xh && g.heldout === undefined) g.heldout = heldoutMse(g.Drm, Xh, d_out, d_in, tokens);  // per grid
        if (Xh) post({ type: "rtn-heldout", key: msg.key, heldout_mse_rtn: g.heldout });
      } else if (msg.type === "frames") {
        if (!state.run || state.run.id !== msg.id) return;  // an older run's request
        state.run.waiting.push(msg);
        serveFrames(state.run, post);
      }
    } catch (err) {
      post({ type: "error", id: msg.id, message: String(err && err.message || err) });
    }
  };
}

if (typeof module !== "undefined") {
  module.exports = { gptq, prepare, gridOf, roundTie, quantCode, rtnDelta, gram, runningLoss, runMessage, frameOf,
                     state, gemmSub, choleskyLower, hessianFactor, upperInverse, uColumns, uRowMaxes, absPercentile,
                     rtnPart, fromUpper, permOf, dampedH, heldoutMse };
}
