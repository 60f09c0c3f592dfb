// The static Layer Lab's page (docs/site.md): controls, the state in the address (#...), the worker that
// computes GPTQ and RTN (gptq_worker.js), and the Layer Lab's own canvas view (layer_canvas.js), fed here
// through a small stand-in for its widget model (get/set/on/off/send, "change:<name>" events and the
// "ahead" frames message, as anywidget and the kernel give it in the app).
//
// Flow: a setting changes -> the GPTQ worker runs GPTQ on the layer, asked at once for the frames of the
// cursor's column and the next AHEAD ones, while the RTN worker (the same code, on the other core) makes
// RTN's Gram matrix D^T D if bits, group size or the grid changed, then RTN's curve and numbers -> once
// the GPTQ loop has passed the cursor's column the worker sends "progress" (diag(H), the curve so far) and
// that column's frame, and once RTN's numbers are here too the scene and the frame go to the canvas, which
// draws while the loop goes on -> the result (codes, the whole curve, the summary) comes and the scene is
// made again. Its scales come from RTN's numbers, so the first frame's are the last one's (sceneOf). Until
// the result came, the page says what is still computing. While playing, the canvas's own clock steps
// through the frames sent ahead, and each step asks for the next.
//
// Testing hook: window.gptqExplorer.{state(), layer(), codes(), summary(), ready(), ranges(), timings(), set()}.

"use strict";

(function () {
  const M = window.GPTQ_SITE_MANIFEST, KNOBS = M.controls.knobs, VIEW = M.controls.view;
  const VIEW_RANGES = M.controls.view_ranges;
  const TEXT = window.gptqSiteText, { g3, labelOf } = TEXT;  // site_text.js
  const QUANT = ["bits", "group_size", "sym", "damp_percent", "desc_act", "static_groups"];
  const KEYS = ["model", "block", "sublayer", ...QUANT, "col", "rows", "cols", "row0", "fps"];
  // the app's link keys this page has no control for: said in the page, not applied
  const APP_ONLY = ["tab", "corpus", "nsamples", "block_size", "mse_norm", "group_aware", "gptaq_alpha",
    "rotation", "rotation_seed", "ternary", "basis", "hessian"];
  const AHEAD = 20;  // frames asked for ahead of the cursor (over a second of animation at 15/s)
  const $ = (id) => document.getElementById(id);
  // open -> first frame drawn, open -> the whole run and RTN's curve drawn; per change: {reason, ms (its
  // first frame drawn), full_ms (the run's result and RTN's curve drawn), result_ms (the result came),
  // first_done (columns the loop had done for the first frame, of n), worker_s (GPTQ in the worker),
  // stages, gram_s (RTN's Gram matrix, if made)}. open: when (ms since the page's start) the layer's data
  // were decoded, the run's progress, its first frames and its result came
  const timings = { open_to_first_frame_ms: null, open_to_complete_ms: null, open: {}, changes: [] };
  const openMark = (name) => { if (timings.open_to_first_frame_ms === null && !(name in timings.open)) timings.open[name] = performance.now(); };

  // ---- state: the app's link keys (docs/app.md, "Links")
  const first = M.layers[0];
  const state = { model: first.model, block: first.block, sublayer: first.sublayer, ...VIEW };
  for (const k of QUANT) state[k] = KNOBS[k].default;
  const entryOf = (s) => M.layers.find((l) => l.model === s.model && l.block === s.block && l.sublayer === s.sublayer);

  const TRUE = ["1", "true", "yes", "on"], FALSE = ["0", "false", "no", "off"];
  function parseValue(key, raw) {  // the value, or throws with what is allowed
    const knob = KNOBS[key], text = String(raw).trim().toLowerCase();
    if (key === "sym" || key === "desc_act" || key === "static_groups") {
      if (TRUE.includes(text)) return true;
      if (FALSE.includes(text)) return false;
      throw new Error(`${key}=${raw} must be true/false`);
    }
    const v = Number(raw);
    if (raw === "" || !Number.isFinite(v)) throw new Error(`${key}=${raw} must be a number`);
    if (knob && knob.offered) {
      if (!knob.offered.includes(v)) throw new Error(`${key} must be one of ${knob.offered.join(", ")}, got ${raw}`);
      return v;
    }
    const [lo, hi] = knob ? knob.range : VIEW_RANGES[key] || [null, null];
    if (key !== "damp_percent" && !Number.isInteger(v)) throw new Error(`${key}=${raw} must be an integer`);
    if (key === "damp_percent" || key === "bits") {  // a value a link may not set is refused
      if (v < lo * (1 - 1e-9) || v > hi * (1 + 1e-9)) throw new Error(`${key} must be between ${lo} and ${+hi.toPrecision(3)}, got ${raw}`);
    }
    return Math.min(Math.max(v, lo ?? v), hi ?? v);  // within float noise of a slider's end: clamped
  }

  // The address's values over `base`; {values, problems}
  function parseHash(hash, base) {
    const values = { ...base }, problems = [];
    for (const [key, raw] of new URLSearchParams(hash.replace(/^#/, ""))) {
      if (key === "model" || key === "sublayer") values[key] = raw;
      else if (key === "block") values.block = Number(raw);
      else if (KEYS.includes(key)) {
        try { values[key] = parseValue(key, raw); } catch (e) { problems.push(e.message); }
      } else if (APP_ONLY.includes(key) || key.startsWith("ml.") || key.startsWith("sw.")) {
        problems.push(`${key}: the app's setting, not in this static page (not applied)`);
      } else problems.push(`unknown key ${key} (not applied)`);
    }
    if (!entryOf(values)) {
      problems.push(`no exported layer ${values.model} block ${values.block} ${values.sublayer}; showing `
        + `${base.model} block ${base.block} ${base.sublayer}`);
      Object.assign(values, { model: base.model, block: base.block, sublayer: base.sublayer });
    }
    return { values, problems };
  }
  const hashOf = (s) => "#" + new URLSearchParams(KEYS.map((k) => [k, String(s[k])])).toString();

  function showMessages(problems, cls = "gptq-note") {
    const box = $("messages");
    box.querySelectorAll("." + cls).forEach((e) => e.remove());
    for (const p of problems) box.appendChild(Object.assign(document.createElement("div"), { className: cls, textContent: p }));
  }

  // ---- the layers: one script per layer, loaded when picked (file:// allows <script>, not fetch())
  const loaded = new Map(), decoded = new Map();  // layer key -> promise of it, and the layer once here
  function bytesFromBase64(text) {
    // the browser's own decoder where it has one (Chromium 140+, Firefox 133+, Safari 18.2+): ~10x faster
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
    const bin = atob(text), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }
  // the manifest's little-endian float32 and float16 (little-endian is every browser's order)
  const f32FromBase64 = (text) => new Float32Array(bytesFromBase64(text).buffer);
  function f16FromBase64(text) {  // each float16 exactly, as float32
    const h = new Uint16Array(bytesFromBase64(text).buffer), out = new Float32Array(h.length);
    for (let i = 0; i < h.length; i++) {
      const x = h[i], sign = x & 0x8000 ? -1 : 1, e = (x >> 10) & 0x1f, m = x & 0x3ff;
      out[i] = e === 0 ? sign * m * 2 ** -24 : e === 31 ? (m ? NaN : sign * Infinity) : sign * (1024 + m) * 2 ** (e - 25);
    }
    return out;
  }
  function loadLayer(entry) {
    if (loaded.has(entry.key)) return loaded.get(entry.key);
    const promise = new Promise((resolve, reject) => {
      const decode = () => {
        const raw = window.GPTQ_SITE_DATA[entry.key];
        delete window.GPTQ_SITE_DATA[entry.key];  // the base64 text is not needed again
        // H's upper triangle, row by row, as stored: the worker unpacks it (fullH() for the testing hook)
        const layer = { W: f32FromBase64(raw.W), Hu: f32FromBase64(raw.H), H: null, d_out: entry.d_out, d_in: entry.d_in,
          Xh: raw.Xh ? f16FromBase64(raw.Xh) : null, tokens: raw.Xh ? entry.X_heldout.shape[0] : 0 };
        decoded.set(entry.key, layer);
        resolve(layer);
      };
      if (window.GPTQ_SITE_DATA && window.GPTQ_SITE_DATA[entry.key]) return decode();
      const script = document.createElement("script");
      script.src = entry.file;
      script.onload = decode;
      script.onerror = () => reject(new Error(`could not load ${entry.file}: is the site folder complete?`));
      document.head.appendChild(script);
    });
    loaded.set(entry.key, promise);
    return promise;
  }
  function fullH(layer) {  // H (d_in x d_in, float32, row-major) from its upper triangle
    if (!layer.H) {
      const n = layer.d_in, H = new Float32Array(n * n), Hu = layer.Hu;
      for (let i = 0, t = 0; i < n; i++) {
        for (let j = i; j < n; j++, t++) { H[i * n + j] = Hu[t]; H[j * n + i] = Hu[t]; }
      }
      layer.H = H;
    }
    return layer.H;
  }

  // ---- the canvas, fed through a stand-in for its widget model
  function widgetModel(attrs, onMessage) {
    const handlers = {};
    const fire = (event, ...args) => (handlers[event] || []).slice().forEach((f) => f(...args));
    return {
      get: (name) => attrs[name],
      set(name, value) { if (attrs[name] !== value) { attrs[name] = value; fire("change:" + name); } },
      save_changes() {},
      on(event, f) { (handlers[event] = handlers[event] || []).push(f); },
      off(event, f) { handlers[event] = (handlers[event] || []).filter((g) => g !== f); },
      send: (msg) => onMessage(msg),
      custom: (msg, buffers) => fire("msg:custom", msg, buffers),  // what the kernel's send() does
    };
  }
  const model = widgetModel({ scene: {}, frame: {}, hover: -1, cursor: 0, playing: false, fps: VIEW.fps },
    (msg) => { if (msg && msg.event === "click" && current) goto(msg.col); });
  const figure = $("figure");
  window.gptqLayerCanvas.render({ model, el: figure });

  // ---- the workers, started from their source (file:// refuses a Worker from a file): GPTQ and frames in
  // one, RTN's Gram matrix in the other
  const workerUrl = URL.createObjectURL(new Blob([window.GPTQ_WORKER_SOURCE], { type: "text/javascript" }));
  const worker = new Worker(workerUrl), rtnWorker = new Worker(workerUrl);
  let runId = 0, current = null, workerLayer = null, gen = 0, gens = 0, seq = 0, gramAsked = null, lastFrame = null;
  let shown = null;  // {gen}: the canvas has the scene, once the run's first frame came
  let inflight = null;  // {id, gen, crop, ks}: the run asked for last, and the frames it was asked to cut
  const requested = new Set(), metas = new Map(), gramSeconds = new Map();
  // frames of the run that came before RTN's numbers (the scene's scales need them); RTN's numbers as sent
  let held = [], rtnCame = null;
  let ready = null;  // {promise, resolve, since, reason, first}: the run being computed or drawn
  let waitSeq = null, doneSeq = null;  // the frame seq that shows the run; the one that shows RTN's curve too

  function pending(reason) {
    if (!ready) {
      let resolve;
      const promise = new Promise((r) => { resolve = r; });
      ready = { promise, resolve, since: performance.now(), reason, first: null, result: null, firstDone: null,
        opening: timings.open_to_first_frame_ms === null };
    }
  }

  async function recompute(reason) {
    pending(reason);
    const id = ++runId, entry = entryOf(state);
    let layer;
    try {
      layer = await loadLayer(entry);
      openMark("data_ms");
    } catch (e) { showMessages([e.message], "gptq-error"); return; }
    if (id !== runId) return;  // a newer change came meanwhile
    if (workerLayer !== entry.key) {
      const msg = { type: "layer", W: layer.W, Hu: layer.Hu, Xh: layer.Xh, tokens: layer.tokens, d_out: layer.d_out,
        d_in: layer.d_in };
      worker.postMessage(msg);
      rtnWorker.postMessage(msg);
      workerLayer = entry.key;
      gramAsked = null;  // the RTN worker drops its Gram matrix with the layer
    }
    const cfg = {};
    for (const k of QUANT) cfg[k] = state[k];
    const gramKey = `${entry.key}/${cfg.bits}/${cfg.group_size}/${cfg.sym}`;  // what RTN's Gram matrix depends on
    // the cursor's frame and those ahead, cut by the worker as soon as its loop has passed them
    const n = entry.d_in, k = Math.max(0, Math.min(n - 1, state.col)), crop = cropOf(), g = ++gens, ahead = [];
    for (let j = k + 1; j <= Math.min(k + AHEAD, n - 1); j++) ahead.push(j);
    inflight = { id, gen: g, crop, ks: [k, ...ahead] };
    worker.postMessage({ type: "run", id, cfg, want: k, frames: [{ gen: g, ks: [k], crop }, { gen: g, ks: ahead, crop }] });
    rtnWanted = { id, key: gramKey, cfg, damp: cfg.damp_percent };  // H may need more damping: useRtn
    askRtn();
    $("layer-description").textContent = `${entry.d_out}×${entry.d_in}. ${entry.description}`;
  }

  worker.onmessage = (e) => {
    const msg = e.data;
    if (msg.type === "error") { if (msg.id === runId) showMessages([`GPTQ failed: ${msg.message}`], "gptq-error"); return; }
    if (msg.type === "progress" && msg.id === runId) {
      openMark("progress_ms");
      startRun(msg);
    } else if (msg.type === "result" && msg.id === runId) {
      openMark("result_ms");
      timings.open.worker_s = timings.open.worker_s ?? msg.seconds;
      timings.open.stages = timings.open.stages ?? msg.stages;
      if (!current || current.id !== msg.id) startRun(msg);
      Object.assign(current, { result: msg, partial: false, done: current.n });
      if (ready && ready.result === null) ready.result = performance.now() - ready.since;
      refresh();
    } else if (msg.type === "frames" && current && msg.id === current.id && msg.gen === gen) {
      openMark("frames_ms");
      onFrames(msg.frames);
    }
  };
  // A run's first message (its progress, or its result if that came first): the canvas gets the new scene
  // with the run's first frame. The frames the run carried requests for are this generation's, unless the
  // crop changed meanwhile.
  function startRun(msg) {
    current = { id: msg.id, result: msg, partial: msg.type === "progress", n: msg.perm.length,
      done: msg.type === "progress" ? msg.done : msg.perm.length, rtn: null,
      damp: msg.type === "progress" ? msg.damp : msg.summary.damp_percent_used,
      cfg: Object.fromEntries(QUANT.map((k) => [k, state[k]])), entry: entryOf(state) };
    const asked = inflight && inflight.id === msg.id && sameCrop(inflight.crop, cropOf()) ? inflight : null;
    newGeneration(asked ? asked.gen : undefined);
    if (asked) asked.ks.forEach((k) => requested.add(k));
    showMessages([], "gptq-error");
    showMessages(msg.warnings, "gptq-warning");
    $("col").max = String(current.n - 1);
    goto(Math.min(state.col, current.n - 1), true);
    showSummary();
    useRtn();
  }
  // RTN's side of the run asked for last: its Gram matrix if the grid changed, then its numbers. One Gram
  // matrix at a time: while one is made, only the latest grid waits its turn (the first frame waits for it)
  let gramBusy = false, rtnWanted = null;
  function askRtn() {
    const w = rtnWanted;
    if (!w || (gramAsked !== w.key && gramBusy)) return;  // asked again when the Gram matrix is made
    if (gramAsked !== w.key) {
      rtnWorker.postMessage({ type: "gram", key: w.key, cfg: w.cfg });
      [gramAsked, gramBusy] = [w.key, true];
    }
    rtnWorker.postMessage({ type: "rtn", id: w.id, key: w.key, desc_act: w.cfg.desc_act, damp: w.damp });
    rtnWanted = null;
  }
  // RTN's numbers, once they and the run are here, made with the damping the run used (H needed more: asked
  // again with it); the frames held for them are drawn
  function useRtn() {
    if (!current || current.rtn || !rtnCame || rtnCame.id !== current.id) return;
    if (rtnCame.damp !== current.damp) {
      rtnWanted = { id: current.id, key: rtnCame.key, cfg: current.cfg, damp: current.damp };
      rtnCame = null;
      return askRtn();
    }
    current.rtn = rtnCame;
    held.splice(0).forEach(onFrames);
    showSummary();
    explain();
  }
  // the run's result came: the scene again and the frame again (a new seq: its draw is seen), the summary
  // and the explanation
  function refresh() {
    if (shown) {
      model.set("scene", sceneOf(current.result));
      seq += 1;
      if (complete()) doneSeq = seq;
      model.set("frame", { ...lastFrame, seq });
    }
    showSummary();
    explain();
  }
  // RTN's held-out error per Gram matrix key (it depends on the grid only), sent after RTN's numbers
  const heldoutRtn = new Map();
  const rtnHeldout = () => (current && current.rtn ? heldoutRtn.get(current.rtn.key) : undefined);
  const hasHeldout = () => !!decoded.get(current.entry.key).Xh;
  const complete = () => current && !current.partial && current.rtn && (!hasHeldout() || rtnHeldout() !== undefined);
  rtnWorker.onmessage = (e) => {
    const msg = e.data;
    if (msg.type === "error") {  // the next change asks for the Gram matrix again
      [gramAsked, gramBusy] = [null, false];
      showMessages([`RTN failed: ${msg.message}`], "gptq-error");
    } else if (msg.type === "gram") { gramSeconds.set(msg.key, msg.seconds); gramBusy = false; askRtn(); }
    else if (msg.type === "rtn" && msg.id === runId) { rtnCame = msg; useRtn(); }
    else if (msg.type === "rtn-heldout") {  // new for its grid: the run waiting for it is complete now
      const known = heldoutRtn.has(msg.key);
      heldoutRtn.set(msg.key, msg.heldout_mse_rtn);
      if (!known && current && current.rtn && current.rtn.key === msg.key) refresh();
    }
  };

  function newGeneration(g = ++gens) {  // a new run or crop: frames sent before are void
    gen = g;
    requested.clear();
    metas.clear();
    held = [];
    shown = null;
    waitSeq = Infinity;  // nothing drawn counts until this generation's first frame is given to the canvas
    doneSeq = null;
  }

  function sceneOf(r) {
    const logRange = (values) => {
      let lo = Infinity, hi = -Infinity;
      for (const v of values) if (Number.isFinite(v) && v > 0) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      if (lo === Infinity) { lo = 1e-6; hi = 1; }
      return [Math.log10(lo * 0.8), Math.log10(hi * 1.25)];
    };
    // The scales are made from what is known before GPTQ's run ends, so that its first frame (drawn while
    // the run goes on) and its last have the same: the error's colour range is RTN's error's (the same
    // grid); the curves' axis spans RTN's curve and GPTQ's so far (a running sum: its smallest positive
    // value is its first) up to RTN's end x 1.25, unless GPTQ's end passes that (then GPTQ's end, or while
    // the run goes on its value so far extrapolated to n columns, x 1.25: the one case of a rescale)
    const g = r.curve_gptq, n = g.length, rt = current.rtn.curve_rtn, done = current.done;
    const top = Math.max(rt[n - 1], 1e-30) * 1.25, reached = g[done - 1];
    const end = reached <= top ? top : 1.25 * (current.partial ? (reached * n) / done : reached);
    const cfg = current.cfg, label = labelOf(cfg);
    return {
      n, d_out: current.entry.d_out, diag_h: Float32Array.from(r.diag_h), curve_gptq: Float32Array.from(g),
      curve_rtn: Float32Array.from(rt), wmax: r.wmax, emax: current.rtn.emax, diag_range: logRange(r.diag_h),
      curves_range: [logRange([...g, ...rt])[0], Math.log10(end)],
      gen, label, diag_title: `diag(H), ${cfg.desc_act ? "desc_act order: decreasing diag(H)" : "column order"}`,
      basis: "", titles: {}, bands: [],
    };
  }

  const cropOf = () => ({ rows: state.rows, cols: state.cols, row0: state.row0 });
  const sameCrop = (a, b) => a.rows === b.rows && a.cols === b.cols && a.row0 === b.row0;
  function askFrames(k) {
    if (!current) return;
    const ks = [];
    for (let j = k; j <= Math.min(k + AHEAD, current.n - 1); j++) if (!requested.has(j)) { requested.add(j); ks.push(j); }
    const crop = cropOf();
    // a generation's first frame alone, so that it is drawn before the ones ahead are cut
    const batches = requested.size === ks.length && ks.length > 1 ? [ks.slice(0, 1), ks.slice(1)] : [ks];
    for (const b of batches) if (b.length) worker.postMessage({ type: "frames", id: current.id, gen, ks: b, crop });
  }

  const NAMES = ["W", "updated", "Q", "error", "compensation"];
  function onFrames(frames) {
    if (!current.rtn) { held.push(frames); return; }
    const canvasFrame = (f) => ({ gen, k: f.meta.k, r0: f.meta.r0, r1: f.meta.r1, c0: f.meta.c0, c1: f.meta.c1 });
    for (const f of frames) metas.set(f.meta.k, f.meta);
    if (!shown) {  // the run's (or crop's) first frame: the scene, then that frame, as the kernel sends them
      shown = { gen };
      model.set("scene", sceneOf(current.result));
      const f = frames[0];
      seq += 1;
      waitSeq = seq;
      doneSeq = complete() ? seq : null;
      if (ready && ready.firstDone === null) ready.firstDone = current.done;
      lastFrame = { ...canvasFrame(f), z: f.z, w: f.w, q: f.q };
      model.set("frame", { seq, ...lastFrame });
    }
    const buffers = [];
    for (const f of frames) buffers.push(...NAMES.map((name) => f.z[name]), f.w, f.q);
    model.custom({ event: "ahead", gen, names: NAMES, frames: frames.map(canvasFrame) }, buffers);
    explain();
  }

  // the canvas drew: data-drawn is the seq of the frame trait it drew (layer_canvas.js, publish())
  // (ready() resolves once RTN's curve is drawn too)
  new MutationObserver(() => {
    const drawn = Number(figure.getAttribute("data-drawn"));
    if (!ready || waitSeq === null || drawn < waitSeq || !current || current.id !== runId) return;
    const now = performance.now(), opening = ready.opening;
    if (ready.first === null) {
      ready.first = now - ready.since;
      if (opening) timings.open_to_first_frame_ms = now;
    }
    if (doneSeq === null || drawn < doneSeq) return;
    if (opening) Object.assign(timings, { open_to_complete_ms: now, open_first_done: ready.firstDone, open_n: current.n });
    else {
      timings.changes.push({ reason: ready.reason, ms: ready.first, full_ms: now - ready.since, result_ms: ready.result,
        first_done: ready.firstDone, n: current.n,
        layer: current.entry.key, d_out: current.entry.d_out, d_in: current.entry.d_in,
        worker_s: current.result.seconds, stages: current.result.stages, gram_s: gramSeconds.get(gramAsked) ?? null });
    }
    gramSeconds.clear();
    const r = ready;
    ready = null;
    r.resolve();
  }).observe(figure, { attributes: true, attributeFilter: ["data-drawn"] });

  // ---- the cursor (the canvas's clock moves it while playing; the controls move it otherwise)
  function goto(k, force = false) {
    if (!current) return;
    k = Math.max(0, Math.min(current.n - 1, Math.round(k)));
    if (k === model.get("cursor") && !force) return;
    if (k === model.get("cursor")) onCursor();
    else model.set("cursor", k);
  }
  function onCursor() {
    const k = model.get("cursor");
    state.col = k;
    $("col").value = String(k);
    $("col_out").textContent = current ? `${k + 1} / ${current.n}` : "";
    askFrames(k);
    explain();
    writeHash();
  }
  model.on("change:cursor", onCursor);
  model.on("change:playing", () => { $("play").textContent = model.get("playing") ? "❚❚ pause" : "▶ play"; });

  // ---- the text beside the figure: site_text.js (layer_text.explain_html and summary_html, same wording)
  function explain() {
    const m = current && metas.get(model.get("cursor"));
    if (!m) return;
    $("explain").innerHTML = TEXT.explainHtml(m, current.cfg, current.n, current.rtn ? current.rtn.running_rtn[m.k] : undefined);
  }
  function showSummary() {
    $("summary").innerHTML = summaryHtml();
    $("run-status").textContent = [current.partial ? `Computing GPTQ in this browser: the frame shown needed the `
      + `first ${current.done} of ${current.n} columns; its summary comes when all columns are done.` : "",
    current.rtn ? "" : "Computing RTN's curve: the figure's scales are made from it."].join(" ").trim();
  }
  function summaryHtml() {
    const s = { ...(current.partial ? {} : current.result.summary), ...(current.rtn || {}), heldout_mse_rtn: rtnHeldout() };
    return TEXT.summaryHtml(s, { cfg: current.cfg, entry: current.entry, heldout: hasHeldout(), complete: !!complete(),
      partial: current.partial, seconds: current.partial ? undefined : current.result.seconds });
  }

  // ---- controls
  function fillSelect(el, options) {
    el.replaceChildren(...options.map(([value, label]) => new Option(label, String(value))));
  }
  fillSelect($("layer"), M.layers.map((l, i) => [i, `block ${l.block} ${l.sublayer} (${l.d_out}×${l.d_in})`]));
  const [bitsLo, bitsHi] = KNOBS.bits.range;
  fillSelect($("bits"), Array.from({ length: bitsHi - bitsLo + 1 }, (_, i) => [bitsLo + i, String(bitsLo + i)]));
  fillSelect($("group_size"), KNOBS.group_size.offered.map((v) => [v, KNOBS.group_size.labels[String(v)] || String(v)]));
  const damp = $("damp_percent"), [dampLo, dampHi] = KNOBS.damp_percent.range;
  damp.min = String(Math.log10(dampLo));
  damp.max = String(Math.log10(dampHi));

  function showState() {
    $("layer").value = String(M.layers.indexOf(entryOf(state)));
    for (const k of ["bits", "group_size"]) $(k).value = String(state[k]);
    for (const k of ["sym", "desc_act", "static_groups"]) $(k).checked = state[k];
    damp.value = String(Math.log10(state.damp_percent));
    $("damp_out").textContent = `${g3(100 * state.damp_percent)}%`;
    for (const k of ["fps", "rows", "cols", "row0"]) $(k).value = String(state[k]);
  }

  let hashTimer = null, writingHash = false;
  function writeHash() {
    clearTimeout(hashTimer);
    hashTimer = setTimeout(() => {
      const h = hashOf(state);
      if (location.hash !== h) { writingHash = true; history.replaceState(null, "", h); writingHash = false; }
    }, 150);
  }

  // apply new values (from a control, the address or the testing hook): recompute what they change
  function apply(values, reason) {
    const layerChanged = ["model", "block", "sublayer"].some((k) => values[k] !== undefined && values[k] !== state[k]);
    const quantChanged = QUANT.some((k) => values[k] !== undefined && values[k] !== state[k]);
    const cropChanged = ["rows", "cols", "row0"].some((k) => values[k] !== undefined && values[k] !== state[k]);
    Object.assign(state, values);
    model.set("fps", state.fps);
    showState();
    writeHash();
    if (layerChanged || quantChanged || !current) return recompute(reason);
    if (cropChanged) {
      pending(reason);
      newGeneration();
      askFrames(model.get("cursor"));
    }
    if (values.col !== undefined) goto(values.col);
    return Promise.resolve();
  }

  $("layer").addEventListener("change", (e) => {
    const l = M.layers[Number(e.target.value)];
    apply({ model: l.model, block: l.block, sublayer: l.sublayer, col: 0 }, "layer");
  });
  for (const k of ["bits", "group_size"]) $(k).addEventListener("change", (e) => apply({ [k]: Number(e.target.value) }, k));
  for (const k of ["sym", "desc_act", "static_groups"]) $(k).addEventListener("change", (e) => apply({ [k]: e.target.checked }, k));
  damp.addEventListener("input", () => { $("damp_out").textContent = `${g3(100 * 10 ** Number(damp.value))}%`; });
  damp.addEventListener("change", () => apply({ damp_percent: Number((10 ** Number(damp.value)).toPrecision(6)) }, "damp_percent"));
  for (const k of ["fps", "rows", "cols", "row0"]) {
    $(k).addEventListener("change", (e) => {
      try { apply({ [k]: parseValue(k, e.target.value) }, k); } catch (err) { showMessages([err.message]); showState(); }
    });
  }
  const pause = () => model.set("playing", false);
  $("play").addEventListener("click", () => {
    if (!current) return;
    if (model.get("playing")) return pause();
    if (model.get("cursor") >= current.n - 1) goto(0);
    model.set("playing", true);
  });
  $("back").addEventListener("click", () => { pause(); goto(model.get("cursor") - 1); });
  $("forward").addEventListener("click", () => { pause(); goto(model.get("cursor") + 1); });
  $("col").addEventListener("input", (e) => { pause(); goto(Number(e.target.value)); });
  // Copy link: the address with the state as it is now (not waiting for writeHash); where the clipboard
  // may not be written (an old browser, a page the browser does not trust with it), the link is shown in a
  // text field, selected, to copy by hand
  let copiedTimer = null;
  $("copy-link").addEventListener("click", async () => {
    const url = location.href.split("#")[0] + hashOf(state), field = $("link-text"), status = $("copy-status");
    clearTimeout(copiedTimer);
    try {
      if (!navigator.clipboard || !navigator.clipboard.writeText) throw new Error("no clipboard here");
      await navigator.clipboard.writeText(url);
      field.hidden = true;
      status.textContent = "Link copied.";
      copiedTimer = setTimeout(() => { status.textContent = ""; }, 5000);
    } catch (e) {
      field.value = url;
      field.hidden = false;
      field.focus(); field.select();
      status.textContent = "The browser did not let the page copy: the link is selected above, copy it (Ctrl+C, ⌘C on a Mac).";
    }
  });

  window.addEventListener("hashchange", () => {
    if (writingHash) return;
    const { values, problems } = parseHash(location.hash, state);
    showMessages(problems);
    apply(values, "address");
  });

  // ---- start: the address's state over the defaults
  const start = parseHash(location.hash, state);
  showMessages(start.problems);
  Object.assign(state, start.values);
  model.set("fps", state.fps);
  model.set("cursor", state.col);
  showState();
  recompute("open");

  window.gptqExplorer = {
    state: () => ({ ...state }),
    // the layer actually used: W (d_out, d_in) and H (d_in, d_in), float32, row-major
    layer: () => {
      const l = current ? decoded.get(current.entry.key) : null;
      return l ? { W: l.W, H: fullH(l), Xh: l.Xh, tokens: l.tokens, d_out: l.d_out, d_in: l.d_in } : null;
    },
    // (d_out, d_in) row-major, original column order; null while the run is still going on
    codes: () => (current && !current.partial ? current.result.codes : null),
    summary: () => {  // GPTQ's numbers once its run is done, and RTN's once they came
      if (!current || current.partial) return null;
      const rtn = current.rtn ? Object.fromEntries(["weight_mse_rtn", "calib_mse_rtn", "loss_rtn"].map((k) => [k, current.rtn[k]])) : {};
      if (rtnHeldout() !== undefined) rtn.heldout_mse_rtn = rtnHeldout();
      return { ...current.result.summary, ...rtn, seconds: current.result.seconds };
    },
    ready: () => (ready ? ready.promise : Promise.resolve()),
    // the scales of the scene the canvas has: the heatmaps' colour ranges (wmax, emax) and the log10 ranges
    // of the diag(H) and curves' axes
    ranges: () => (({ wmax, emax, diag_range, curves_range }) => ({ wmax, emax, diag_range, curves_range }))(model.get("scene")),
    timings: () => JSON.parse(JSON.stringify(timings)),
    set: (values) => { apply(values, Object.keys(values).join(",")); return window.gptqExplorer.ready(); },
  };
})();
