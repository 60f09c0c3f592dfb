// The Layer Lab in a room: keys, presenter mode, Save picture, reduced motion, and the page's small
// accessibility fixes (the ESM of layer_room.LabRoom, an anywidget shown in the lab's header).
//
// Model state: playing, cursor, last  jslinked to the Play control's playing, value and max (so a key
//                                      moves the animation in the page, no round trip to the kernel)
//              presenter, controls_hidden, reduced_motion (set here from the browser's preference)
//              picture_name            the saved picture's name, without the column (set by Python)
// Messages to Python: {event: "key", action: "group" | "block"} (the next boundary is the kernel's to find).
//
// Keys act on the lab that holds the focus, or on the first visible lab when nothing has it; never while
// typing in a text box or a menu, and never on a key the focused control handles itself (a slider's
// arrows, a button's Space).

export const KEYS = {
  " ": "play/pause", ArrowLeft: "step −1", ArrowRight: "step +1", Home: "first column",
  End: "last column", n: "next group", b: "next block", p: "presenter mode",
};
const TYPING = "input, textarea, select, [contenteditable=''], [contenteditable='true'], [role=slider], "
  + "[role=textbox], [role=combobox], [role=spinbutton], [role=listbox], [role=tablist]";
const NATIVE_SPACE = "button, a, summary, [role=button], [role=checkbox], [role=switch], [role=tab]";
const PLAY_ICONS = { "fa-play": "play", "fa-pause": "pause", "fa-stop": "stop", "fa-retweet": "repeat",
                     "fa-repeat": "repeat" };

const CSS = `
.gptq-room { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; }
.gptq-room button { white-space: nowrap; width: auto; padding: 0 12px; }
.gptq-room button[aria-pressed="true"] { background: var(--jp-layout-color3, #bdbdbd); }
.gptq-layer-lab.gptq-presenter .gptq-lab-panel,
.gptq-layer-lab.gptq-controls-hidden .gptq-lab-panel { display: none !important; }
/* presenter mode: bigger type, the figure as large as the screen's height allows */
.gptq-layer-lab.gptq-presenter { --jp-widgets-font-size: 17px; --jp-widgets-inline-height: 34px; }
.gptq-layer-lab.gptq-presenter .gptq-lab-header > :not(.gptq-room) { display: none !important; }
.gptq-layer-lab.gptq-presenter .gptq-layer-figure { max-width: min(100%, calc(100vh - 120px)) !important; }
.gptq-layer-lab.gptq-presenter .gptq-lab-text div[style] { font-size: 18px !important; }
.gptq-layer-lab.gptq-presenter .widget-label,
.gptq-layer-lab.gptq-presenter .jupyter-button { width: auto !important; min-width: 40px; }
.gptq-layer-lab.gptq-presenter .gptq-lab-text small { font-size: 15px !important; }
/* visible focus for every control reached with Tab */
.jupyter-widgets :focus-visible, .jupyter-widgets:focus-visible, .noUi-handle:focus-visible,
.lm-TabBar-tab:focus-visible, .gptq-layer-figure:focus-visible {
  outline: 3px solid #1a5fb4 !important; outline-offset: 2px;
}
/* ipywidgets' grey labels on grey (tabs, accordion titles) read 4.45:1; WCAG AA asks 4.5:1 */
body .jupyter-widgets.jupyter-widget-tab > .lm-TabBar .lm-TabBar-tab,
body .jupyter-widget-Collapse-header { color: var(--jp-ui-font-color1, rgba(0, 0, 0, 0.87)); }
@media (prefers-reduced-motion: reduce) {
  .jupyter-widgets *, .gptq-layer-lab * { transition: none !important; animation: none !important; }
}
`;

function addStyle() {
  if (document.getElementById("gptq-room-css")) return;
  const style = document.createElement("style");
  style.id = "gptq-room-css";
  style.textContent = CSS;
  document.head.appendChild(style);
}

// ipywidgets' sliders are noUiSlider handles (role=slider) without a name, and the Play control's buttons
// hold only an icon: name them from the slider's description and the icon. Once per page, on every change
// of the page (a tab built later, a control redrawn).
function labelControls() {
  for (const handle of document.querySelectorAll(".widget-slider .noUi-handle")) {
    const label = handle.closest(".widget-slider").querySelector(".widget-label");
    const name = label ? label.textContent.trim() : "";
    if (name && handle.getAttribute("aria-label") !== name) handle.setAttribute("aria-label", name);
  }
  for (const button of document.querySelectorAll(".widget-play button")) {
    const icon = button.querySelector("i");
    const key = icon ? [...icon.classList].find((c) => c in PLAY_ICONS) : null;
    const name = key ? PLAY_ICONS[key] : "play control";
    if (button.getAttribute("aria-label") !== name) button.setAttribute("aria-label", name);
    if (!button.title) button.title = name;
  }
}
function watchLabels() {
  if (window.gptqLabelsWatched) return;
  window.gptqLabelsWatched = true;
  let queued = false;
  const run = () => { queued = false; labelControls(); };
  new MutationObserver(() => { if (!queued) { queued = true; setTimeout(run, 50); } })
    .observe(document.body, { childList: true, subtree: true, attributes: true, attributeFilter: ["class"] });
  labelControls();
}

const visible = (node) => node.getClientRects().length > 0;

export default {
  render({ model, el }) {
    addStyle();
    watchLabels();
    el.classList.add("gptq-room");
    const lab = () => el.closest(".gptq-layer-lab");
    const button = (text, title) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "jupyter-button";
      b.textContent = text;
      b.title = title;
      el.appendChild(b);
      return b;
    };
    const controlsButton = button("Controls", "show or hide the controls column");
    const presenterButton = button("Presenter (P)", "presenter mode: bigger type, controls hidden");
    const saveButton = button("Save picture", "download the figure as a PNG");
    saveButton.classList.add("gptq-save-picture");

    const save = () => { model.save_changes(); };
    function show() {
      const root = lab(), presenter = model.get("presenter"), hidden = model.get("controls_hidden");
      presenterButton.setAttribute("aria-pressed", String(presenter));
      controlsButton.setAttribute("aria-expanded", String(!hidden && !presenter));
      if (!root) return;
      root.classList.toggle("gptq-presenter", presenter);
      root.classList.toggle("gptq-controls-hidden", hidden);
      root.setAttribute("data-presenter", presenter ? "1" : "0");
      const figure = root.querySelector(".gptq-layer-figure");
      if (figure && !figure.hasAttribute("tabindex")) {  // the keys' home: Tab reaches the figure
        figure.tabIndex = 0;
        figure.setAttribute("role", "region");
        figure.setAttribute("aria-label", "GPTQ figure. Keys: Space play or pause, left and right arrows "
          + "step, Home and End first and last column, N next group, B next block, P presenter mode");
      }
    }
    controlsButton.addEventListener("click", () => { model.set("controls_hidden", !model.get("controls_hidden")); save(); });
    presenterButton.addEventListener("click", () => togglePresenter());
    saveButton.addEventListener("click", () => savePicture());

    function togglePresenter() {
      const on = !model.get("presenter");
      model.set("presenter", on);
      save();
      show();
      if (on && lab()) lab().scrollIntoView({ block: "start" });  // the page's intro scrolls away
    }
    function savePicture() {
      const root = lab(), canvas = root && root.querySelector(".gptq-layer-figure canvas");
      if (!canvas) return;
      const a = document.createElement("a");
      a.href = canvas.toDataURL("image/png");
      a.download = `${model.get("picture_name") || "gptq-layer"}-col${model.get("cursor")}.png`;
      document.body.appendChild(a);
      a.click();
      a.remove();
    }
    function go(cursor) {
      model.set("playing", false);
      model.set("cursor", Math.max(0, Math.min(model.get("last"), cursor)));
      save();
    }
    function playPause() {
      if (!model.get("playing") && model.get("cursor") >= model.get("last")) model.set("cursor", 0);
      model.set("playing", !model.get("playing"));
      save();
    }
    function boundary(action) {
      model.set("playing", false);
      save();
      model.send({ event: "key", action });
    }

    // this lab takes the key: the focus is in it, or nowhere and it is the first lab shown
    function mine(target) {
      const root = lab();
      if (!root || !visible(el)) return false;
      if (root.contains(target)) return true;
      if (target !== document.body && target !== document.documentElement && target !== null) return false;
      const first = [...document.querySelectorAll(".gptq-layer-lab")].find((r) => visible(r));
      return first === root;
    }
    function onKey(e) {
      if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) return;
      const target = e.target instanceof Element ? e.target : null;
      if (target && target.closest(TYPING)) return;
      if (!mine(target || document.body)) return;
      const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
      if (key === " " && target && target.closest(NATIVE_SPACE)) return;  // the button's own Space
      const actions = {
        " ": playPause,
        ArrowLeft: () => go(model.get("cursor") - 1),
        ArrowRight: () => go(model.get("cursor") + 1),
        Home: () => go(0),
        End: () => go(model.get("last")),
        n: () => boundary("group"),
        b: () => boundary("block"),
        p: togglePresenter,
      };
      if (!(key in actions)) return;
      e.preventDefault();
      actions[key]();
    }
    document.addEventListener("keydown", onKey);

    // prefers-reduced-motion: the animation starts paused (the kernel hears it too: a method's "animate"
    // then sets it up without playing it)
    const motion = window.matchMedia ? window.matchMedia("(prefers-reduced-motion: reduce)") : null;
    const onMotion = () => {
      const reduce = Boolean(motion && motion.matches);
      model.set("reduced_motion", reduce);
      if (reduce) model.set("playing", false);
      save();
      el.setAttribute("data-reduced-motion", reduce ? "1" : "0");
    };
    if (motion) motion.addEventListener("change", onMotion);
    onMotion();

    model.on("change:presenter", show);
    model.on("change:controls_hidden", show);
    // the lab's root holds this element only once it is attached: show() then (and on every change)
    requestAnimationFrame(show);
    show();
    return () => {
      document.removeEventListener("keydown", onKey);
      if (motion) motion.removeEventListener("change", onMotion);
      model.off("change:presenter", show);
      model.off("change:controls_hidden", show);
    };
  },
};
