// GPTQ and RTN in plain JavaScript, for the static Layer Lab (docs/site.md). It runs in a Web Worker.
//
// The same algorithm, steps and quirks as the NumPy reference (gptq_explorer/engine/gptq.py, grid.py,
// rtn.py), in float64, with the paper's symbols: H (the Hessian 2/n X^T X), U ("Hinv", the upper Cholesky
// factor of H^-1), Err1 (the scaled errors), losses. Read it next to gptq.py:
//   - the grid (grid.py): per row of a group, [min, max] widened to include 0; symmetric: [-max|w|, max|w|]
//     for every group (the reference's fix 2: a group with no negative weight is not clipped at 7/15);
//     codes round half to even, with ties that float noise would decide snapped to exact ties first;
//   - dead inputs (diag H = 0): H_ii = 1 and W[:, i] = 0;
//   - desc_act: columns by decreasing diag(H), stable sort; static groups: every group's grid from the
//     original weights up front; the exact short last group (width = group_size, the last one shorter);
//   - damping: lambda = damp_percent * mean(diag H); a failed Cholesky raises it x10, up to 100%;
//   - fix 1 (groups inside a lazy block): here every update reaches every later column at once, so a
//     group's grid always comes from fully updated weights and no block size enters the result.
// Arrays: a layer's columns are contiguous (column-major, index j * d_out + r), U is row-major n x n.
//
// Messages: {type: "layer", W, H, d_out, d_in} (Float32Array, row-major) -> {type: "layer-ok"};
// {type: "run", id, cfg} -> {type: "result", id, ...} (see runMessage); {type: "frames", id, ks, crop}
// -> {type: "frames", id, frames} (one per column k: the crops the canvas draws and the step's numbers).

"use strict";

const TIE_TOLERANCE = 1e-9;  // grid.py: relative distance from a half-integer that counts as a tie
const MAX_DAMP_PERCENT = 1.0;

function roundHalfEven(x) {
  const r = Math.round(x);  // half up
  return (r - x === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

// grid.round_half_even: a value within float noise of a half-integer is that half-integer, then rounded
function roundTie(x) {
  const half = roundHalfEven(2 * x) / 2;
  if (Math.abs(x - half) <= TIE_TOLERANCE * Math.max(Math.abs(x), 1)) x = half;
  return roundHalfEven(x);
}

// grid.grid_params for columns [c0, c1) of a column-major (d_out, *) array: per-row {scale, zero}
function gridOf(A, d_out, c0, c1, bits, sym) {
  const maxq = 2 ** bits - 1, scale = new Float64Array(d_out), zero = new Float64Array(d_out);
  const lo = new Float64Array(d_out), hi = new Float64Array(d_out);  // start at 0: the range includes 0
  for (let j = c0; j < c1; j++) {
    const col = A.subarray(j * d_out, (j + 1) * d_out);
    for (let r = 0; r < d_out; r++) {
      const v = col[r];
      if (v < lo[r]) lo[r] = v;
      if (v > hi[r]) hi[r] = v;
    }
  }
  for (let r = 0; r < d_out; r++) {
    let xmin = lo[r], xmax = hi[r];
    if (sym) { const amax = Math.max(-xmin, xmax); xmin = -amax; xmax = amax; }
    if (xmin === 0 && xmax === 0) { xmin = -1; xmax = 1; }  // an all-zero row: the reference's choice
    scale[r] = (xmax - xmin) / maxq;
    zero[r] = sym ? (maxq + 1) / 2 : roundHalfEven(-xmin / scale[r]);
  }
  return { scale, zero };
}

// sum_k A[a + k] A[b + k], k < len, with four running sums (one sum waits on each addition: 3x slower)
function dot(A, a, b, len) {
  let s0 = 0, s1 = 0, s2 = 0, s3 = 0, k = 0;
  for (; k + 3 < len; k += 4) {
    s0 += A[a + k] * A[b + k];
    s1 += A[a + k + 1] * A[b + k + 1];
    s2 += A[a + k + 2] * A[b + k + 2];
    s3 += A[a + k + 3] * A[b + k + 3];
  }
  for (; k < len; k++) s0 += A[a + k] * A[b + k];
  return (s0 + s1) + (s2 + s3);
}

function quantCode(w, scale, zero, maxq) {
  return Math.min(Math.max(roundTie(w / scale) + zero, 0), maxq);
}

// The upper Cholesky factor U of H^-1 (gptq.hinv_cholesky_upper): with J the flip permutation, if
// J H J = L L^T then U = J L^-1 J. Returns null when H is not positive definite.
function hinvCholeskyUpper(H, n) {
  const L = new Float64Array(n * n);  // J H J, row-major, factored in place (lower)
  for (let i = 0; i < n; i++) for (let j = 0; j <= i; j++) L[i * n + j] = H[(n - 1 - i) * n + (n - 1 - j)];
  for (let i = 0; i < n; i++) {
    const Li = i * n;
    for (let j = 0; j <= i; j++) {
      const Lj = j * n;
      const s = L[Li + j] - dot(L, Li, Lj, j);
      if (i === j) {
        if (!(s > 0) || !Number.isFinite(s)) return null;
        L[Li + i] = Math.sqrt(s);
      } else {
        L[Li + j] = s / L[Lj + j];
      }
    }
  }
  const X = new Float64Array(n * n), acc = new Float64Array(n);  // X = L^-1, row by row
  for (let i = 0; i < n; i++) {
    const Li = i * n;
    acc.fill(0, 0, i);
    for (let k = 0; k < i; k++) {
      const a = L[Li + k], Xk = k * n;
      if (a !== 0) for (let j = 0; j <= k; j++) acc[j] += a * X[Xk + j];
    }
    const inv = 1 / L[Li + i];
    for (let j = 0; j < i; j++) X[Li + j] = -acc[j] * inv;
    X[Li + i] = inv;
  }
  const U = new Float64Array(n * n);
  for (let p = 0; p < n; p++) {
    for (let j = p; j < n; j++) {
      const v = X[(n - 1 - p) * n + (n - 1 - j)];  // J L^-1 J: row n-1-p >= column n-1-j
      if (!Number.isFinite(v)) return null;
      U[p * n + j] = v;
    }
  }
  return U;
}

// gptq.prepare_layer: the row grid, dead inputs, static grids, the order, damping (x10 retries), U
function prepare(layer, cfg) {
  const { d_out, d_in: n } = layer;
  const width = cfg.group_size === -1 ? n : cfg.group_size;
  const W = new Float64Array(d_out * n);  // column-major, original order
  for (let r = 0; r < d_out; r++) for (let j = 0; j < n; j++) W[j * d_out + r] = layer.W[r * n + j];
  const rowGrid = cfg.group_size === -1 ? gridOf(W, d_out, 0, n, cfg.bits, cfg.sym) : null;  // before the fix
  const diag = new Float64Array(n), dead = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    diag[i] = layer.H[i * n + i];
    if (diag[i] === 0) { dead[i] = 1; diag[i] = 1; W.fill(0, i * d_out, (i + 1) * d_out); }
  }
  let staticGrids = null;
  if (cfg.static_groups && cfg.group_size !== -1) {
    staticGrids = [];
    for (let s = 0; s < n; s += width) staticGrids.push(gridOf(W, d_out, s, Math.min(s + width, n), cfg.bits, cfg.sym));
  }
  const perm = Array.from({ length: n }, (_, i) => i);
  if (cfg.desc_act) perm.sort((a, b) => diag[b] - diag[a]);  // stable: ties keep their order
  const W0 = new Float64Array(d_out * n);
  perm.forEach((j, p) => W0.set(W.subarray(j * d_out, (j + 1) * d_out), p * d_out));
  const Hp = new Float64Array(n * n);
  let meanDiag = 0;
  for (let a = 0; a < n; a++) {
    for (let b = 0; b < n; b++) Hp[a * n + b] = a === b ? diag[perm[a]] : layer.H[perm[a] * n + perm[b]];
    meanDiag += diag[perm[a]] / n;
  }
  let U = null, damp = cfg.damp_percent;
  const Hd = new Float64Array(n * n);
  for (; damp <= MAX_DAMP_PERCENT * (1 + 1e-9); damp *= 10) {
    Hd.set(Hp);
    for (let i = 0; i < n; i++) Hd[i * n + i] += damp * meanDiag;
    U = hinvCholeskyUpper(Hd, n);
    if (U) break;
  }
  if (!U) throw new Error(`H is not positive definite even after raising damp_percent from ${cfg.damp_percent} to 1`);
  return { W0, Hd, U, perm, dead, damp, rowGrid, staticGrids, width, diag };
}

// gptq._iterate, column by column (every update applied at once: see fix 1 above)
function gptq(layer, cfg) {
  const { d_out, d_in: n } = layer;
  const prep = prepare(layer, cfg);
  const { U, perm, width } = prep;
  const maxq = 2 ** cfg.bits - 1, dynamic = cfg.group_size !== -1 && !cfg.static_groups;
  const W = prep.W0.slice();  // the working weights; after the loop column p is w_p as it was quantized
  const Q = new Float64Array(d_out * n), Err1 = new Float64Array(d_out * n);
  const codes = new Uint8Array(d_out * n), losses = new Float64Array(n), running = new Float64Array(n);
  const group = new Int32Array(n), hinvDiag = new Float64Array(n), scales = [];
  let grid = null, total = 0;
  for (let p = 0; p < n; p++) {
    if (dynamic && p % width === 0) {
      grid = gridOf(W, d_out, p, Math.min(p + width, n), cfg.bits, cfg.sym);  // from the updated weights
      scales.push(grid.scale);
    } else if (prep.rowGrid) grid = prep.rowGrid;
    else if (prep.staticGrids) grid = prep.staticGrids[Math.floor(perm[p] / width)];
    group[p] = dynamic ? Math.floor(p / width) : prep.staticGrids ? Math.floor(perm[p] / width) : 0;
    const o = p * d_out, d = U[p * n + p];
    let loss = 0;
    for (let r = 0; r < d_out; r++) {
      const w = W[o + r], c = quantCode(w, grid.scale[r], grid.zero[r], maxq);
      const q = grid.scale[r] * (c - grid.zero[r]);
      codes[o + r] = c;
      Q[o + r] = q;
      Err1[o + r] = (w - q) / d;
      loss += (w - q) * (w - q);
    }
    // OBS update of every later column (paper, Eq. 3 via row p of U): W[:, j] -= Err1[:, p] U[p, j]
    const Up = p * n;
    for (let j = p + 1; j < n; j++) {
      const u = U[Up + j], oj = j * d_out;
      if (u === 0) continue;
      for (let r = 0; r < d_out; r++) W[oj + r] -= Err1[o + r] * u;
    }
    losses[p] = loss / (d * d) / 2;
    total += losses[p];
    running[p] = total;
    hinvDiag[p] = d;
  }
  if (!dynamic) scales.push(...(prep.rowGrid ? [prep.rowGrid.scale] : prep.staticGrids.map((g) => g.scale)));
  return { prep, Wq: W, Q, Err1, codes, losses, running, group, hinvDiag, scales };
}

// rtn.rtn_quantize_numpy: each group of W (original order, as given) on its own grid; returns W - Q
function rtnDelta(layer, cfg) {
  const { d_out, d_in: n } = layer, width = cfg.group_size === -1 ? n : cfg.group_size;
  const maxq = 2 ** cfg.bits - 1, W = new Float64Array(d_out * n);
  for (let r = 0; r < d_out; r++) for (let j = 0; j < n; j++) W[j * d_out + r] = layer.W[r * n + j];
  const D = new Float64Array(d_out * n);
  for (let s = 0; s < n; s += width) {
    const e = Math.min(s + width, n), g = gridOf(W, d_out, s, e, cfg.bits, cfg.sym);
    for (let j = s; j < e; j++) {
      for (let r = 0; r < d_out; r++) {
        const w = W[j * d_out + r], c = quantCode(w, g.scale[r], g.zero[r], maxq);
        D[j * d_out + r] = w - g.scale[r] * (c - g.zero[r]);
      }
    }
  }
  return D;
}

// D^T D of a column-major (d_out, n) array (upper triangle filled): RTN's running loss needs it
function gram(D, d_out, n) {
  const G = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    const a = i * d_out;
    for (let j = i; j < n; j++) {
      const b = j * d_out;
      G[i * n + j] = dot(D, a, b, d_out);
    }
  }
  return G;
}

// layer_run._running_loss: r[k] = 1/2 sum_{a,b<=k} (D^T D)_ab Hd_ab over processing positions a, b
function runningLoss(G, Hd, perm, n) {
  const out = new Float64Array(n);
  let total = 0;
  for (let k = 0; k < n; k++) {
    const jk = perm[k];
    let s = 0;
    for (let a = 0; a < k; a++) {
      const ja = perm[a];
      s += (ja < jk ? G[ja * n + jk] : G[jk * n + ja]) * Hd[a * n + k];
    }
    total += s + 0.5 * G[jk * n + jk] * Hd[k * n + k];
    out[k] = total;
  }
  return out;
}

// ---- the worker: one layer, its last run, the RTN Gram matrix cached per grid

const state = { layer: null, run: null, rtn: new Map() };

function runMessage(msg) {
  const t0 = performance.now(), cfg = msg.cfg, layer = state.layer, { d_out, d_in: n } = layer;
  const res = gptq(layer, cfg);
  const { perm, Hd } = res.prep;
  const key = `${cfg.bits}/${cfg.group_size}/${cfg.sym}`;
  if (!state.rtn.has(key)) {
    const D = rtnDelta(layer, cfg);
    state.rtn.clear();
    state.rtn.set(key, { D, G: gram(D, d_out, n) });
  }
  const rtn = state.rtn.get(key), runningRtn = runningLoss(rtn.G, Hd, perm, n);
  const codes = new Int32Array(d_out * n);  // row-major, original column order
  let wseG = 0, wseR = 0;
  perm.forEach((j, p) => {
    for (let r = 0; r < d_out; r++) {
      codes[r * n + j] = res.codes[p * d_out + r];
      const e = layer.W[r * n + j] - res.Q[p * d_out + r];
      wseG += e * e;
    }
  });
  for (const v of rtn.D) wseR += v * v;
  const curveG = new Float64Array(n), curveR = new Float64Array(n), diagH = new Float64Array(n);
  for (let p = 0; p < n; p++) {
    curveG[p] = res.running[p] / d_out;
    curveR[p] = runningRtn[p] / d_out;
    diagH[p] = layer.H[perm[p] * n + perm[p]];  // undamped, dead inputs at 0
  }
  const warnings = [];
  if (Math.abs(res.prep.damp - cfg.damp_percent) > 1e-12) {
    warnings.push(`H + damping was not positive definite with damp_percent=${cfg.damp_percent}; quantized with `
      + `damp_percent=${res.prep.damp.toPrecision(3)} instead.`);
  }
  const nDead = res.prep.dead.reduce((a, b) => a + b, 0);
  if (nDead) warnings.push(`${nDead} dead input${nDead > 1 ? "s" : ""} (diag H = 0): zeroed, as the reference does.`);
  state.run = { id: msg.id, cfg, res, runningRtn };
  const absDiff = new Float64Array(d_out * n);
  for (let i = 0; i < absDiff.length; i++) absDiff[i] = res.Wq[i] - res.Q[i];
  const scaleMean = res.scales.map((s) => s.reduce((a, b) => a + b, 0) / s.length);
  return {
    type: "result", id: msg.id, codes, perm: Int32Array.from(perm), curve_gptq: curveG, curve_rtn: curveR,
    diag_h: diagH, group: res.group, wmax: absPercentile(res.prep.W0, 99.5), emax: absPercentile(absDiff, 99.5), scale_mean: Float64Array.from(scaleMean),
    summary: {
      weight_mse_gptq: wseG / (d_out * n), weight_mse_rtn: wseR / (d_out * n),
      calib_mse_gptq: curveG[n - 1], calib_mse_rtn: curveR[n - 1],
      loss_gptq: res.running[n - 1], loss_rtn: runningRtn[n - 1], damp_percent_used: res.prep.damp,
    },
    warnings, seconds: (performance.now() - t0) / 1000,
  };
}

// The q-th percentile of |a| (np.percentile's linear interpolation) on at most ~200k evenly spaced
// entries: the heatmaps' colour ranges, where a sample is plenty
function absPercentile(a, q) {
  const stride = Math.max(1, Math.floor(a.length / 200000)), v = [];
  for (let i = 0; i < a.length; i += stride) v.push(Math.abs(a[i]));
  v.sort((x, y) => x - y);
  const at = (q / 100) * (v.length - 1), lo = Math.floor(at), hi = Math.min(lo + 1, v.length - 1);
  return (v[lo] + (at - lo) * (v[hi] - v[lo])) || 1;
}

// One column's frame: the canvas's five crops (layer_run.frame) and the numbers its explanation quotes
function frameOf(k, crop) {
  const { res, runningRtn, cfg } = state.run, { d_out, d_in: n } = state.layer;
  const { U, W0, perm } = res.prep, { Wq, Q, Err1 } = res;
  const rows = Math.min(crop.rows, d_out), cols = Math.min(crop.cols, n);
  const r0 = Math.max(0, Math.min(crop.row0, d_out - rows));
  const margin = Math.floor(cols / 8), step = Math.max(cols - 2 * margin, 1);  // layer_run.window's pages
  const c0 = Math.max(0, Math.min(Math.floor((k - margin) / step) * step, n - cols)), c1 = c0 + cols;
  const size = rows * cols, z = {};
  for (const name of ["W", "updated", "Q", "error", "compensation"]) z[name] = new Float32Array(size).fill(NaN);
  for (let c = 0; c < cols; c++) {
    const j = c0 + c, o = j * d_out;
    for (let i = 0; i < rows; i++) {
      const r = r0 + i, at = i * cols + c;
      z.W[at] = W0[o + r];
      if (j <= k) {
        z.updated[at] = Wq[o + r];
        z.Q[at] = Q[o + r];
        z.error[at] = Wq[o + r] - Q[o + r];
      } else {  // W0 - Err1[:, :k+1] @ U[:k+1, j] (layer_run.Run.pending)
        let v = W0[o + r];
        for (let p = 0; p <= k; p++) v -= Err1[p * d_out + r] * U[p * n + j];
        z.updated[at] = v;
        z.compensation[at] = -Err1[k * d_out + r] * U[k * n + j];
      }
    }
  }
  const w = new Float32Array(rows), q = new Float32Array(rows);
  let errNorm = 0, errMax = 0, uMax = 0;
  for (let r = 0; r < d_out; r++) {
    const a = Wq[k * d_out + r], b = Q[k * d_out + r];
    errNorm += (a - b) * (a - b);
    errMax = Math.max(errMax, Math.abs(Err1[k * d_out + r]));
    if (r >= r0 && r < r0 + rows) { w[r - r0] = a; q[r - r0] = b; }
  }
  for (let j = k + 1; j < n; j++) uMax = Math.max(uMax, Math.abs(U[k * n + j]));
  const i1 = blockStart(k, cfg, n), i2 = blockStart(k + 1 + 0, cfg, n, true);
  return {
    meta: { k, r0, r1: r0 + rows, c0, c1, column: perm[k], group: res.group[k], d: res.hinvDiag[k],
            err_norm: Math.sqrt(errNorm), upd_max: errMax * uMax, loss: res.losses[k], running: res.running[k],
            running_rtn: runningRtn[k], block: [i1, i2] },
    z, w, q,
  };
}

// engine.blocks.block_bounds with the default block size (128): the explanation names the lazy block
function blockStart(k, cfg, n, next = false) {
  const width = cfg.group_size === -1 ? n : cfg.group_size, dynamic = cfg.group_size !== -1 && !cfg.static_groups;
  const starts = new Set();
  for (let s = 0; s < n; s += 128) starts.add(s);
  if (dynamic) for (let s = 0; s < n; s += width) starts.add(s);
  const sorted = [...starts].sort((a, b) => a - b);
  if (next) return sorted.find((s) => s >= k) ?? n;
  return sorted.filter((s) => s <= k).pop();
}

if (typeof self !== "undefined" && typeof self.postMessage === "function" && typeof window === "undefined") {
  self.onmessage = (e) => {
    const msg = e.data;
    try {
      if (msg.type === "layer") {
        const H = Float64Array.from(msg.H);
        state.layer = { W: Float64Array.from(msg.W), H, d_out: msg.d_out, d_in: msg.d_in };
        state.run = null;
        state.rtn.clear();
        self.postMessage({ type: "layer-ok", token: msg.token });
      } else if (msg.type === "run") {
        const out = runMessage(msg);
        self.postMessage(out, [out.codes.buffer]);
      } else if (msg.type === "frames") {
        if (!state.run || state.run.id !== msg.id) return;  // an older run's request
        const frames = msg.ks.map((k) => frameOf(k, msg.crop));
        self.postMessage({ type: "frames", id: msg.id, gen: msg.gen, frames });
      }
    } catch (err) {
      self.postMessage({ type: "error", id: msg.id, message: String(err && err.message || err) });
    }
  };
}

if (typeof module !== "undefined") module.exports = { gptq, prepare, gridOf, roundTie, rtnDelta, gram, runningLoss, runMessage, frameOf, state };
