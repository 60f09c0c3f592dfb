// The Layer Lab's figure, drawn on one <canvas> (the ESM of layer_figure.LayerCanvas, an anywidget).
//
// Why a canvas and not plotly: plotly.js re-lays-out its whole 8-panel figure on every call (240-400 ms
// per frame in headless Chromium here, whatever changed), so an animation could show ~3 frames/s. Drawing
// five 24 x 32 heatmaps and three line plots on a canvas takes a few milliseconds.
//
// Model state (set by Python, see layer_figure.py):
//   scene  {gen, n, d_out, diag_h, curve_gptq, curve_rtn (float32 bytes), wmax, emax, diag_title, ranges,
//          what a method adds: titles {heatmap: title}, basis ("rotated" | "original" | ""), diag_h_orig
//          (diag(H) before the rotation), bands [[start, end, group]] (GAR's groups on the diag(H) strip)}
//   frame  {seq, gen, k, r0, r1, c0, c1, z: {W, updated, Q, error, compensation[, correction]} (float32),
//          w, q}: with GPTAQ's `correction` the compensation panel splits into the OBS update and it
//   hover  the highlighted position, -1 for none (also set here when the mouse moves over a column)
//   cursor, playing  jslinked to the Play control's value and playing; fps
// The animation clock runs here: while playing, a requestAnimationFrame advances `cursor` by one column
// when the clock says so (it waits for the kernel rather than skip a frame it does not have),
// drawing frames the kernel sent ahead ({event: "ahead", gen, names, frames: [meta]} + one buffer per name
// and two (w, q) per frame) and
// the slider follows through jslink. Frames of an older `gen` (another run or crop) are dropped.
// Messages to Python: {event: "click", col}, {event: "drawn", seq} (at most every 250 ms, and the last).
// For tests and the page probe: the element gets data-drawn, and el.gptqState holds what is drawn.

const WIDTH = 860, HEIGHT = 860;
const HEATMAPS = ["W", "updated", "Q", "error", "compensation"];
const TITLES = {
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

const f32 = (v) => {
  if (!v) return new Float32Array(0);
  if (v instanceof Float32Array) return v;
  if (v.buffer) return new Float32Array(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  return Float32Array.from(v);
};
const SUP = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };
const pow10 = (e) => "10" + String(e).split("").map((c) => SUP[c]).join("");
const fmt = (v) => (v === null || !Number.isFinite(v)) ? "–" : Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3)
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

// The animation clock, one requestAnimationFrame tick of it: `clock` {t0, k0, at} says the cursor was k0
// at time t0 (ms) and the clock last set it to `at`; null, or a cursor moved by something else (the
// slider, a step button), starts it at `cur`. Returns the clock and whether to step to cur + 1 now: one
// column per tick at most, never skipping one, and only when that column's frame is here (haveNext).
// A step made late (the kernel had not sent its frame yet, or the page was busy) keeps the schedule when
// it is at most CATCH_UP_MS late: the next steps come at the display's rate until the clock has caught
// up, so the rate over a play is the setting. Later than that, the clock restarts at that step, so the
// view never rushes through more than a few columns to make up a long wait.
export const CATCH_UP_MS = 250;
// Longest a playing view keeps its picture waiting for the cursor's frame of a new run (see draw()).
export const HOLD_MS = 1000;
export function clockStep(clock, now, cur, fps, haveNext) {
  if (!clock || cur !== clock.at) clock = { t0: now, k0: cur, at: cur };
  const rate = Math.max(1, fps) / 1000;  // columns per ms
  const due = clock.k0 + Math.floor((now - clock.t0) * rate);
  if (due <= cur || !haveNext) return { clock, step: false };
  const next = cur + 1;
  const late = now - (clock.t0 + (next - clock.k0) / rate);
  clock = late > CATCH_UP_MS ? { t0: now, k0: next, at: next } : { ...clock, at: next };
  return { clock, step: true };
}

export default {
  render({ model, el }) {
    el.style.position = "relative";
    // The figure follows its box's width (up to WIDTH px; presenter mode's CSS lifts that limit): it is
    // drawn in WIDTH x HEIGHT units, scaled to the canvas's CSS size (fit(), on a ResizeObserver)
    el.style.width = "100%";
    el.style.maxWidth = WIDTH + "px";
    const canvas = document.createElement("canvas");
    canvas.style.cssText = "display:block;width:100%;height:auto;aspect-ratio:" + WIDTH + " / " + HEIGHT;
    canvas.style.cursor = "crosshair";
    canvas.setAttribute("role", "img");
    const tip = document.createElement("div");
    tip.style.cssText = "position:absolute;pointer-events:none;display:none;background:rgba(255,255,255,0.95);"
      + "border:1px solid #999;border-radius:3px;padding:2px 6px;font:12px sans-serif;white-space:nowrap;z-index:5";
    el.appendChild(canvas);
    el.appendChild(tip);
    const ctx = canvas.getContext("2d");
    function fit() {
      const w = canvas.getBoundingClientRect().width;
      if (!(w > 0)) return false;  // hidden (another tab): keep the last size
      const dpr = window.devicePixelRatio || 1, px = Math.max(1, Math.round(w * dpr));
      if (canvas.width === px) return false;
      canvas.width = px;
      canvas.height = Math.round(px * HEIGHT / WIDTH);
      ctx.setTransform(px / WIDTH, 0, 0, px / WIDTH, 0, 0);
      return true;
    }
    canvas.width = WIDTH;  // until fit() knows the page's size
    canvas.height = HEIGHT;

    let scene = null, frame = null, hover = -1, pending = false;
    let lastAck = 0, ackTimer = null;
    const cache = new Map();  // column -> frame, this generation only
    let cacheGen = null, sceneRaw = null;

    function decodeFrame(f) {
      const z = {};
      for (const name of Object.keys(f.z || {})) z[name] = f32(f.z[name]);
      for (const name of HEATMAPS) if (!z[name]) z[name] = f32(null);
      return withObs({ ...f, z, w: f32(f.w), q: f32(f.q) });
    }
    function withObs(f) {  // GPTAQ: the OBS part of the update, the total minus the correction
      if (f.z.correction && f.z.correction.length) f.z.obs = f.z.compensation.map((v, i) => v - f.z.correction[i]);
      return f;
    }
    const heatmaps = () => (frame.z.obs ? SPLIT : HEATMAPS);
    const original = () => scene.basis === "original";
    function keep(f) {
      if (f.gen !== cacheGen || f.k === undefined) return;
      cache.set(f.k, f);
      if (cache.size > 400) {  // drop the frames furthest behind the cursor
        const cur = model.get("cursor");
        for (const key of [...cache.keys()].sort((a, b) => Math.abs(b - cur) - Math.abs(a - cur)).slice(0, 100)) {
          cache.delete(key);
        }
      }
    }
    function read() {
      const s = model.get("scene") || {};
      if (s !== sceneRaw) {
        sceneRaw = s;
        scene = { ...s, diag_h: f32(s.diag_h), curve_gptq: f32(s.curve_gptq), curve_rtn: f32(s.curve_rtn),
                  diag_h_orig: s.diag_h_orig ? f32(s.diag_h_orig) : null };
      }
      if (scene.gen !== cacheGen) { cache.clear(); cacheGen = scene.gen; }
      const traitFrame = model.get("frame") || {};
      if (!cache.has(traitFrame.k) || cache.get(traitFrame.k).raw !== traitFrame) {
        keep({ ...decodeFrame(traitFrame), raw: traitFrame });
      }
      // the cursor's frame if at hand, else the kernel's latest
      const cur = model.get("cursor");
      frame = cache.get(cur) || cache.get(traitFrame.k) || decodeFrame(traitFrame);
      hover = model.get("hover");
    }

    // ---- coordinate helpers
    const heatCell = (name, x, y) => {
      const [px, py, pw, ph] = PANELS[name];
      const nc = frame.c1 - frame.c0, nr = frame.r1 - frame.r0;
      if (x < px || x >= px + pw || y < py || y >= py + ph || nc <= 0 || nr <= 0) return null;
      const c = Math.floor(((x - px) / pw) * nc), r = Math.floor(((y - py) / ph) * nr);
      return { row: frame.r0 + r, col: frame.c0 + c, value: frame.z[name][r * nc + c] };
    };
    const posX = (panel, p) => {  // position p (0..n-1) to x in a full-width panel
      const [px, , pw] = PANELS[panel];
      return px + ((p + 0.5) / Math.max(scene.n, 1)) * pw;
    };
    const xPos = (panel, x) => {
      const [px, , pw] = PANELS[panel];
      return Math.max(0, Math.min(scene.n - 1, Math.floor(((x - px) / pw) * scene.n)));
    };
    const logY = (panel, v, range) => {
      const [, py, , ph] = PANELS[panel];
      const t = (Math.log10(v) - range[0]) / (range[1] - range[0]);
      return py + ph - Math.max(-0.02, Math.min(1.02, t)) * ph;
    };
    const inside = (panel, x, y) => {
      const [px, py, pw, ph] = PANELS[panel];
      return x >= px && x < px + pw && y >= py && y < py + ph;
    };

    // ---- drawing
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

    let drawn = null;  // what is on the canvas: the frame, scene and highlight objects
    let holdSince = null;
    function draw() {
      pending = false;
      read();
      if (drawn && drawn[0] === frame && drawn[1] === scene && drawn[2] === hover) return;
      // Playing, and a new run's (or crop's) first frame is behind the cursor: the kernel rendered it at
      // its own column, which lags the view's by a round trip (more while it computed the run). Keep the
      // picture until the cursor's frame comes (the kernel sends it on the cursor's next update; 1 s at
      // most) rather than step back.
      const cur = model.get("cursor");
      if (drawn && model.get("playing") && frame.k < cur && !cache.has(cur)) {
        holdSince = holdSince ?? performance.now();
        if (performance.now() - holdSince < HOLD_MS) { setTimeout(schedule, 50); return; }
      }
      holdSince = null;
      drawn = [frame, scene, hover];
      ctx.clearRect(0, 0, WIDTH, HEIGHT);
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, WIDTH, HEIGHT);
      if (!scene.n || frame.k === undefined) return;
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
      publish();
    }

    function publish() {
      // answers carry the kernel's latest frame seq (received, whichever frame is on screen)
      const seq = (model.get("frame") || {}).seq;
      const k = frame.k, nc = frame.c1 - frame.c0;
      const upto = (c) => Array.from(c, (v, p) => (p <= k ? v : NaN));
      const rows = (z) => Array.from({ length: frame.r1 - frame.r0 }, (_, r) => Array.from(z.subarray(r * nc, (r + 1) * nc)));
      el.gptqState = {
        drawn: true, seq, n: scene.n, k, window: [frame.r0, frame.r1, frame.c0, frame.c1],
        diag_h: Array.from(scene.diag_h), marker_x: [k], gptq_y: upto(scene.curve_gptq), rtn_y: upto(scene.curve_rtn),
        error_z: rows(frame.z.error), error_cmax: scene.emax, curves_top: (scene.curves_range || [0, 0])[1],
        cursor_path: `column ${k} of crop ${frame.c0}-${frame.c1}`, diag_title: scene.diag_title, hover,
        drawn_at: Date.now(),  // epoch ms: when this picture reached the canvas (timings)
        // what the method adds: the panels drawn, the config's label, the basis, GAR's groups on diag(H)
        panels: heatmaps(), label: scene.label || "", basis: scene.basis || "", bands: (scene.bands || []).length,
        correction_max: frame.z.obs ? Math.max(0, ...Array.from(frame.z.correction, (v) => (Number.isFinite(v) ? Math.abs(v) : 0))) : null,
      };
      el.setAttribute("data-drawn", String(seq));
      canvas.setAttribute("aria-label", `GPTQ step ${k + 1} of ${scene.n}: heatmaps of rows ${frame.r0}-${frame.r1 - 1}, `
        + `positions ${frame.c0}-${frame.c1 - 1}; ${scene.diag_title}; running output error, GPTQ vs RTN`);
      const now = Date.now();
      if (ackTimer) { clearTimeout(ackTimer); ackTimer = null; }
      const ack = () => { lastAck = Date.now(); model.send({ event: "drawn", seq }); };
      if (now - lastAck > 250) ack(); else ackTimer = setTimeout(ack, 250 - (now - lastAck));
    }

    // requestAnimationFrame does not run in a hidden tab: draw (and answer) on a timer there, or the
    // kernel's watchdog would take the silence for a frozen view
    const schedule = () => {
      if (!pending) { pending = true; if (document.hidden) setTimeout(draw, 0); else requestAnimationFrame(draw); }
    };

    // ---- the mouse: tooltip, the linked highlight, click to jump
    function locate(x, y) {
      for (const name of heatmaps()) {
        const cell = heatCell(name, x, y);
        const title = (scene.titles || {})[name] || TITLES[name][0];
        // in the original basis a column is an input, not a step: nothing to highlight or jump to
        if (cell && original()) return { col: -1, label: `row ${cell.row}, input ${cell.col}<br>${title}: ${fmt(cell.value)}` };
        if (cell) return { col: cell.col, label: `row ${cell.row}, position ${cell.col}<br>${title}: ${fmt(cell.value)}` };
      }
      if (inside("diag", x, y)) {
        const p = xPos("diag", x);
        return { col: p, label: `position ${p}: diag(H) = ${fmt(scene.diag_h[p])}` };
      }
      if (inside("curves", x, y)) {
        const p = xPos("curves", x);
        const label = p <= frame.k ? `after ${p}: GPTQ ${fmt(scene.curve_gptq[p])}, RTN ${fmt(scene.curve_rtn[p])}`
          : `position ${p}: not quantized yet`;
        return { col: p, label };
      }
      return null;
    }
    const mouse = (e) => {  // in drawing units
      const r = canvas.getBoundingClientRect(), f = WIDTH / (r.width || WIDTH);
      return [(e.clientX - r.left) * f, (e.clientY - r.top) * f];
    };
    canvas.addEventListener("mousemove", (e) => {
      if (!scene || !scene.n) return;
      const [x, y] = mouse(e), hit = locate(x, y);
      if (!hit) { tip.style.display = "none"; return; }
      tip.innerHTML = hit.label;
      tip.style.display = "block";
      const r = canvas.getBoundingClientRect(), cx = e.clientX - r.left;  // the tip is placed in CSS px
      tip.style.left = Math.max(0, Math.min(cx + 14, r.width - 220)) + "px";
      tip.style.top = (e.clientY - r.top + 14) + "px";
      if (hit.col !== model.get("hover")) {
        model.set("hover", hit.col);
        model.save_changes();
      }
    });
    canvas.addEventListener("mouseleave", () => {
      tip.style.display = "none";
      if (model.get("hover") !== -1) {
        model.set("hover", -1);
        model.save_changes();
      }
    });
    canvas.addEventListener("click", (e) => {
      if (!scene || !scene.n) return;
      const [x, y] = mouse(e), hit = locate(x, y);
      if (hit && hit.col >= 0) model.send({ event: "click", col: hit.col });
    });

    // ---- the clock
    let clock = null;  // {t0, k0, at}: the cursor was k0 at time t0; the clock last set it to `at`
    function tick(now) {
      if (!model.get("playing")) { clock = null; return; }
      requestAnimationFrame(tick);
      if (!scene || !scene.n) return;
      const cur = model.get("cursor");
      // the cursor's own frame first (the Play steps once by itself when pressed, before the kernel has
      // sent that frame): show it, and count the next step's time from now
      if (!(drawn && drawn[0].k === cur)) {
        if (cache.has(cur)) draw();
        clock = { t0: now, k0: cur, at: cur };
        return;
      }
      const next = Math.min(cur + 1, scene.n - 1);
      let step;
      ({ clock, step } = clockStep(clock, now, cur, model.get("fps"), cache.has(next)));
      if (!step) return;
      model.set("cursor", next);
      draw();  // in this animation frame, not the next (the change also queued a draw: it finds nothing new)
      if (next >= scene.n - 1) model.set("playing", false);
      model.save_changes();
    }
    const onPlaying = () => { if (model.get("playing")) { clock = null; requestAnimationFrame(tick); } };
    const onFps = () => { clock = null; };  // a new speed counts from the column shown, not from Play
    const onCustom = (msg, buffers) => {
      if (!msg || msg.event !== "ahead") return;
      // a new run's scene can come just before its frames, before any draw has read it: read it now, or
      // these frames (the next ones of the new run) would be dropped and a playing view would wait forever
      read();
      if (msg.gen !== cacheGen) return;
      const names = msg.names || HEATMAPS, per = names.length + 2;
      msg.frames.forEach((meta, i) => {
        const b = buffers.slice(per * i, per * (i + 1));
        const z = {};
        names.forEach((name, j) => { z[name] = f32(b[j]); });
        keep(withObs({ ...meta, z, w: f32(b[per - 2]), q: f32(b[per - 1]) }));
      });
      schedule();  // the cursor's own frame may be among them
    };
    model.on("change:playing", onPlaying);
    model.on("change:fps", onFps);
    model.on("change:cursor", schedule);
    model.on("msg:custom", onCustom);
    if (model.get("playing")) onPlaying();

    const onVisibility = () => { if (document.hidden && pending) draw(); };  // a frame waiting on rAF
    document.addEventListener("visibilitychange", onVisibility);
    model.on("change:frame", schedule);
    model.on("change:scene", schedule);
    model.on("change:hover", schedule);
    // a new size clears the canvas: redraw what was there at once (not on the next frame: no blank flash)
    const resized = () => { if (fit() && drawn) { drawn = null; draw(); } };
    const observer = typeof ResizeObserver === "undefined" ? null : new ResizeObserver(resized);
    if (observer) observer.observe(canvas);
    fit();
    draw();
    return () => {
      if (observer) observer.disconnect();
      if (ackTimer) clearTimeout(ackTimer);
      document.removeEventListener("visibilitychange", onVisibility);
      model.off("change:frame", schedule);
      model.off("change:playing", onPlaying);
      model.off("change:fps", onFps);
      model.off("change:cursor", schedule);
      model.off("msg:custom", onCustom);
      model.off("change:scene", schedule);
      model.off("change:hover", schedule);
    };
  },
};
