// GPTQ and RTN in plain JavaScript, for the static Layer Lab (docs/site.md). It runs in two Web Workers
// started from this one source: one runs GPTQ and cuts the frames, the other RTN's Gram matrix D^T D (the
// costly half of RTN's running output error) at the same time, on the other core.
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
// than a column-at-a-time update in V8.
//
// Messages: {type: "layer", W, H, d_out, d_in} (Float32Array, row-major; H may be left out for the RTN
// worker) -> {type: "layer-ok"}; {type: "run", id, cfg, gram_key} -> {type: "result", id, ...} (runMessage;
// RTN's numbers in it when the Gram matrix named gram_key (the layer and the grid) is at hand, else null);
// {type: "gram", key, cfg} -> {type: "gram", key, G, seconds} (G transferred); {type: "rtn", key, G} (the
// page passes it on) -> {type: "rtn", id, ...RTN's numbers} for the current run if it has that key;
// {type: "frames", id, ks, crop} ->
// {type: "frames", id, frames} (one per column k: the crops the canvas draws and the step's numbers).

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

function quantCode(w, scale, zero, maxq) {
  return Math.min(Math.max(roundTie(w / scale) + zero, 0), maxq);
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
// U's diagonal blocks (upperInverse), a frame a few of its columns and one row (uColumn, uRowMax).
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

// U[0:j+1, j] (R u = e_j, back substitution): a column the frames' pending weights need
function uColumn(R, n, j) {
  const u = new Float64Array(j + 1);
  u[j] = 1;
  for (let k = j; k >= 0; k--) {
    const ok = k * n, x = (u[k] /= R[ok + k]);
    if (x !== 0) for (let r = 0; r < k; r++) u[r] -= R[ok + r] * x;
  }
  return u;
}

// max_{j > k} |U[k, j]| (row k of U: x^T R = e_k^T, forward substitution): the explanation's largest update
function uRowMax(R, n, k) {
  const x = new Float64Array(n - k);
  x[0] = 1 / R[k + k * n];
  let max = 0;
  for (let j = k + 1; j < n; j++) {
    const oj = j * n + k;
    let s = 0;
    for (let b = 0; b < j - k; b++) s += x[b] * R[oj + b];
    x[j - k] = -s / R[oj + j - k];
    max = Math.max(max, Math.abs(x[j - k]));
  }
  return max;
}

// engine.blocks.block_bounds: where the lazy blocks start
function blockStarts(n, cfg) {
  const width = cfg.group_size === -1 ? n : cfg.group_size, dynamic = cfg.group_size !== -1 && !cfg.static_groups;
  const starts = new Set();
  for (let s = 0; s < n; s += cfg.block_size || BLOCK_SIZE) starts.add(s);
  if (dynamic) for (let s = 0; s < n; s += width) starts.add(s);
  return [...starts].sort((a, b) => a - b);
}

// The damped H in processing order and its factor R, with the damping that worked (x10 retries). They
// depend on the layer, desc_act and damp_percent only: the last ones are kept, so a change of bits, group
// size or grid skips the factorization (the costliest step after the loop).
let lastFactor = null;
function factorOf(layer, cfg, perm, diag, stages) {
  const n = layer.d_in, key = `${cfg.desc_act}/${cfg.damp_percent}`;
  if (lastFactor && lastFactor.layer === layer && lastFactor.key === key) return lastFactor;
  lastFactor = null;
  let meanDiag = 0;
  for (let a = 0; a < n; a++) meanDiag += diag[perm[a]] / n;
  let R = null, damp = cfg.damp_percent;
  const Hd = new Float64Array(n * n);  // H in processing order, damped (symmetric)
  for (; damp <= MAX_DAMP_PERCENT * (1 + 1e-9); damp *= 10) {
    for (let a = 0; a < n; a++) {
      const row = perm[a] * n, o = a * n;
      for (let b = 0; b < n; b++) Hd[o + b] = layer.H[row + perm[b]];
      Hd[o + a] = diag[perm[a]] + damp * meanDiag;
    }
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
  const { Hd, R, damp } = factorOf(layer, cfg, perm, diag, stages);
  return { W0, Hd, R, perm, dead, damp, rowGrid, staticGrids, width, diag };
}

// gptq._iterate, block by block. The engine carries every block's updates to all later columns at once
// (W[:, i2:] -= Err1 U[i1:i2, i2:], with U formed); here each block instead starts from the sum of all
// earlier updates, which needs R, not U (W0 - Q = Err1 U, so Err1 = E R with E = W0 - Q):
//   W[:, G] = W0[:, G] + (E[:, :i1] R[:i1, G]) U[G, G]   for the columns G = [i1, e) of the block
// (the OBS update of G for the columns before i1, rounded as they were). Same numbers, no U.
function gptq(layer, cfg, stages = {}) {
  const { d_out, d_in: n } = layer;
  let t = performance.now();
  const prep = prepare(layer, cfg, stages);
  stages.prepare_ms = performance.now() - t;
  t = performance.now();
  const { R, perm, width, W0 } = prep;
  const maxq = 2 ** cfg.bits - 1, dynamic = cfg.group_size !== -1 && !cfg.static_groups;
  const W = new Float64Array(d_out * n);  // the working weights; after the loop column p is w_p as it was quantized
  const Q = new Float64Array(d_out * n), Err1 = new Float64Array(d_out * n), E = new Float64Array(d_out * n);
  const codes = new Uint8Array(d_out * n), losses = new Float64Array(n), running = new Float64Array(n);
  const group = new Int32Array(n), hinvDiag = new Float64Array(n), scales = [], starts = blockStarts(n, cfg);
  let grid = null, total = 0;
  starts.forEach((i1, b) => {
    const i2 = b + 1 < starts.length ? starts[b + 1] : n, groupStart = dynamic && i1 % width === 0;
    // G: the block, or the group starting here when it is wider (its grid needs all its columns)
    const e = groupStart ? Math.max(i2, Math.min(i1 + width, n)) : i2, m = e - i1;
    const Ugg = upperInverse(R, n, i1, e);  // U[G, G], m x m
    W.set(W0.subarray(i1 * d_out, e * d_out), i1 * d_out);
    if (i1 > 0) {
      const X = new Float64Array(d_out * m);  // -(E[:, :i1] R[:i1, G])
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
        const o = p * d_out, d = Ugg[(p - i1) * (m + 1)];  // U[p, p]
        let loss = 0;
        for (let r = 0; r < d_out; r++) {
          const w = W[o + r], c = quantCode(w, grid.scale[r], grid.zero[r], maxq);
          const q = grid.scale[r] * (c - grid.zero[r]);
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
  });
  if (!dynamic) scales.push(...(prep.rowGrid ? [prep.rowGrid.scale] : prep.staticGrids.map((g) => g.scale)));
  stages.loop_ms = performance.now() - t;
  return { prep, Wq: W, Q, Err1, codes, losses, running, group, hinvDiag, scales, starts };
}

// ---- RTN

// rtn.rtn_quantize_numpy: each group of W (original order, as given) on its own grid. Returns D = W - Q,
// column-major and row-major (the Gram product reads both)
function rtnDelta(layer, cfg) {
  const { d_out, d_in: n } = layer, width = cfg.group_size === -1 ? n : cfg.group_size;
  const maxq = 2 ** cfg.bits - 1, W = new Float64Array(d_out * n);
  for (let r = 0; r < d_out; r++) for (let j = 0; j < n; j++) W[j * d_out + r] = layer.W[r * n + j];
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

// RTN's numbers for a run, from the Gram matrix of its grid
function rtnPart(run, G) {
  const { d_out, d_in: n } = state.layer, { perm, Hd } = run.res.prep;
  const running = runningLoss(G, Hd, perm, n), curve = new Float64Array(n);
  let wse = 0;
  for (let j = 0; j < n; j++) wse += G[j + j * n];
  for (let p = 0; p < n; p++) curve[p] = running[p] / d_out;
  return { running, curve_rtn: curve, weight_mse_rtn: wse / (d_out * n), calib_mse_rtn: curve[n - 1],
           loss_rtn: running[n - 1] };
}

// ---- the worker: one layer, its last run, the last Gram matrix

const state = { layer: null, run: null, gram: null };

function runMessage(msg) {
  const t0 = performance.now(), cfg = msg.cfg, layer = state.layer, { d_out, d_in: n } = layer;
  const stages = {}, res = gptq(layer, cfg, stages), perm = res.prep.perm;
  const codes = new Int32Array(d_out * n);  // row-major, original column order
  let wseG = 0;
  perm.forEach((j, p) => {
    for (let r = 0; r < d_out; r++) {
      codes[r * n + j] = res.codes[p * d_out + r];
      const e = layer.W[r * n + j] - res.Q[p * d_out + r];
      wseG += e * e;
    }
  });
  const curveG = new Float64Array(n), diagH = new Float64Array(n);
  for (let p = 0; p < n; p++) {
    curveG[p] = res.running[p] / d_out;
    diagH[p] = layer.H[perm[p] * n + perm[p]];  // undamped, dead inputs at 0
  }
  const warnings = [];
  if (Math.abs(res.prep.damp - cfg.damp_percent) > 1e-12) {
    warnings.push(`H + damping was not positive definite with damp_percent=${cfg.damp_percent}; quantized with `
      + `damp_percent=${res.prep.damp.toPrecision(3)} instead.`);
  }
  const nDead = res.prep.dead.reduce((a, b) => a + b, 0);
  if (nDead) warnings.push(`${nDead} dead input${nDead > 1 ? "s" : ""} (diag H = 0): zeroed, as the reference does.`);
  const run = { id: msg.id, cfg, res, gramKey: msg.gram_key, rtn: null };
  state.run = run;
  if (state.gram && state.gram.key === msg.gram_key) run.rtn = rtnPart(run, state.gram.G);
  const absDiff = new Float64Array(d_out * n);
  for (let i = 0; i < absDiff.length; i++) absDiff[i] = res.Wq[i] - res.Q[i];
  const scaleMean = res.scales.map((s) => s.reduce((a, b) => a + b, 0) / s.length);
  return {
    type: "result", id: msg.id, codes, perm: Int32Array.from(perm), curve_gptq: curveG, diag_h: diagH,
    group: res.group, wmax: absPercentile(res.prep.W0, 99.5), emax: absPercentile(absDiff, 99.5),
    scale_mean: Float64Array.from(scaleMean), rtn: rtnMessage(run),
    summary: {
      weight_mse_gptq: wseG / (d_out * n), calib_mse_gptq: curveG[n - 1], loss_gptq: res.running[n - 1],
      damp_percent_used: res.prep.damp,
    },
    warnings, seconds: (performance.now() - t0) / 1000, stages,
  };
}

// what the page gets of a run's RTN side (null until its Gram matrix came)
function rtnMessage(run) {
  if (!run.rtn) return null;
  const { running, curve_rtn, weight_mse_rtn, calib_mse_rtn, loss_rtn } = run.rtn;
  return { running_rtn: running, curve_rtn, weight_mse_rtn, calib_mse_rtn, loss_rtn };
}

// The q-th percentile of |a| (np.percentile's linear interpolation) on at most ~200k evenly spaced
// entries: the heatmaps' colour ranges, where a sample is plenty
function absPercentile(a, q) {
  const stride = Math.max(1, Math.floor(a.length / 200000)), v = new Float64Array(Math.ceil(a.length / stride));
  for (let i = 0, t = 0; i < a.length; i += stride, t++) v[t] = Math.abs(a[i]);
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

// U's column j, kept for the run's later frames (a crop shows the same columns for several steps)
function uColumnOf(run, j) {
  run.ucols = run.ucols || new Map();
  if (!run.ucols.has(j)) {
    if (run.ucols.size >= 512) run.ucols.clear();
    run.ucols.set(j, uColumn(run.res.prep.R, state.layer.d_in, j));
  }
  return run.ucols.get(j);
}

// One column's frame: the canvas's five crops (layer_run.frame) and the numbers its explanation quotes
function frameOf(k, crop) {
  const run = state.run, { res, rtn } = run, { d_out, d_in: n } = state.layer;
  const { R, W0, perm } = res.prep, { Wq, Q, Err1 } = res;
  const rows = Math.min(crop.rows, d_out), cols = Math.min(crop.cols, n);
  const r0 = Math.max(0, Math.min(crop.row0, d_out - rows));
  const margin = Math.floor(cols / 8), step = Math.max(cols - 2 * margin, 1);  // layer_run.window's pages
  const c0 = Math.max(0, Math.min(Math.floor((k - margin) / step) * step, n - cols)), c1 = c0 + cols;
  const size = rows * cols, z = {};
  for (const name of ["W", "updated", "Q", "error", "compensation"]) z[name] = new Float32Array(size).fill(NaN);
  for (let c = 0; c < cols; c++) {
    const j = c0 + c, o = j * d_out, u = j > k ? uColumnOf(run, j) : null;  // U[:, j]
    for (let i = 0; i < rows; i++) {
      const r = r0 + i, at = i * cols + c;
      z.W[at] = W0[o + r];
      if (j <= k) {
        z.updated[at] = Wq[o + r];
        z.Q[at] = Q[o + r];
        z.error[at] = Wq[o + r] - Q[o + r];
      } else {  // W0 - Err1[:, :k+1] @ U[:k+1, j] (layer_run.Run.pending)
        let v = W0[o + r];
        for (let p = 0; p <= k; p++) v -= Err1[p * d_out + r] * u[p];
        z.updated[at] = v;
        z.compensation[at] = -Err1[k * d_out + r] * u[k];
      }
    }
  }
  const w = new Float32Array(rows), q = new Float32Array(rows);
  let errNorm = 0, errMax = 0;
  for (let r = 0; r < d_out; r++) {
    const a = Wq[k * d_out + r], b = Q[k * d_out + r];
    errNorm += (a - b) * (a - b);
    errMax = Math.max(errMax, Math.abs(Err1[k * d_out + r]));
    if (r >= r0 && r < r0 + rows) { w[r - r0] = a; q[r - r0] = b; }
  }
  const uMax = k + 1 < n ? uRowMax(R, n, k) : 0;
  // the lazy block of k (the explanation names it): the last start <= k, and the next one
  const starts = res.starts, b = starts.findLastIndex((s) => s <= k);
  const block = [starts[b], b + 1 < starts.length ? starts[b + 1] : n];
  return {
    meta: { k, r0, r1: r0 + rows, c0, c1, column: perm[k], group: res.group[k], d: res.hinvDiag[k],
            err_norm: Math.sqrt(errNorm), upd_max: errMax * uMax, loss: res.losses[k], running: res.running[k],
            running_rtn: rtn ? rtn.running[k] : null, block },
    z, w, q,
  };
}

if (typeof self !== "undefined" && typeof self.postMessage === "function" && typeof window === "undefined") {
  self.onmessage = (e) => {
    const msg = e.data;
    try {
      if (msg.type === "layer") {
        state.layer = { W: Float64Array.from(msg.W), H: msg.H ? Float64Array.from(msg.H) : null,
                        d_out: msg.d_out, d_in: msg.d_in };
        state.run = null;
        state.gram = null;
        lastFactor = null;
        self.postMessage({ type: "layer-ok", token: msg.token });
      } else if (msg.type === "run") {
        const out = runMessage(msg);
        self.postMessage(out, [out.codes.buffer]);
      } else if (msg.type === "gram") {  // the RTN worker
        const t0 = performance.now(), { D, Drm } = rtnDelta(state.layer, msg.cfg);
        const G = gram(D, Drm, state.layer.d_out, state.layer.d_in);
        self.postMessage({ type: "gram", key: msg.key, G, seconds: (performance.now() - t0) / 1000 }, [G.buffer]);
      } else if (msg.type === "rtn") {  // the GPTQ worker: the Gram matrix the RTN worker made
        state.gram = { key: msg.key, G: msg.G };
        const run = state.run;
        if (run && !run.rtn && run.gramKey === msg.key) {
          run.rtn = rtnPart(run, msg.G);
          self.postMessage({ type: "rtn", id: run.id, ...rtnMessage(run) });
        }
      } else if (msg.type === "frames") {
        if (!state.run || state.run.id !== msg.id) return;  // an older run's request
        const frames = msg.ks.map((k) => frameOf(k, msg.crop)), buffers = [];
        for (const f of frames) buffers.push(...Object.values(f.z).map((a) => a.buffer), f.w.buffer, f.q.buffer);
        self.postMessage({ type: "frames", id: msg.id, gen: msg.gen, frames }, buffers);
      }
    } catch (err) {
      self.postMessage({ type: "error", id: msg.id, message: String(err && err.message || err) });
    }
  };
}

if (typeof module !== "undefined") {
  module.exports = { gptq, prepare, gridOf, roundTie, rtnDelta, gram, runningLoss, runMessage, frameOf, state,
                     gemmSub, choleskyLower, hessianFactor, upperInverse, uColumn, uRowMax, absPercentile, rtnPart };
}
