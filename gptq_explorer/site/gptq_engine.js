// GPTQ and RTN in plain JavaScript, for the static Layer Lab (docs/site.md): the engine. gptq_worker.js is
// the Web Workers' side (the layer, the runs, their progress and frames); the page starts its two workers
// from the two files' text, this one first (worker_source.js).
//
// The same algorithm, steps and quirks as the NumPy reference (gptq_explorer/engine/gptq.py, grid.py,
// rtn.py, blocks.py), in float64, with the paper's symbols: H (the Hessian 2/n X^T X), U ("Hinv", the upper
// Cholesky factor of H^-1), Err1 (the scaled errors), losses. Read it next to gptq.py:
//   - the grid (grid.py): per row of a group, [min, max] widened to include 0; symmetric: [-max|w|, max|w|]
//     for every group (the reference's fix 2: a group with no negative weight is not clipped at 7/15);
//     codes round half to even, with ties that float noise would decide snapped to exact ties first;
//   - dead inputs (diag H = 0): H_ii = 1 and W[:, i] = 0;
//   - desc_act: columns by decreasing diag(H), stable sort; static groups: every group's grid from the
//     original weights up front; the exact short last group (width = group_size, the last one shorter);
//   - damping: lambda = damp_percent * mean(diag H); a failed Cholesky raises it x10, up to 100%;
//   - U = J L^-1 J from one Cholesky factorization J H J = L L^T (J: the flip; hinv_cholesky_upper), but
//     never formed: the loop works with R = J L J (H = R R^T, U = R^-1; see gptq() and hessianFactor);
//   - lazy blocks (paper, Step 2; blocks.block_bounds): 128 columns, and a boundary at every group start
//     when groups are computed in the loop (fix 1: a group's grid always comes from fully updated weights).
//     Inside a block each column updates the block's later columns; a block starts from all earlier
//     blocks' updates at once, as matrix products.
// Arrays are column-major (entry (r, j) of a matrix with `rows` rows at r + j * rows) so that a column is
// contiguous: the layer's W, E and Err1 (j * d_out + r), R (R_pj at p + j * n), L. The matrix products go
// through gemmSub, which is written for the cache (blocked, packed, 4 x 2 sums in registers): 3-4x faster
// than a column-at-a-time update in V8. What depends on the layer only (W column-major, diag(H), the
// orders) is computed once and kept on the layer object; the factorization while desc_act and damping stay;
// a run's working arrays are reused by the next run.

"use strict";

const TIE_TOLERANCE = 1e-9;  // grid.py: relative distance from a half-integer that counts as a tie
const MAX_DAMP_PERCENT = 1.0;
const BLOCK_SIZE = 128;  // the engine's lazy block (QuantConfig.block_size)
const SUB = 16;  // sub-blocks inside a lazy block (below)
const NB = 32;  // the block width of the Cholesky factorization and the triangular inverse
const MC = 128, KC = 256;  // gemmSub's blocks: a packed MC x KC piece of A stays in the L2 cache

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

// A value clearly away from a half-integer (nearly all) skips roundTie's tie test: Math.round gives the
// integer roundTie would (the margin of 2 tolerances keeps every snapped value on roundTie's path)
function quantCode(w, scale, zero, maxq) {
  const x = w / scale, r = Math.round(x);
  const c = 0.5 - Math.abs(x - r) > 2 * TIE_TOLERANCE * Math.max(Math.abs(x), 1) ? r : roundTie(x);
  return Math.min(Math.max(c + zero, 0), maxq);
}

// ---- matrix products

const packed = new Float64Array(MC * KC), edge = new Float64Array(8);

// C -= A B on column-major pieces: C[c0 + r + j ldc] -= sum_k A[a0 + r + k lda] B[b0 + k + j ldb] for
// r < m, j < N, k < K. Each MC x KC piece of A is copied into strips of 4 rows, contiguous along k (a
// large power-of-two-ish lda would map a strip's entries onto the same few cache sets); a 4 x 2 piece of
// C is summed in registers, so each loaded number serves 2 to 4 multiply-adds.
function gemmSub(C, c0, ldc, A, a0, lda, B, b0, ldb, m, N, K) {
  for (let k0 = 0; k0 < K; k0 += KC) {
    const kc = Math.min(KC, K - k0);
    for (let r0 = 0; r0 < m; r0 += MC) {
      const mc = Math.min(MC, m - r0);
      for (let r = 0; r < mc + ((4 - mc % 4) % 4); r++) {  // rows past m are zeros
        const base = (r >> 2) * 4 * kc + (r & 3), src = a0 + r0 + r + k0 * lda;
        if (r < mc) for (let k = 0; k < kc; k++) packed[base + 4 * k] = A[src + k * lda];
        else for (let k = 0; k < kc; k++) packed[base + 4 * k] = 0;
      }
      gemmPacked(C, c0 + r0, ldc, B, b0 + k0, ldb, mc, N, kc);
    }
  }
}

function gemmPacked(C, c0, ldc, B, b0, ldb, m, N, K) {
  const P = packed;
  for (let j = 0; j < N; j += 2) {
    const bj0 = b0 + j * ldb, bj1 = j + 1 < N ? bj0 + ldb : bj0, cj = c0 + j * ldc;
    for (let r = 0; r < m; r += 4) {
      let s00 = 0, s10 = 0, s20 = 0, s30 = 0, s01 = 0, s11 = 0, s21 = 0, s31 = 0;
      for (let k = 0, pk = r * K; k < K; k++, pk += 4) {
        const x0 = P[pk], x1 = P[pk + 1], x2 = P[pk + 2], x3 = P[pk + 3], y0 = B[bj0 + k], y1 = B[bj1 + k];
        s00 += x0 * y0; s10 += x1 * y0; s20 += x2 * y0; s30 += x3 * y0;
        s01 += x0 * y1; s11 += x1 * y1; s21 += x2 * y1; s31 += x3 * y1;
      }
      if (r + 4 <= m && j + 1 < N) {
        const c = cj + r, d = c + ldc;
        C[c] -= s00; C[c + 1] -= s10; C[c + 2] -= s20; C[c + 3] -= s30;
        C[d] -= s01; C[d + 1] -= s11; C[d + 2] -= s21; C[d + 3] -= s31;
      } else {  // the last rows or column: only those that exist
        edge[0] = s00; edge[1] = s10; edge[2] = s20; edge[3] = s30;
        edge[4] = s01; edge[5] = s11; edge[6] = s21; edge[7] = s31;
        for (let jj = 0; jj < 2 && j + jj < N; jj++) {
          for (let i = 0; i < 4 && r + i < m; i++) C[cj + jj * ldc + r + i] -= edge[4 * jj + i];
        }
      }
    }
  }
}

// In place: the lower triangle of the column-major n x n A becomes L with A = L L^T (blocked, left-looking:
// each block of NB columns first gets all earlier columns' updates as one product). False if A is not
// positive definite. The upper triangle is left with junk.
function choleskyLower(A, n) {
  const Bt = new Float64Array(NB * n);
  for (let c0 = 0; c0 < n; c0 += NB) {
    const c1 = Math.min(c0 + NB, n), w = c1 - c0;
    if (c0 > 0) {  // A[c0:, c0:c1] -= L[c0:, :c0] L[c0:c1, :c0]^T
      for (let j = 0; j < w; j++) for (let k = 0; k < c0; k++) Bt[k + j * c0] = A[c0 + j + k * n];
      gemmSub(A, c0 + c0 * n, n, A, c0, n, Bt, 0, c0, n - c0, w, c0);
    }
    for (let j = c0; j < c1; j++) {  // the block's own columns, one after the other
      const oj = j * n;
      for (let k = c0; k < j; k++) {
        const l = A[j + k * n], ok = k * n;
        for (let r = j; r < n; r++) A[oj + r] -= A[ok + r] * l;
      }
      const d = A[oj + j];
      if (!(d > 0) || !Number.isFinite(d)) return false;
      const s = Math.sqrt(d);
      A[oj + j] = s;
      for (let r = j + 1; r < n; r++) A[oj + r] /= s;
    }
  }
  return true;
}

// The factor R of H = R R^T (R upper, column-major) from one Cholesky factorization: with J the flip,
// J H J = L L^T gives R = J L J. Then U = R^-1 = J L^-1 J is the upper Cholesky factor of H^-1, the
// reference's Hinv (gptq.hinv_cholesky_upper). For a symmetric H stored row- or column-major, J H J is H's
// array reversed, and R (column-major) is L's array reversed. Null when H is not positive definite.
// U itself is never formed here (its triangular inverse costs as much as the factorization): the loop needs
// U's diagonal blocks (upperInverse), a frame a few of its columns and one row (uColumns, uRowMaxes).
function hessianFactor(H, n) {
  const L = H.slice().reverse();
  return choleskyLower(L, n) ? L.reverse() : null;
}

// U[c0:c1, c0:c1] = R[c0:c1, c0:c1]^-1: a diagonal block of U (m x m, column-major), by back substitution
function upperInverse(R, n, c0, c1) {
  const m = c1 - c0, X = new Float64Array(m * m);
  for (let j = 0; j < m; j++) {
    const oj = j * m;
    X[oj + j] = 1;
    for (let k = j; k >= 0; k--) {
      const ok = (c0 + k) * n + c0, x = (X[oj + k] /= R[ok + k]);
      if (x !== 0) for (let r = 0; r < k; r++) X[oj + r] -= R[ok + r] * x;
    }
  }
  return X;
}

// U[0:j+1, j] for each j of js (R u = e_j, back substitution): the columns a frame's pending weights need.
// All at once, four by four: each load of R serves four columns, whose sums are each the one-column ones.
function uColumns(R, n, js) {
  const us = js.map((j) => { const u = new Float64Array(j + 1); u[j] = 1; return u; });
  const order = us.slice().sort((a, b) => b.length - a.length);  // longest first: a group of four shares k
  for (let g = 0; g < order.length; g += 4) {
    const u0 = order[g], u1 = order[g + 1] || null, u2 = order[g + 2] || null, u3 = order[g + 3] || null;
    for (let k = u0.length - 1; k >= 0; k--) {
      const ok = k * n, d = R[ok + k];
      const x0 = (u0[k] /= d);
      const x1 = u1 && k < u1.length ? (u1[k] /= d) : 0, x2 = u2 && k < u2.length ? (u2[k] /= d) : 0;
      const x3 = u3 && k < u3.length ? (u3[k] /= d) : 0;
      if (x1 === 0 && x2 === 0 && x3 === 0) {
        if (x0 !== 0) for (let r = 0; r < k; r++) u0[r] -= R[ok + r] * x0;
        continue;
      }
      for (let r = 0; r < k; r++) {  // a column whose x is 0 is left alone, as in the one-column solve
        const v = R[ok + r];
        if (x0 !== 0) u0[r] -= v * x0;
        if (x1 !== 0) u1[r] -= v * x1;
        if (x2 !== 0) u2[r] -= v * x2;
        if (x3 !== 0) u3[r] -= v * x3;
      }
    }
  }
  return us;
}

// max_{j > k} |U[k, j]| for each k of [k0, k1) (row k of U: x^T R = e_k^T, forward substitution): the
// explanation's largest update. Four rows at a time share each load of R (and four sums run side by side);
// a row's entries before its own start are zeros, so its sums are its one-row ones.
function uRowMaxes(R, n, k0, k1) {
  const B = k1 - k0, len = n - k0, X = new Float64Array((B + 3) * len), max = new Float64Array(B + 3);
  for (let i = 0; i < B; i++) X[i * len + i] = 1 / R[(k0 + i) * (n + 1)];
  for (let j = k0 + 1; j < n; j++) {
    const oj = j * n + k0, d = R[j * n + j];  // R[k0 + b, j] at oj + b
    for (let i = 0; i < B && k0 + i < j; i += 4) {
      const x0 = i * len, x1 = x0 + len, x2 = x1 + len, x3 = x2 + len, c = j - k0;
      let s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (let b = i; b < c; b++) {
        const v = R[oj + b];
        s0 += X[x0 + b] * v; s1 += X[x1 + b] * v; s2 += X[x2 + b] * v; s3 += X[x3 + b] * v;
      }
      const s = [s0, s1, s2, s3];
      for (let t = 0; t < 4 && i + t < B && k0 + i + t < j; t++) {
        const v = -s[t] / d;
        X[x0 + t * len + c] = v;
        if (Math.abs(v) > max[i + t]) max[i + t] = Math.abs(v);
      }
    }
  }
  return max.subarray(0, B);
}

// engine.blocks.block_bounds: where the lazy blocks start
function blockStarts(n, cfg) {
  const width = cfg.group_size === -1 ? n : cfg.group_size, dynamic = cfg.group_size !== -1 && !cfg.static_groups;
  const starts = new Set();
  for (let s = 0; s < n; s += cfg.block_size || BLOCK_SIZE) starts.add(s);
  if (dynamic) for (let s = 0; s < n; s += width) starts.add(s);
  return [...starts].sort((a, b) => a - b);
}

// ---- what depends on the layer only, or on it and the order: computed once, kept on the layer object

// W column-major (entry (r, j) at j * d_out + r), as given; by blocks of rows, so both sides stay cached
function colMajor(layer) {
  if (!layer.Wcm) {
    const { d_out, d_in: n } = layer, A = layer.W, T = new Float64Array(d_out * n);
    for (let r0 = 0; r0 < d_out; r0 += 32) {
      const r1 = Math.min(r0 + 32, d_out);
      for (let j = 0; j < n; j++) for (let r = r0, o = j * d_out; r < r1; r++) T[o + r] = A[r * n + j];
    }
    layer.Wcm = T;
  }
  return layer.Wcm;
}

// diag(H) with dead inputs (diag H = 0) at 1, which inputs are dead, and W with them zeroed
function layerBase(layer) {
  if (!layer.base) {
    const { d_out, d_in: n } = layer, Wcm = colMajor(layer), diag = new Float64Array(n), dead = new Uint8Array(n);
    let Wz = Wcm;
    for (let i = 0; i < n; i++) {
      diag[i] = layer.H[i * n + i];
      if (diag[i] !== 0) continue;
      dead[i] = 1;
      diag[i] = 1;
      if (Wz === Wcm) Wz = Wcm.slice();
      Wz.fill(0, i * d_out, (i + 1) * d_out);
    }
    layer.base = { diag, dead, Wz };
  }
  return layer.base;
}

// The processing order (desc_act: decreasing diag(H), a stable sort), W0 = W in that order, diag(H) in it
// (undamped, dead inputs at 0) and the weights' colour range, for each of the two orders
function orderOf(layer, descAct) {
  const orders = layer.orders || (layer.orders = {}), key = descAct ? "desc_act" : "natural";
  if (!orders[key]) {
    const { d_out, d_in: n } = layer, { diag, Wz } = layerBase(layer), perm = permOf(diag, descAct);
    let W0 = Wz;
    if (descAct) {
      W0 = new Float64Array(d_out * n);
      perm.forEach((j, p) => W0.set(Wz.subarray(j * d_out, (j + 1) * d_out), p * d_out));
    }
    const diagH = Float64Array.from(perm, (j) => layer.H[j * n + j]);
    orders[key] = { perm, W0, diagH, wmax: absPercentile(W0, 99.5) };
  }
  return orders[key];
}

// The processing order: the columns as given, or (desc_act) by decreasing diag(H) (dead inputs at 1), a
// stable sort: ties keep their order
function permOf(diag, descAct) {
  const perm = Array.from({ length: diag.length }, (_, i) => i);
  if (descAct) perm.sort((a, b) => diag[b] - diag[a]);
  return perm;
}

// H in processing order, damped (into Hd, n x n, symmetric): H[perm[a], perm[b]], the diagonal
// diag + damp * mean(diag) (dead inputs at 1). The GPTQ worker factors it; the RTN worker weighs RTN's
// errors with it (the same numbers: RTN's curve is GPTQ's baseline)
function dampedH(layer, perm, diag, damp, Hd) {
  const n = layer.d_in;
  let meanDiag = 0;
  for (let a = 0; a < n; a++) meanDiag += diag[perm[a]] / n;
  for (let a = 0; a < n; a++) {
    const row = perm[a] * n, o = a * n;
    for (let b = 0; b < n; b++) Hd[o + b] = layer.H[row + perm[b]];
    Hd[o + a] = diag[perm[a]] + damp * meanDiag;
  }
  return Hd;
}

// The damped H in processing order and its factor R, with the damping that worked (x10 retries). They
// depend on the layer, desc_act and damp_percent only: the last ones are kept, so a change of bits, group
// size or grid skips the factorization (the costliest step after the loop).
let lastFactor = null;
function factorOf(layer, cfg, perm, diag, stages) {
  const n = layer.d_in, key = `${cfg.desc_act}/${cfg.damp_percent}`;
  if (lastFactor && lastFactor.layer === layer && lastFactor.key === key) return lastFactor;
  lastFactor = null;
  let R = null, damp = cfg.damp_percent;
  const Hd = new Float64Array(n * n);
  for (; damp <= MAX_DAMP_PERCENT * (1 + 1e-9); damp *= 10) {
    dampedH(layer, perm, diag, damp, Hd);
    const t = performance.now();
    R = hessianFactor(Hd, n);
    stages.cholesky_ms = (stages.cholesky_ms || 0) + performance.now() - t;
    if (R) break;
  }
  if (!R) throw new Error(`H is not positive definite even after raising damp_percent from ${cfg.damp_percent} to 1`);
  lastFactor = { layer, key, Hd, R, damp };
  return lastFactor;
}

// gptq.prepare_layer: the row grid, dead inputs, static grids, the order, damping (x10 retries), U.
// stages gets the milliseconds of its costly steps (the page's timings() reports them).
function prepare(layer, cfg, stages = {}) {
  const { d_out, d_in: n } = layer;
  const width = cfg.group_size === -1 ? n : cfg.group_size;
  const { diag, dead, Wz } = layerBase(layer), { perm, W0, diagH, wmax } = orderOf(layer, cfg.desc_act);
  // the per-row grid from W as given, before the dead-input fix (as the reference)
  const rowGrid = cfg.group_size === -1 ? gridOf(colMajor(layer), d_out, 0, n, cfg.bits, cfg.sym) : null;
  let staticGrids = null;
  if (cfg.static_groups && cfg.group_size !== -1) {
    staticGrids = [];
    for (let s = 0; s < n; s += width) staticGrids.push(gridOf(Wz, d_out, s, Math.min(s + width, n), cfg.bits, cfg.sym));
  }
  const { Hd, R, damp } = factorOf(layer, cfg, perm, diag, stages);
  return { W0, Hd, R, perm, dead, damp, rowGrid, staticGrids, width, diag, diagH, wmax };
}

// A run's working arrays (d_out x n each), kept for the next run of that size: a run is never read again
// once the next one starts
let pool = null;
function buffers(size) {
  if (!pool || pool.size !== size) {
    const f = () => new Float64Array(size);
    pool = { size, W: f(), Q: f(), Err1: f(), E: f(), X: f(), codes: new Uint8Array(size) };
  }
  return pool;
}

// gptq._iterate, block by block. The engine carries every block's updates to all later columns at once
// (W[:, i2:] -= Err1 U[i1:i2, i2:], with U formed); here each block instead starts from the sum of all
// earlier updates, which needs R, not U (W0 - Q = Err1 U, so Err1 = E R with E = W0 - Q):
//   W[:, G] = W0[:, G] + (E[:, :i1] R[:i1, G]) U[G, G]   for the columns G = [i1, e) of the block
// (the OBS update of G for the columns before i1, rounded as they were). Same numbers, no U.
// onBlock(res, done), if given, is called once the order and U are known (done = 0) and after each block
// (done = the columns finished): what the page needs for a first frame is there long before the end.
function gptq(layer, cfg, stages = {}, onBlock = null) {
  const { d_out, d_in: n } = layer;
  let t = performance.now(), waited = 0;
  const prep = prepare(layer, cfg, stages);
  stages.prepare_ms = performance.now() - t;
  t = performance.now();
  const { R, perm, width, W0 } = prep;
  const maxq = 2 ** cfg.bits - 1, dynamic = cfg.group_size !== -1 && !cfg.static_groups;
  // W: the working weights; after the loop column p is w_p as it was quantized
  const { W, Q, Err1, E, X, codes } = buffers(d_out * n);
  const losses = new Float64Array(n), running = new Float64Array(n);
  const group = new Int32Array(n), hinvDiag = new Float64Array(n), starts = blockStarts(n, cfg);
  const scales = dynamic ? [] : prep.rowGrid ? [prep.rowGrid.scale] : prep.staticGrids.map((g) => g.scale);
  const res = { prep, Wq: W, Q, Err1, codes, losses, running, group, hinvDiag, scales, starts };
  const report = (done) => {
    if (!onBlock) return;
    const t0 = performance.now();
    onBlock(res, done);
    waited += performance.now() - t0;
  };
  report(0);
  let grid = null, total = 0;
  for (let b = 0; b < starts.length; b++) {
    const i1 = starts[b], i2 = b + 1 < starts.length ? starts[b + 1] : n, groupStart = dynamic && i1 % width === 0;
    // G: the block, or the group starting here when it is wider (its grid needs all its columns)
    const e = groupStart ? Math.max(i2, Math.min(i1 + width, n)) : i2, m = e - i1;
    const Ugg = upperInverse(R, n, i1, e);  // U[G, G], m x m
    W.set(W0.subarray(i1 * d_out, e * d_out), i1 * d_out);
    if (i1 > 0) {
      X.fill(0, 0, d_out * m);  // -(E[:, :i1] R[:i1, G])
      gemmSub(X, 0, d_out, E, 0, d_out, R, i1 * n, n, d_out, m, i1);
      for (let c0 = 0; c0 < m; c0 += NB) {  // W[:, G] -= X U[G, G], block column by block column (U is upper)
        const c1 = Math.min(c0 + NB, m);
        gemmSub(W, (i1 + c0) * d_out, d_out, X, 0, d_out, Ugg, c0 * m, m, d_out, c1 - c0, c1);
      }
    }
    if (groupStart) {
      grid = gridOf(W, d_out, i1, Math.min(i1 + width, n), cfg.bits, cfg.sym);  // from the updated weights
      scales.push(grid.scale);
    }
    // Inside the block: sub-blocks of SUB columns update each other column by column (the engine's order),
    // and the block's later columns once per sub-block (a product: 3-4x faster than column by column)
    for (let s1 = i1, s2; s1 < i2; s1 = s2) {
      s2 = Math.min(s1 + SUB, i2);
      for (let p = s1; p < s2; p++) {
        if (prep.rowGrid) grid = prep.rowGrid;
        else if (prep.staticGrids) grid = prep.staticGrids[Math.floor(perm[p] / width)];
        group[p] = dynamic ? Math.floor(p / width) : prep.staticGrids ? Math.floor(perm[p] / width) : 0;
        const o = p * d_out, d = Ugg[(p - i1) * (m + 1)], sc = grid.scale, zr = grid.zero;  // d = U[p, p]
        let loss = 0;
        for (let r = 0; r < d_out; r++) {
          const w = W[o + r], c = quantCode(w, sc[r], zr[r], maxq), q = sc[r] * (c - zr[r]);
          codes[o + r] = c;
          Q[o + r] = q;
          E[o + r] = W0[o + r] - q;
          Err1[o + r] = (w - q) / d;
          loss += (w - q) * (w - q);
        }
        // OBS update of the sub-block's later columns (Eq. 3 via row p of U): W[:, j] -= Err1[:, p] U[p, j]
        for (let j = p + 1; j < s2; j++) {
          const u = Ugg[(p - i1) + (j - i1) * m], oj = j * d_out;
          if (u === 0) continue;
          for (let r = 0; r < d_out; r++) W[oj + r] -= Err1[o + r] * u;
        }
        losses[p] = loss / (d * d) / 2;
        total += losses[p];
        running[p] = total;
        hinvDiag[p] = d;
      }
      if (s2 < i2) {  // W[:, s2:i2] -= Err1[:, s1:s2] U[s1:s2, s2:i2]
        gemmSub(W, s2 * d_out, d_out, Err1, s1 * d_out, d_out, Ugg, (s1 - i1) + (s2 - i1) * m, m, d_out, i2 - s2, s2 - s1);
      }
    }
    report(i2);
  }
  stages.loop_ms = performance.now() - t - waited;
  stages.frames_in_loop_ms = waited;
  return res;
}

// ---- RTN

// rtn.rtn_quantize_numpy: each group of W (original order, as given) on its own grid. Returns D = W - Q,
// column-major and row-major (the Gram product reads both)
function rtnDelta(layer, cfg) {
  const { d_out, d_in: n } = layer, width = cfg.group_size === -1 ? n : cfg.group_size;
  const maxq = 2 ** cfg.bits - 1, W = colMajor(layer);
  const D = new Float64Array(d_out * n), Drm = new Float64Array(d_out * n);
  for (let s = 0; s < n; s += width) {
    const e = Math.min(s + width, n), g = gridOf(W, d_out, s, e, cfg.bits, cfg.sym);
    for (let j = s; j < e; j++) {
      for (let r = 0; r < d_out; r++) {
        const w = W[j * d_out + r], c = quantCode(w, g.scale[r], g.zero[r], maxq);
        D[j * d_out + r] = Drm[r * n + j] = w - g.scale[r] * (c - g.zero[r]);
      }
    }
  }
  return { D, Drm };
}

// G = D^T D (n x n, column-major; the upper triangle and the diagonal blocks are filled): RTN's running
// loss needs it. Per block of columns j0..j1: G[:j1, j0:j1] = -(0 - D^T D) with gemmSub
function gram(D, Drm, d_out, n) {
  const G = new Float64Array(n * n), w = 64;
  for (let j0 = 0; j0 < n; j0 += w) {
    const j1 = Math.min(j0 + w, n);
    gemmSub(G, j0 * n, n, Drm, 0, n, D, j0 * d_out, d_out, j1, j1 - j0, d_out);
    for (let j = j0; j < j1; j++) for (let i = 0; i < j1; i++) G[i + j * n] = -G[i + j * n];
  }
  return G;
}

// The held-out output MSE of a quantized layer (layer_run._heldout_mse): ||X_h D^T||^2 / (tokens d_out), with
// D = W - Q (d_out x n, row-major) and X_h the held-out inputs (tokens x n, row-major)
function heldoutMse(Drm, Xh, d_out, n, tokens) {
  let sum = 0;
  for (let t = 0; t < tokens; t++) {
    const x = Xh.subarray(t * n, (t + 1) * n);
    for (let r = 0, o = 0; r < d_out; r++, o += n) {
      let y = 0;
      for (let j = 0; j < n; j++) y += Drm[o + j] * x[j];
      sum += y * y;
    }
  }
  return sum / (tokens * d_out);
}

// layer_run._running_loss: r[k] = 1/2 sum_{a,b<=k} (D^T D)_ab Hd_ab over processing positions a, b
function runningLoss(G, Hd, perm, n) {
  const out = new Float64Array(n);
  let total = 0;
  for (let k = 0; k < n; k++) {
    const jk = perm[k], Hk = k * n;
    let s = 0;
    for (let a = 0; a < k; a++) {
      const ja = perm[a];
      s += (ja < jk ? G[ja + jk * n] : G[jk + ja * n]) * Hd[Hk + a];  // Hd is symmetric
    }
    total += s + 0.5 * G[jk + jk * n] * Hd[Hk + k];
    out[k] = total;
  }
  return out;
}

// ---- colour ranges

// The q-th percentile of |a| (of |a - b| with b; of the first `count` entries) (np.percentile's linear
// interpolation) on at most ~200k evenly spaced entries: the heatmaps' colour ranges, where a sample is plenty
function absPercentile(a, q, b = null, count = a.length) {
  const stride = Math.max(1, Math.floor(count / 200000)), v = new Float64Array(Math.ceil(count / stride));
  if (b) for (let i = 0, t = 0; i < count; i += stride, t++) v[t] = Math.abs(a[i] - b[i]);
  else for (let i = 0, t = 0; i < count; i += stride, t++) v[t] = Math.abs(a[i]);
  const at = (q / 100) * (v.length - 1), lo = Math.floor(at), x = select(v, lo);
  let y = x;  // the next value up: the smallest of those after lo
  if (lo + 1 < v.length) { y = Infinity; for (let i = lo + 1; i < v.length; i++) if (v[i] < y) y = v[i]; }
  return (x + (at - lo) * (y - x)) || 1;
}

// Quickselect (Hoare): v[k] becomes the k-th smallest, with no larger value before it and no smaller after
// (a sort of 300k numbers took longer than the rest of a run)
function select(v, k) {
  let lo = 0, hi = v.length - 1;
  while (lo < hi) {
    const pivot = v[(lo + hi) >> 1];
    let i = lo, j = hi;
    while (i <= j) {
      while (v[i] < pivot) i++;
      while (v[j] > pivot) j--;
      if (i <= j) { const t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else break;  // between j and i: equal to the pivot
  }
  return v[k];
}

