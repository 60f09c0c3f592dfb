// The Layer Lab figure's picture (the view that shows it, keeps its frames and answers the mouse is
// layer_canvas.js, which imports this): the layout, the colours and colour scales, and paint(), which draws
// one picture of the figure on a 2D context in WIDTH x HEIGHT units: the five heatmaps (six with GPTAQ's
// split), their colour bars, the column profile, diag(H), the running output error, the cursor's column and
// the highlighted one. It keeps no state: what to draw comes in its arguments. The coordinate helpers are
// the view's too (the tooltip and a click find what is under the mouse with them).

export const WIDTH = 860, HEIGHT = 860;
export const HEATMAPS = ["W", "updated", "Q", "error", "compensation"];
export const TITLES = {
  W: ["W (original)", "#444"],
  updated: ["weights being updated", "#1f77b4"],
  Q: ["Q(W) so far", "#ff7f0e"],
  error: ["error w − q", "#d62728"],
  compensation: ["compensation ΔW just applied", "#2ca02c"],
  obs: ["OBS update −e ⊗ U", "#2ca02c"],
  correction: ["GPTAQ correction + w ⊗ P", "#17becf"],
};
// GPTAQ: the compensation panel's place holds the OBS update and GPTAQ's correction, one above the other
const SPLIT = ["W", "updated", "Q", "error", "obs", "correction"];
const COLORS = { w: "#1f77b4", q: "#ff7f0e", err: "#d62728", hinv: "#9467bd", upd: "#2ca02c", rtn: "#7f7f7f",
                 cursor: "#111111", hover: "#e377c2", axis: "#444", grid: "#e6e6e6", nan: "#f3f3f3" };
// panels: x, y, width, height of the plotting area (CSS pixels)
const COLW = 182, GAP = 62, LEFT = 52;
const colX = (i) => LEFT + i * (COLW + GAP);
const PANELS = {
  W: [colX(0), 34, COLW, 236], updated: [colX(1), 34, COLW, 236], Q: [colX(2), 34, COLW, 236],
  error: [colX(0), 332, COLW, 236], compensation: [colX(1), 332, COLW, 236], profile: [colX(2), 332, COLW, 236],
  obs: [colX(1), 332, COLW, 104], correction: [colX(1), 452, COLW, 116],
  diag: [LEFT, 632, 330, 176], curves: [442, 632, 280, 176],
};
const RTN_DASH = [5, 3];
const DIVERGING_PIYG = new Set(["compensation", "obs", "correction"]);
const BARS = { W: [736, 44, 216, "w"], error: [736, 354, 204, "w−q"], compensation: [790, 354, 204, "ΔW"] };

// diverging colour scales (ColorBrewer RdBu and PiYG): negative, zero (light grey), positive
const SCALES = {
  RdBu: ["#2166ac", "#67a9cf", "#f7f7f7", "#ef8a62", "#b2182b"],
  PiYG: ["#c51b7d", "#e9a3c9", "#f7f7f7", "#a1d76a", "#4d9221"],
};
const hex = (s) => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16));
function lut(stops) {
  const rgb = stops.map(hex), out = [];
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (rgb.length - 1), a = Math.min(Math.floor(t), rgb.length - 2), f = t - a;
    out.push(`rgb(${rgb[a].map((c, j) => Math.round(c + f * (rgb[a + 1][j] - c))).join(",")})`);
  }
  return out;
}
const LUTS = { RdBu: lut(SCALES.RdBu), PiYG: lut(SCALES.PiYG) };
const colour = (table, v, max) => table[Math.max(0, Math.min(255, Math.round(((v / max) + 1) * 127.5)))];

export const f32 = (v) => {
  if (!v) return new Float32Array(0);
  if (v instanceof Float32Array) return v;
  if (v.buffer) return new Float32Array(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  return Float32Array.from(v);
};
const SUP = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };
const pow10 = (e) => "10" + String(e).split("").map((c) => SUP[c]).join("");
export const fmt = (v) => (v === null || !Number.isFinite(v)) ? "–" : Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3)
  ? v.toExponential(3) : v.toPrecision(4);
function niceStep(span, maxTicks) {
  for (const s of [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000]) {
    if (span / s <= maxTicks) return s;
  }
  return Math.pow(10, Math.ceil(Math.log10(span / maxTicks)));
}

function linearTicks(lo, hi, maxTicks) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / maxTicks, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-12 * span; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  return out;
}

// ---- coordinates (drawing units), for a scene and a frame
export const heatmapsOf = (frame) => (frame.z.obs ? SPLIT : HEATMAPS);
export const isOriginal = (scene) => scene.basis === "original";
// the heatmap cell under (x, y): {row, col, value}, or null
export function cellAt(frame, name, x, y) {
  const [px, py, pw, ph] = PANELS[name];
  const nc = frame.c1 - frame.c0, nr = frame.r1 - frame.r0;
  if (x < px || x >= px + pw || y < py || y >= py + ph || nc <= 0 || nr <= 0) return null;
  const c = Math.floor(((x - px) / pw) * nc), r = Math.floor(((y - py) / ph) * nr);
  return { row: frame.r0 + r, col: frame.c0 + c, value: frame.z[name][r * nc + c] };
}
export function xOfPosition(scene, panel, p) {  // position p (0..n-1) to x in a full-width panel
  const [px, , pw] = PANELS[panel];
  return px + ((p + 0.5) / Math.max(scene.n, 1)) * pw;
}
export function positionAt(scene, panel, x) {
  const [px, , pw] = PANELS[panel];
  return Math.max(0, Math.min(scene.n - 1, Math.floor(((x - px) / pw) * scene.n)));
}
export function inside(panel, x, y) {
  const [px, py, pw, ph] = PANELS[panel];
  return x >= px && x < px + pw && y >= py && y < py + ph;
}

// ---- one picture: false if there is nothing to draw yet (no scene, no frame): the canvas is left white
export function paint(ctx, scene, frame, hover) {
  const heatmaps = () => heatmapsOf(frame), original = () => isOriginal(scene);
  const posX = (panel, p) => xOfPosition(scene, panel, p);
  const logY = (panel, v, range) => {
    const [, py, , ph] = PANELS[panel];
    const t = (Math.log10(v) - range[0]) / (range[1] - range[0]);
    return py + ph - Math.max(-0.02, Math.min(1.02, t)) * ph;
  };
  function text(s, x, y, { color = COLORS.axis, size = 11, align = "left", base = "alphabetic", bold = false } = {}) {
    ctx.fillStyle = color;
    ctx.font = `${bold ? "600 " : ""}${size}px sans-serif`;
    ctx.textAlign = align;
    ctx.textBaseline = base;
    ctx.fillText(s, x, y);
  }
  function frameBox(panel) {
    const [px, py, pw, ph] = PANELS[panel];
    ctx.strokeStyle = "#bbb";
    ctx.lineWidth = 1;
    ctx.strokeRect(px - 0.5, py - 0.5, pw + 1, ph + 1);
  }
  function heatmap(name) {
    const [px, py, pw, ph] = PANELS[name];
    const nc = frame.c1 - frame.c0, nr = frame.r1 - frame.r0, z = frame.z[name];
    const table = DIVERGING_PIYG.has(name) ? LUTS.PiYG : LUTS.RdBu;
    let max = name === "error" ? scene.emax : scene.wmax;
    if (DIVERGING_PIYG.has(name)) {  // one scale for the update and its parts: their sizes compare
      max = 0;
      for (const part of (frame.z.obs ? ["obs", "correction"] : ["compensation"])) {
        for (const v of frame.z[part]) if (Number.isFinite(v)) max = Math.max(max, Math.abs(v));
      }
      frame.comp_max = max;
    }
    max = max || 1;
    const cw = pw / Math.max(nc, 1), ch = ph / Math.max(nr, 1);
    for (let r = 0; r < nr; r++) {
      for (let c = 0; c < nc; c++) {
        const v = z[r * nc + c];
        ctx.fillStyle = Number.isFinite(v) ? colour(table, v, max) : COLORS.nan;
        // whole pixels, overlapping by one, so no hairline gaps between cells
        ctx.fillRect(Math.floor(px + c * cw), Math.floor(py + r * ch), Math.ceil(cw) + 1, Math.ceil(ch) + 1);
      }
    }
    ctx.clearRect(px + pw, py, 2, ph + 2);  // the overlap past the right and bottom edges
    ctx.clearRect(px, py + ph, pw + 2, 2);
    frameBox(name);
    const title = (scene.titles || {})[name] || TITLES[name][0], color = TITLES[name][1];
    text(title, px + pw / 2, py - 8, { color, size: 13, align: "center", bold: true });
    // ticks: positions below, rows on the left of the first column's panels
    const xs = niceStep(nc, 6);
    for (let p = Math.ceil(frame.c0 / xs) * xs; name !== "obs" && p < frame.c1; p += xs) {  // obs: no room
      text(String(p), px + (p - frame.c0 + 0.5) * cw, py + ph + 13, { align: "center", size: 10 });
    }
    const ys = niceStep(nr, 8);
    for (let r = Math.ceil(frame.r0 / ys) * ys; r < frame.r1; r += ys) {
      text(String(r), px - 4, py + (r - frame.r0 + 0.5) * ch, { align: "right", base: "middle", size: 10 });
    }
    if (name === "W" || name === "error") {
      ctx.save();
      ctx.translate(px - 36, py + ph / 2);
      ctx.rotate(-Math.PI / 2);
      text("row", 0, 0, { align: "center", size: 11 });
      ctx.restore();
    }
    if (name === "error" || name === "compensation" || name === "correction") {
      text(original() ? "input column (original basis)" : "position p", px + pw / 2, py + ph + 28,
           { align: "center", size: 11 });
    }
  }
  function columnBox(name, p, color, dashed) {
    // in the original basis a crop column is an input, not a step: no step's column to outline
    if (p < frame.c0 || p >= frame.c1 || original()) return;
    const [px, py, pw, ph] = PANELS[name];
    const cw = pw / (frame.c1 - frame.c0);
    ctx.save();
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    if (dashed) ctx.setLineDash([3, 3]);
    ctx.strokeRect(px + (p - frame.c0) * cw, py, cw, ph);
    ctx.restore();
  }
  function colourbar(name) {
    const [x, y, h, label] = BARS[name];
    const table = DIVERGING_PIYG.has(name) ? LUTS.PiYG : LUTS.RdBu;
    for (let i = 0; i < h; i++) {
      ctx.fillStyle = table[Math.round(255 * (1 - i / (h - 1)))];
      ctx.fillRect(x, y + i, 10, 1);
    }
    ctx.strokeStyle = "#999";
    ctx.strokeRect(x - 0.5, y - 0.5, 11, h + 1);
    const max = name === "error" ? scene.emax : name === "W" ? scene.wmax : frame.comp_max || 0;
    text(label, x + 5, y - 8, { align: "center", size: 11 });
    const short = (v) => (v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(1) : v.toPrecision(2));  // fits 45 px
    text(short(max), x + 14, y + 4, { size: 10, base: "middle" });
    text("0", x + 14, y + h / 2, { size: 10, base: "middle" });
    text(short(-max), x + 14, y + h - 2, { size: 10, base: "middle" });
  }
  function polyline(points, color, width, dash) {
    ctx.save();
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    if (dash) ctx.setLineDash(dash);
    ctx.beginPath();
    let pen = false;
    for (const [x, y] of points) {
      if (!Number.isFinite(y)) { pen = false; continue; }
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    }
    ctx.stroke();
    ctx.restore();
  }
  function dots(points, color, r) {
    ctx.fillStyle = color;
    for (const [x, y] of points) {
      if (!Number.isFinite(y)) continue;
      ctx.beginPath();
      ctx.arc(x, y, r, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  function legend(items, x, y) {
    for (const [label, color, dash] of items) {
      polyline([[x, y - 2.5], [x + 14, y - 2.5]], color, 3, dash);
      text(label, x + 18, y, { size: 11, base: "middle" });
      y += 15;
    }
  }
  function logAxis(panel, range) {
    const [px, py, pw, ph] = PANELS[panel];
    const every = Math.max(1, Math.ceil((range[1] - range[0]) / 6));  // at most ~6 labelled decades
    for (let e = Math.ceil(range[0]); e <= Math.floor(range[1]); e += every) {
      const y = logY(panel, Math.pow(10, e), range);
      ctx.fillStyle = COLORS.grid;
      ctx.fillRect(px, Math.round(y), pw, 1);
      text(pow10(e), px - 4, y, { align: "right", base: "middle", size: 10 });
    }
  }
  function positionAxis(panel) {
    const [px, py, pw, ph] = PANELS[panel];
    const step = niceStep(scene.n, 6);
    for (let p = 0; p < scene.n; p += step) text(String(p), posX(panel, p), py + ph + 13, { align: "center", size: 10 });
  }
  function profile() {
    const name = "profile", [px, py, pw, ph] = PANELS[name];
    const nr = frame.r1 - frame.r0, w = frame.w, q = frame.q;
    const d = Array.from(w, (v, i) => v - q[i]);
    let lo = 0, hi = 0;
    for (const v of [...w, ...q, ...d]) if (Number.isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    const pad = 0.08 * ((hi - lo) || 1);
    lo -= pad; hi += pad;
    const X = (i) => px + ((i + 0.5) / Math.max(nr, 1)) * pw, Y = (v) => py + ph - ((v - lo) / (hi - lo)) * ph;
    for (const t of linearTicks(lo, hi, 5)) {
      ctx.fillStyle = t === 0 ? "#bbb" : COLORS.grid;
      ctx.fillRect(px, Math.round(Y(t)), pw, 1);
      text(fmt(t), px - 4, Y(t), { align: "right", base: "middle", size: 10 });
    }
    frameBox(name);
    polyline(Array.from(w, (v, i) => [X(i), Y(v)]), COLORS.w, 1.5);
    dots(Array.from(w, (v, i) => [X(i), Y(v)]), COLORS.w, 2);
    dots(Array.from(q, (v, i) => [X(i), Y(v)]), COLORS.q, 2.5);
    polyline(d.map((v, i) => [X(i), Y(v)]), COLORS.err, 1.5);
    const step = niceStep(nr, 6);
    for (let r = Math.ceil(frame.r0 / step) * step; r < frame.r1; r += step) {
      text(String(r), X(r - frame.r0), py + ph + 13, { align: "center", size: 10 });
    }
    text("row", px + pw / 2, py + ph + 28, { align: "center", size: 11 });
    // the title is the legend: "column p = k: w, q, w − q", each name in its line's colour
    const parts = [[`column p = ${frame.k}: `, COLORS.axis], ["w", COLORS.w], [", ", COLORS.axis], ["q", COLORS.q],
                   [", ", COLORS.axis], ["w − q", COLORS.err]];
    ctx.font = "600 13px sans-serif";
    let x = px + pw / 2 - parts.reduce((a, [s]) => a + ctx.measureText(s).width, 0) / 2;
    for (const [s, color] of parts) {
      text(s, x, py - 8, { color, size: 13, bold: true });
      x += ctx.measureText(s).width;
    }
  }
  function diagPlot() {
    const name = "diag", [px, py, pw, ph] = PANELS[name], range = scene.diag_range || [-1, 1];
    ctx.fillStyle = "rgba(17,17,17,0.08)";  // the crop's columns
    const x0 = posX(name, frame.c0 - 0.5), x1 = posX(name, frame.c1 - 0.5);
    ctx.fillRect(x0, py, x1 - x0, ph);
    // GAR: each group's columns stay together; alternate shading shows the groups, labelled with the
    // original group each one is
    (scene.bands || []).forEach(([a, b, g], i) => {
      const xa = posX(name, a - 0.5), xb = posX(name, b - 0.5);
      if (i % 2 === 0) { ctx.fillStyle = "rgba(148,103,189,0.13)"; ctx.fillRect(xa, py, xb - xa, ph); }
      if (xb - xa >= 16) text(`g${g}`, (xa + xb) / 2, py + 11, { align: "center", size: 10, color: COLORS.hinv });
    });
    logAxis(name, range);
    frameBox(name);
    const d = scene.diag_h, d0 = scene.diag_h_orig;
    if (d0) {  // rotation: diag(H) before it, by original input (its outliers are what rotating spreads)
      polyline(Array.from(d0, (v, p) => [posX(name, p), v > 0 ? logY(name, v, range) : NaN]), "#c7c7c7", 1);
      legend([["before rotation", "#c7c7c7"], ["rotated", COLORS.hinv]], px + pw - 110, py + 12);
    }
    polyline(Array.from(d, (v, p) => [posX(name, p), v > 0 ? logY(name, v, range) : NaN]), COLORS.hinv, 1.5);
    if (frame.k < d.length && d[frame.k] > 0) dots([[posX(name, frame.k), logY(name, d[frame.k], range)]], COLORS.cursor, 4.5);
    positionAxis(name);
    text("position p", px + pw / 2, py + ph + 28, { align: "center", size: 11 });
    text(scene.diag_title || "diag(H)", px + pw / 2, py - 8, { color: COLORS.hinv, size: 13, align: "center", bold: true });
  }
  function curvesPlot() {
    const name = "curves", [px, py, pw, ph] = PANELS[name], range = scene.curves_range || [-1, 1];
    logAxis(name, range);
    frameBox(name);
    // RTN dashed: the two curves differ by more than their colour (colour-blind readers, grey print)
    for (const [curve, color, dash] of [[scene.curve_rtn, COLORS.rtn, RTN_DASH], [scene.curve_gptq, COLORS.upd, null]]) {
      const pts = [];
      for (let p = 0; p <= Math.min(frame.k, curve.length - 1); p++) {
        pts.push([posX(name, p), curve[p] > 0 ? logY(name, curve[p], range) : NaN]);
      }
      polyline(pts, color, 2, dash);
    }
    positionAxis(name);
    text("columns quantized", px + pw / 2, py + ph + 28, { align: "center", size: 11 });
    text("output error of the partly quantized layer", px + pw / 2, py - 8, { size: 13, align: "center", bold: true });
    ctx.save();
    ctx.translate(px - 40, py + ph / 2);
    ctx.rotate(-Math.PI / 2);
    text("calibration output MSE", 0, 0, { align: "center", size: 11 });
    ctx.restore();
    legend([["GPTQ", COLORS.upd], ["RTN", COLORS.rtn, RTN_DASH]], px + pw + 8, py + 10);
  }
  function cursorLine(panel, p, color, dashed) {
    const [, py, , ph] = PANELS[panel];
    const x = Math.round(posX(panel, p)) + 0.5;
    polyline([[x, py], [x, py + ph]], color, dashed ? 1.5 : 1, dashed ? [3, 3] : null);
  }

  ctx.clearRect(0, 0, WIDTH, HEIGHT);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, WIDTH, HEIGHT);
  if (!scene.n || frame.k === undefined) return false;
  const names = heatmaps();
  for (const name of names) heatmap(name);
  for (const name of ["W", "error", "compensation"]) colourbar(name);
  profile();
  diagPlot();
  curvesPlot();
  for (const name of names) columnBox(name, frame.k, COLORS.cursor, false);
  cursorLine("diag", frame.k, COLORS.cursor, false);
  if (hover >= 0 && hover < scene.n) {
    for (const name of names) columnBox(name, hover, COLORS.hover, true);
    cursorLine("diag", hover, COLORS.hover, true);
  }
  return true;
}
