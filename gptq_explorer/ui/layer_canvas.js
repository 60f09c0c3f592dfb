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
//
// This file is the view: the widget's state, the frames at hand, the clock, the mouse and what it tells the
// page; the picture itself (layout, colours, drawing) is layer_canvas_paint.js. Both are one module where
// they run: the app's loader (layer_figure.py) and the static site's (services/site_export.py) put the
// imported file in place of the import, its exports as local names.

import {
  WIDTH, HEIGHT, HEATMAPS, TITLES, f32, heatmapsOf, isOriginal, cellAt, positionAt, inside, fmt, paint,
} from "./layer_canvas_paint.js";

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

    // ---- what is under the mouse (coordinate helpers of layer_canvas_paint.js, on the current frame)
    const heatmaps = () => heatmapsOf(frame), original = () => isOriginal(scene);
    const heatCell = (name, x, y) => cellAt(frame, name, x, y);
    const xPos = (panel, x) => positionAt(scene, panel, x);

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
      if (paint(ctx, scene, frame, hover)) publish();
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
