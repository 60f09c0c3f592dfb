"""The Layer Lab: watch GPTQ quantize one linear layer column by column, next to round-to-nearest.

    from gptq_explorer.ui import LayerLab
    lab = LayerLab()            # synthetic 576x576 layer: instant, no model
    lab                         # displays (or lab.widget inside your own layout)

One object, one view. Controls pick the layer (model, block, sublayer, calibration corpus and size) and the
GPTQ config; the engine's stepper runs once per config (cached) and every column can then be replayed on
a crop in O(crop) (see layer_run). Each column's frame (the five cropped heatmaps and the column profile)
goes to ONE long-lived canvas widget (layer_figure) in one message of binary buffers. The animation's
clock runs in that widget's view: an ipywidgets Play gives the buttons (its own timer parked), its
playing/value are jslinked to the view, which advances the cursor at the frames/s setting through frames
the kernel sends ahead while playing; the column slider follows the Play (jslink) and drives the text.

Voila rules followed here (../shared/reference/jupyter-stack.md): the figure is a widget whose synced
state is the whole picture, so a browser that connects later draws the current figure; later changes
happen in callbacks. Every callback is wrapped: an error is shown in the page with the fix to try, never
raised into the kernel. Loading a model runs in a background thread with a progress bar and a Cancel
button (cancellation takes effect between steps: the model load itself, one call, finishes first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import ipywidgets as widgets
import numpy as np

from ..engine import QuantConfig
from ._blas import single_blas_thread
from .common import (
    InputError,
    Job,
    as_bool,
    as_float,
    as_int,
    guarded,
    info_html,
    message_html,
    message_widget,
    page_probe,
)
from .layer_figure import COLORS, LabFigure
from .layer_run import Run, compute_run, frame, window
from .layer_source import (
    SYNTHETIC,
    SYNTHETIC_BLOCKS,
    SYNTHETIC_SUBLAYERS,
    Cancelled,
    LayerData,
    LayerSource,
    ModelSource,
    SyntheticSource,
    cached_model_structure,
    curated_models,
    model_structure,
)
from .presets import CUSTOM, DAMP_EXP, PRESETS

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# allowed values (the widgets enforce them for the browser; `set` and `from_query` for Python and links)

BITS = (2, 8)
GROUP_SIZES = (-1, 32, 64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128, 256)
NSAMPLES = (4, 8, 16, 32, 64)
CORPORA = ("prose", "code")
CROP_ROWS = (4, 96)
CROP_COLS = (4, 128)
FPS = (1, 30)
MAX_CACHED_RUNS = 8
PLAY_PARKED_MS = 10**9  # the Play control's own timer never fires (the figure's view runs the clock)
AHEAD_FRAMES = 20  # while playing, frames sent ahead of the kernel's column (~1.3 s at 15 frames/s)
FIGURE_DEADLINE_S = 60.0  # after the page rendered, the figure must have drawn itself (see _on_probe)
FIGURE_STALE_S = 30.0  # updates unanswered this long: frozen (a loaded browser took 8 s to answer)
RUN_CACHE_BYTES = 200 * 2**20  # cached runs of one lab (a 576x576 run is ~14 MB)

DEFAULTS: dict = {
    "model": SYNTHETIC, "block": 0, "sublayer": SYNTHETIC_SUBLAYERS[0], "corpus": "prose", "nsamples": 16,
    "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "sym": True,
    "static_groups": False, "block_size": 128,
    "col": 0, "rows": 24, "cols": 32, "row0": 0, "fps": 15,
}
SOURCE_KEYS = ("model", "block", "sublayer", "corpus", "nsamples")
CONFIG_KEYS = ("bits", "group_size", "damp_percent", "desc_act", "sym", "static_groups", "block_size")
VIEW_KEYS = ("rows", "cols", "row0")
STATE_KEYS = tuple(DEFAULTS)


LabInputError = InputError  # the Layer Lab's name for it (a value outside what the controls allow)


def _fix_for(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, Cancelled):
        return "Nothing to fix: the previous layer stays on screen."
    if name in ("ModelLoadError", "CorpusError", "UnsupportedModelError"):
        return "Pick another model from the list, or the synthetic layer, which needs nothing."
    if isinstance(exc, np.linalg.LinAlgError) or "positive definite" in str(exc):
        return "Raise damp_percent, or calibrate on more samples."
    if isinstance(exc, MemoryError):
        return "Pick a smaller model or fewer calibration samples."
    if isinstance(exc, ValueError):
        return "Change the value back, or pick a preset."
    return "Pick a preset to reset the settings; if it happens again, reload the page."


class LayerLab:
    """The Layer Lab (see the module doc). Public API:

    LayerLab(source=None, *, models=None, local_mode=False, threaded=True, state=None)
    lab.widget / display(lab)       the view
    lab.set(**values)               change controls from Python (validated; one recompute)
    lab.state() / lab.state_query() the whole state, as a dict / a URL query string
    LayerLab.from_query(qs)         rebuild a lab from a query string (bad values are listed in the page)
    lab.goto(k), lab.step(+1), lab.next_boundary("group" | "block"), lab.highlight(col)
    lab.apply_preset(name), lab.wait(), lab.run (the current Run), lab.summary (its numbers)
    lab.view(name)                  a heatmap's (z, rows, cols) as plotted, name in HEATMAPS
    """

    def __init__(self, source: LayerSource | None = None, *, models=None, local_mode: bool = False,
                 threaded: bool = True, state: dict | None = None, defer_load_s: float | None = None):
        self.local_mode = bool(local_mode)
        self.threaded = bool(threaded)
        # A model's layer loads in the background; with defer_load_s it starts only once the figure has
        # drawn itself in a browser (or after that many seconds): the load (torch's import, forward
        # passes) otherwise takes the CPU and the kernel's attention from the page that is opening.
        self.defer_load_s = defer_load_s
        self._deferred: ModelSource | None = None
        self.errors: list[str] = []
        self.last_error: BaseException | None = None
        self.summary: dict = {}
        self._quiet = 0
        self._lock = threading.RLock()
        self._job: Job | None = None
        self._runs: OrderedDict = OrderedDict()
        self._hover: int | None = None
        self._structures: dict[str, tuple[int, list[str]]] = {}
        self._last_window = None

        source = source or SyntheticSource()
        self._synthetic = source if isinstance(source, SyntheticSource) else SyntheticSource()
        self._model_options = self._build_model_options(models, source)
        values = {**DEFAULTS, **{k: v for k, v in (state or {}).items() if k in DEFAULTS}}
        values.update(self._state_of_source(source))
        self._build_controls(values)

        # The first layer is loaded synchronously when that is quick (synthetic, or captured already) or
        # asked for (threaded=False); a model is otherwise loaded in the background, with the synthetic
        # layer shown meanwhile.
        pending = None
        captured = (isinstance(source, ModelSource) and source.cached() is not None
                    and cached_model_structure(source.model) is not None)  # nothing left to load
        if isinstance(source, SyntheticSource) or not self.threaded or captured:
            try:
                self.data = source.load()
                if isinstance(source, ModelSource):
                    self._structures[source.model] = model_structure(source.model)
            except Exception as exc:  # noqa: BLE001
                self.show_error(exc, where="load")
                source = self._synthetic
                self.data = source.load()
        else:
            pending, source = source, self._synthetic
            self.data = source.load()
        self._source = source
        self._set_source_controls(self._state_of_source(source))
        self._shown_source_values = self._source_values()
        self.run = self._get_run(source, self.data, self._config())
        self._sync_slider_ranges()
        self._build_figures()
        self._build_view()
        self._render_full()
        if pending is not None:
            self._set_source_controls(self._state_of_source(pending))
            self._info(f"Loading {html.escape(pending.name)} in the background; showing a synthetic layer "
                       "meanwhile.")
            if self.defer_load_s is None:
                self._start_source_job(pending)
            else:
                self._deferred = pending  # started by the figure's first answer, or by this timer
                timer = threading.Timer(self.defer_load_s, self._start_deferred_load)
                timer.daemon = True
                timer.start()

    # -----------------------------------------------------------------------------------------------------
    # construction

    def _build_model_options(self, models, source) -> list[tuple[str, str]]:
        if models is None:
            models = curated_models()
        if isinstance(models, dict):
            items = list(models.items())
        else:
            items = [(m, m) for m in models]
        opts = [("Synthetic layer (instant, no model)", SYNTHETIC)]
        for mid, desc in items:
            if mid != SYNTHETIC:
                label = mid if desc == mid else f"{mid} — {desc}"
                opts.append((label[:90], mid))
        if isinstance(source, ModelSource) and source.model not in [v for _, v in opts]:
            opts.append((source.model, source.model))  # a Python caller's choice is trusted
        return opts

    def _state_of_source(self, source) -> dict:
        if isinstance(source, ModelSource):
            return {"model": source.model, "block": source.block, "sublayer": source.sublayer,
                    "corpus": source.corpus, "nsamples": source.nsamples}
        seed = getattr(source, "seed", 0)
        return {"model": SYNTHETIC, "block": seed if 0 <= seed < SYNTHETIC_BLOCKS else 0,
                "sublayer": SYNTHETIC_SUBLAYERS[0]}

    def _build_controls(self, values: dict) -> None:
        W = widgets
        lay = W.Layout(width="250px")
        desc = {"description_width": "90px"}
        self.controls: dict[str, widgets.Widget] = {}
        c = self.controls
        c["model"] = W.Dropdown(options=self._model_options, value=SYNTHETIC, description="model",
                                layout=lay, style=desc)
        c["block"] = W.Dropdown(options=list(range(SYNTHETIC_BLOCKS)), value=0, description="block",
                                layout=lay, style=desc)
        c["sublayer"] = W.Dropdown(options=list(SYNTHETIC_SUBLAYERS), value=SYNTHETIC_SUBLAYERS[0],
                                   description="sublayer", layout=lay, style=desc)
        c["corpus"] = W.Dropdown(options=list(CORPORA), value="prose", description="calib corpus",
                                 layout=lay, style=desc)
        c["nsamples"] = W.Dropdown(options=list(NSAMPLES), value=16, description="calib windows",
                                   layout=lay, style=desc)
        c["bits"] = W.IntSlider(min=BITS[0], max=BITS[1], value=4, description="bits",
                                continuous_update=False, layout=lay, style=desc)
        c["group_size"] = W.Dropdown(options=[("per row (-1)", -1)] + [(str(g), g) for g in GROUP_SIZES[1:]],
                                     value=128, description="group size", layout=lay, style=desc)
        c["damp_percent"] = W.FloatLogSlider(value=0.01, base=10, min=DAMP_EXP[0], max=DAMP_EXP[1], step=0.25,
                                             description="damp_percent", readout_format=".3g",
                                             continuous_update=False, layout=lay, style=desc)
        c["desc_act"] = W.Checkbox(value=False, description="desc_act (act-order)", indent=False)
        c["sym"] = W.Checkbox(value=True, description="symmetric grid", indent=False)
        c["static_groups"] = W.Checkbox(value=False, description="static groups", indent=False)
        c["block_size"] = W.Dropdown(options=list(BLOCK_SIZES), value=128, description="block size",
                                     layout=lay, style=desc)
        c["rows"] = W.IntSlider(min=CROP_ROWS[0], max=CROP_ROWS[1], value=24, description="crop rows",
                                continuous_update=False, layout=lay, style=desc)
        c["cols"] = W.IntSlider(min=CROP_COLS[0], max=CROP_COLS[1], value=32, description="crop cols",
                                continuous_update=False, layout=lay, style=desc)
        c["row0"] = W.IntSlider(min=0, max=576, value=0, description="first row", continuous_update=False,
                                layout=lay, style=desc)
        c["col"] = W.IntSlider(min=0, max=575, value=0, description="column", continuous_update=True,
                               layout=W.Layout(width="420px"), style={"description_width": "55px"})
        c["fps"] = W.IntSlider(min=FPS[0], max=FPS[1], value=15, description="frames/s",
                               layout=W.Layout(width="230px"), style={"description_width": "60px"})
        # the Play control gives the buttons; its own timer is parked (PLAY_PARKED_MS): the figure's view
        # runs the clock (layer_figure), so a step never waits for the kernel
        self.play = W.Play(min=0, max=575, step=1, interval=PLAY_PARKED_MS, show_repeat=False,
                           description="play")
        widgets.jslink((self.play, "value"), (c["col"], "value"))
        self.preset = W.Dropdown(options=[CUSTOM, *PRESETS], value=CUSTOM, description="preset",
                                 layout=W.Layout(width="420px"), style={"description_width": "50px"})
        self.local_path = None
        if self.local_mode:
            self.local_path = W.Text(placeholder="/path/to/model folder (config.json + *.safetensors)",
                                     layout=W.Layout(width="250px"))
            self.local_button = W.Button(description="use local folder", layout=W.Layout(width="250px"))
            self.local_button.on_click(self._on_local_folder)

        # the initial values (validated), without callbacks; model/block/sublayer follow the source
        with self._quietly():
            for key in ("corpus", "nsamples", *CONFIG_KEYS, "rows", "cols", "fps"):
                if values[key] != DEFAULTS[key]:
                    self._set_control(key, _validate_value(key, values[key]))
        self._initial_view = {k: _validate_value(k, values[k]) for k in ("col", "row0")}
        for key in SOURCE_KEYS:
            c[key].observe(functools.partial(self._on_source_change, key), names="value")
        for key in CONFIG_KEYS:
            c[key].observe(self._on_config_change, names="value")
        for key in VIEW_KEYS:
            c[key].observe(self._on_view_change, names="value")
        # keep Play's value equal to the column on the Python side too: when a browser connects, jslink
        # copies Play's value onto the slider, which would otherwise reset a restored column to 0
        c["col"].observe(self._sync_play, names="value")
        c["col"].observe(self._on_col, names="value")
        c["fps"].observe(self._on_fps, names="value")
        self.preset.observe(self._on_preset, names="value")

        self.buttons = {
            "start": W.Button(icon="step-backward", tooltip="first column", layout=W.Layout(width="40px")),
            "prev": W.Button(icon="chevron-left", tooltip="step -1", layout=W.Layout(width="40px")),
            "next": W.Button(icon="chevron-right", tooltip="step +1", layout=W.Layout(width="40px")),
            "group": W.Button(description="next group", tooltip="jump to the next group boundary",
                              layout=W.Layout(width="95px")),
            "block": W.Button(description="next block", tooltip="jump to the next lazy-update block",
                              layout=W.Layout(width="95px")),
        }
        self.buttons["start"].on_click(lambda _: self.goto(0))
        self.buttons["prev"].on_click(lambda _: self.step(-1))
        self.buttons["next"].on_click(lambda _: self.step(+1))
        self.buttons["group"].on_click(lambda _: self.next_boundary("group"))
        self.buttons["block"].on_click(lambda _: self.next_boundary("block"))
        self.copy_button = W.Button(description="Copy link", icon="link", layout=W.Layout(width="110px"))
        self.copy_button.on_click(self._on_copy_link)
        self.link = W.HTML(value="")
        self.message = message_widget()
        self.progress = W.FloatProgress(min=0.0, max=1.0, value=0.0, layout=W.Layout(width="260px"))
        self.progress_label = W.Label(value="")
        self.cancel_button = W.Button(description="Cancel", icon="stop", button_style="warning",
                                      layout=W.Layout(width="100px"))
        self.cancel_button.on_click(self._on_cancel)
        self.progress_box = W.HBox([self.progress, self.progress_label, self.cancel_button],
                                   layout=W.Layout(display="none"))
        self.explain = W.HTML(value="", layout=W.Layout(width="330px"))
        self.summary_html = W.HTML(value="", layout=W.Layout(width="330px"))
        # created before the figure, so a browser creates (and renders) it first
        self.probe = page_probe(FIGURE_DEADLINE_S)
        self.figure_rebuilds = 0
        self._figure_alive = False
        self._watchdog: threading.Thread | None = None
        self._closed = False
        if self.probe is not None:
            self.probe.on_msg(self._on_probe)

    def _build_figures(self) -> None:
        """The one figure, built complete from the current run (see layer_figure), then wrapped."""
        k = self.col
        win = self._window(k)
        fr = frame(self.run, k, win)
        self.figure = LabFigure(self.run, k, win, fr, self._on_hover, self._on_click, lock=self._lock)
        self.fig = self.figure.widget
        self._link_figure()
        self._watch_figure()

    def _link_figure(self) -> None:
        """The view's clock follows the Play control (and the slider the view's cursor), in the browser."""
        for link in getattr(self, "_figure_links", ()):
            link.unlink()
        self.fig.fps = int(self.controls["fps"].value)
        self.fig.cursor = int(self.play.value)
        self._figure_links = (widgets.jslink((self.play, "value"), (self.fig, "cursor")),
                              widgets.jslink((self.play, "playing"), (self.fig, "playing")))
        self.fig.observe(self._on_playing, names="playing")

    @guarded
    def _on_playing(self, change) -> None:
        if change["new"]:
            self._send_ahead()
        else:  # paused: the synced frame is the column shown (a browser that connects later draws it)
            self._render_frame(force=True)
            self._send_ahead()  # so that Play resumes at once

    def _send_ahead(self) -> None:
        """The frames after the current column that the view has not got yet: while playing, and once
        after a new run or a pause, so that pressing Play needs no round trip to the kernel."""
        with self._lock:
            run = self.run

            def make(j):
                win = self._window(j)
                return win, frame(run, j, win)

            self.figure.send_ahead(run, self.col, make, AHEAD_FRAMES)

    # -----------------------------------------------------------------------------------------------------
    # the figure watchdog
    #
    # anywidget gives each model 2 s to load its ESM; a view that misses the deadline either never draws,
    # or draws its first state and drops every later message from the kernel (seen with plotly's 5 MB
    # FigureWidget, which the canvas replaced; its ESM is 20 KB, but the guard stays). The view answers
    # the frames it drew with their seq, so the kernel can tell: frames sent and no answer for
    # FIGURE_STALE_S while a browser shows the page (the page probe said so) -> replace the figure by a
    # fresh widget holding the same state, which starts while the page is idle. At most 3 times.

    def _watch_figure(self) -> None:
        self._figure_alive = False
        self._answered_at = time.monotonic()
        self._answered_id = int(self.fig.seq)
        self._waiting_since = time.monotonic()
        self._present_gen = -1  # the generation whose next frames this view got while paused
        self.figure.on_answer = lambda msg: self._on_figure_answer({"new": msg})
        self.fig.observe(self._on_figure_edit, names="seq")

    def _on_figure_answer(self, change) -> None:
        msg = change["new"]
        if not isinstance(msg, dict):
            return
        self._figure_alive = True
        self._answered_at = time.monotonic()
        self._answered_id = max(self._answered_id, int(msg.get("trace_edit_id") or 0))
        # The view has drawn a new run or crop (paused): now send it the next frames, once per generation,
        # so that pressing Play needs no round trip. Not before the draw: it would delay the redraw.
        if (not self.fig.playing and self._answered_id >= int(self.fig.seq)
                and self._present_gen != self.figure.gen):
            self._present_gen = self.figure.gen
            self._send_ahead()
        if self._deferred is not None:  # the page has drawn: now the model may take the CPU
            self._start_deferred_load()

    def figure_frozen(self, now: float | None = None) -> bool:
        """The figure drew itself in a browser, updates are waiting since, and it has not answered any for
        FIGURE_STALE_S. (One that never drew is the page probe's case: see _on_probe.)"""
        now = time.monotonic() if now is None else now
        if not self._figure_alive:
            return False
        if int(self.fig.seq) <= self._answered_id:
            return False  # caught up
        return now - max(self._answered_at, self._waiting_since) > FIGURE_STALE_S

    def _on_figure_edit(self, change) -> None:
        if self._answered_id >= int(change["old"] or 0):  # was caught up: the clock starts now
            self._waiting_since = time.monotonic()

    @guarded
    def _on_probe(self, _widget, content, _buffers) -> None:
        """Messages of the page probe (common.page_probe): "rendered" (a browser shows the page: start
        watching the figure's answers) and "figure" {drawn} (whether it drew itself within the deadline)."""
        if not isinstance(content, dict):
            return
        if content.get("event") == "rendered":
            self._answered_at = time.monotonic()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name="LayerLab-figure-watchdog",
                                                  daemon=True)
                self._watchdog.start()
        elif content.get("event") == "figure":
            if content.get("drawn"):
                if not self._figure_alive:
                    self._figure_alive = True
                    self._answered_at = time.monotonic()
            elif not self._figure_alive and self.figure_rebuilds < 3:
                self.rebuild_figure()

    def _watch_loop(self) -> None:
        while self.figure_rebuilds < 3 and not self._closed:
            time.sleep(1.0)
            try:
                if self.figure_frozen():
                    self.rebuild_figure()
            except Exception as exc:  # noqa: BLE001 - a watchdog thread: show it, never raise
                self.show_error(exc, where="rebuilding the figure")
                return

    def rebuild_figure(self) -> None:
        """Replace the figure's widget by a fresh one showing the same state."""
        with self._lock:
            old = self.fig
            self.figure.adopt(self.figure.fresh_copy())
            self.fig = self.figure.widget
            self._link_figure()
            self._watch_figure()
            self._fig_box.children = (self.fig, *self._fig_box.children[1:])
            self.figure_rebuilds += 1
        log.warning("LayerLab: the figure stopped answering in the browser; rebuilt it (%d)",
                    self.figure_rebuilds)
        old.close()
        if self.probe is not None:
            self.probe.send({"watch": True})

    def _build_view(self) -> None:
        W = widgets
        c = self.controls

        def section(title, items):
            return W.VBox([W.HTML(f"<b>{title}</b>"), *items], layout=W.Layout(margin="0 0 8px 0"))

        layer_items = [c["model"]]
        if self.local_mode:
            layer_items += [self.local_path, self.local_button]
        layer_items += [c["block"], c["sublayer"], c["corpus"], c["nsamples"]]
        panel = W.VBox([
            section("Layer", layer_items),
            section("GPTQ config", [c["bits"], c["group_size"], c["damp_percent"], c["desc_act"], c["sym"],
                                    c["static_groups"], c["block_size"]]),
            section("Crop", [c["rows"], c["cols"], c["row0"]]),
        ], layout=W.Layout(width="265px"))
        b = self.buttons
        anim = W.HBox([self.play, b["start"], b["prev"], b["next"], c["col"], b["group"], b["block"],
                       c["fps"]],
                      layout=W.Layout(flex_flow="row wrap", align_items="center"))
        header = W.HBox([W.HTML("<h3 style='margin:4px 12px 4px 0'>GPTQ Layer Lab</h3>"), self.preset,
                         self.copy_button], layout=W.Layout(align_items="center"))
        self._fig_box = W.HBox([self.fig, W.VBox([self.explain, self.summary_html])])
        main = W.VBox([anim, self._fig_box])
        probe = [self.probe] if self.probe is not None else []
        self.root = W.VBox([*probe, header, self.link, self.message, self.progress_box,
                            W.HBox([panel, main])])

    # -----------------------------------------------------------------------------------------------------
    # display

    @property
    def widget(self) -> widgets.Widget:
        return self.root

    def _repr_mimebundle_(self, **kwargs):
        return self.root._repr_mimebundle_(**kwargs)

    # -----------------------------------------------------------------------------------------------------
    # state

    @property
    def col(self) -> int:
        return int(self.controls["col"].value)

    def _source_values(self) -> dict:
        return {k: self.controls[k].value for k in SOURCE_KEYS}

    def state(self) -> dict:
        """Every control's value (what a link restores)."""
        return {k: self.controls[k].value for k in STATE_KEYS}

    def state_query(self) -> str:
        """The state as a URL query string (no leading '?'), e.g. for a Voila link."""
        out = {}
        for k, v in self.state().items():
            out[k] = ("1" if v else "0") if isinstance(v, bool) else v
        return urlencode(out)

    @classmethod
    def parse_query(cls, query: str, *, local_mode: bool = False,
                    models=None) -> tuple[dict, list[str]]:
        """(values, problems) from a query string: unknown keys and bad values are listed, not applied."""
        query = query[1:] if query.startswith("?") else query
        values, problems = {}, []
        allowed_models = {SYNTHETIC, *(curated_models() if models is None else
                                       (models if not isinstance(models, dict) else models.keys()))}
        for key, raw in parse_qsl(query, keep_blank_values=True):
            if key not in DEFAULTS:
                problems.append(f"unknown setting '{key}' ignored")
                continue
            try:
                if key == "model":
                    if raw not in allowed_models and not (local_mode and Path(raw).is_dir()):
                        raise LabInputError(f"'{raw}' is not one of the offered models")
                    values[key] = raw
                elif key == "sublayer":
                    if not raw.replace(".", "").replace("_", "").replace("x", "").isalnum():
                        raise LabInputError(f"'{raw}' is not a sublayer name")
                    values[key] = raw
                else:
                    values[key] = _validate_value(key, raw)
            except LabInputError as exc:
                problems.append(f"{key}={raw!r} ignored: {exc}")
        return values, problems

    @classmethod
    def from_query(cls, query: str, *, strict: bool = False, source: LayerSource | None = None,
                   **kwargs) -> LayerLab:
        """A lab in the state a query string describes. strict=True raises on any bad value; otherwise the
        bad ones are skipped and listed in the page. `source` is the layer to show when the query names no
        model (default: the synthetic layer); other keyword arguments go to LayerLab()."""
        values, problems = cls.parse_query(query, local_mode=kwargs.get("local_mode", False),
                                           models=kwargs.get("models"))
        if problems and strict:
            raise LabInputError("; ".join(problems))
        if "model" not in values and source is not None:
            lab = cls(source=source, state=values, **kwargs)
            if problems:
                lab._info("Some settings in the link were not used: "
                          + "; ".join(html.escape(p) for p in problems))
            return lab
        merged = {**DEFAULTS, **values}
        if merged["model"] == SYNTHETIC:
            seed = int(merged["block"]) if 0 <= merged["block"] < SYNTHETIC_BLOCKS else 0
            source = SyntheticSource(seed=seed)
        else:
            source = ModelSource(model=merged["model"], block=merged["block"], sublayer=merged["sublayer"],
                                 corpus=merged["corpus"], nsamples=merged["nsamples"])
        lab = cls(source=source, state=values, **kwargs)
        if problems:
            lab._info("Some settings in the link were not used: "
                      + "; ".join(html.escape(p) for p in problems))
        return lab

    def _options_for(self, key: str, model: str) -> list | None:
        """The allowed blocks or sublayers of a model, or None while its structure is not known yet."""
        if model == SYNTHETIC:
            return list(range(SYNTHETIC_BLOCKS)) if key == "block" else list(SYNTHETIC_SUBLAYERS)
        if model in self._structures:
            n_blocks, subs = self._structures[model]
            return list(range(n_blocks)) if key == "block" else list(subs)
        return None

    def _validate(self, key: str, value, model: str | None = None):
        """The value a control would take, or LabInputError saying what is allowed."""
        if key == "model":
            allowed = [v for _, v in self.controls["model"].options]
            if value not in allowed:
                raise LabInputError(f"model must be one of {allowed}, got {value!r}")
            return value
        if key in ("block", "sublayer"):
            value = as_int(value) if key == "block" else str(value)
            opts = self._options_for(key, model or self.controls["model"].value)
            if opts is not None and value not in opts:
                raise LabInputError(f"{key} must be one of {opts}, got {value!r}")
            if key == "block" and value < 0:
                raise LabInputError(f"block must be >= 0, got {value}")
            return value
        return _validate_value(key, value)

    def _set_control(self, key: str, value) -> None:
        ctrl = self.controls[key]
        if key in ("block", "sublayer") and value not in ctrl.options:
            ctrl.options = [*ctrl.options, value]
        ctrl.value = value

    @contextlib.contextmanager
    def _quietly(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def set(self, **values) -> None:
        """Change several controls at once. Every value is checked first: anything outside what the
        controls allow raises LabInputError (also shown in the page) and nothing changes. Then: a layer
        change reloads the layer, a config change re-runs GPTQ once, a view change redraws."""
        try:
            clean = self._validate_all(values)
        except LabInputError as exc:
            self.show_error(exc, where="set")
            raise
        self._apply(clean)

    def _validate_all(self, values: dict) -> dict:
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise LabInputError(f"unknown setting(s) {unknown}; allowed: {list(DEFAULTS)}")
        clean = {}
        model = values.get("model", self.controls["model"].value)
        for key in STATE_KEYS:
            if key in values:
                clean[key] = self._validate(key, values[key], model)
        return clean

    @guarded
    def _apply(self, clean: dict) -> None:
        c = self.controls
        model_changed = "model" in clean and clean["model"] != c["model"].value
        source_change = any(k in SOURCE_KEYS and clean[k] != c[k].value for k in clean)
        with self._quietly():
            if model_changed:
                self._set_source_controls({"model": clean["model"]})
            for key in STATE_KEYS:
                if key in clean and key not in ("model",):
                    self._set_control(key, clean[key])
        if "fps" in clean:
            self.fig.fps = int(clean["fps"])
        if any(k in clean for k in (*SOURCE_KEYS, *CONFIG_KEYS)):
            self._mark_custom()
        if source_change:
            self._initial_view = {k: clean[k] for k in ("col", "row0") if k in clean}
            explicit = "block" in clean or "sublayer" in clean
            self._source_changed(changed="model" if model_changed and not explicit else None)
        elif any(k in CONFIG_KEYS for k in clean):
            self._recompute()
        elif any(k in clean for k in ("col", *VIEW_KEYS)):
            self._render_frame(force=True)

    # -----------------------------------------------------------------------------------------------------
    # errors, info, progress

    def show_error(self, exc: BaseException, where: str = "") -> None:
        """Show an exception in the page with the fix to try (and log the traceback). The box has the CSS
        class gptq-error (gptq-cancelled for a cancellation), its fix gptq-fix."""
        self.last_error = exc
        text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, Cancelled) else "Cancelled."
        self.errors.append(text)
        log.warning("LayerLab %s failed", where, exc_info=exc)
        self.message.value = message_html(exc, where, _fix_for(exc))

    def _info(self, text_html: str) -> None:
        self.message.value = info_html(text_html)

    def _clear_message(self) -> None:
        self.message.value = ""

    def _progress(self, job: Job, fraction: float, text: str) -> None:
        if job is not self._job:
            return
        self.progress.value = float(np.clip(fraction, 0, 1))
        self.progress_label.value = f"{job.label}: {text}"

    # -----------------------------------------------------------------------------------------------------
    # runs

    def _config(self) -> QuantConfig:
        c = self.controls
        return QuantConfig(bits=int(c["bits"].value), group_size=int(c["group_size"].value),
                           sym=bool(c["sym"].value), damp_percent=float(c["damp_percent"].value),
                           desc_act=bool(c["desc_act"].value), static_groups=bool(c["static_groups"].value),
                           block_size=int(c["block_size"].value))

    def _get_run(self, source, data: LayerData, cfg: QuantConfig) -> Run:
        key = (source.key, cfg)
        with self._lock:
            if key in self._runs:
                self._runs.move_to_end(key)
                return self._runs[key]
        with single_blas_thread():
            run = compute_run(data, cfg)
        with self._lock:
            self._runs[key] = run
            while len(self._runs) > 1 and (len(self._runs) > MAX_CACHED_RUNS or
                                           sum(r.nbytes for r in self._runs.values()) > RUN_CACHE_BYTES):
                self._runs.popitem(last=False)
        return run

    def _recompute(self) -> None:
        cfg = self._config()
        run = self._get_run(self._source, self.data, cfg)
        with self._lock:
            self.run = run
            self._sync_slider_ranges()
            self._render_full()
        if run.warnings:
            self._info("<br>".join(html.escape(w) for w in run.warnings))
        elif self.message.value and not self._job:
            self._clear_message()

    def _sync_slider_ranges(self) -> None:
        n, d_out = self.run.n, self.run.d_out
        c = self.controls
        with self._quietly():
            self.play.max = n - 1
            c["col"].max = n - 1
            c["row0"].max = max(d_out - 1, 0)
            if "col" in self._initial_view:
                c["col"].value = int(np.clip(self._initial_view["col"], 0, n - 1))
            if "row0" in self._initial_view:
                c["row0"].value = int(np.clip(self._initial_view["row0"], 0, d_out - 1))
            self._initial_view = {}

    # -----------------------------------------------------------------------------------------------------
    # drawing

    def _window(self, k: int):
        c = self.controls
        return window(self.run, k, int(c["rows"].value), int(c["cols"].value), int(c["row0"].value))

    def _render_full(self) -> None:
        """Everything that depends on the run (config or layer change), then the frame; then re-sync."""
        with self._lock:
            self.figure.full(self.run, self.run.cfg.desc_act)
            self._render_frame(force=True)
            self._render_summary()

    def _render_frame(self, force: bool = False) -> None:
        """One animation frame: the cropped heatmaps, the column profile, the cursor, the curves, the text.
        While playing, a frame the view got ahead is not sent again (only the text is)."""
        with self._lock:
            run = self.run
            k = int(np.clip(self.col, 0, run.n - 1))
            win = self._window(k)
            if force:
                self.figure.win = None
            sent = not force and bool(self.fig.playing) and self.figure.has_sent(k)
            self.figure.frame(run, k, win, frame(run, k, win), self._hover, sent=sent)
            self._last_window = win
            self.explain.value = self._explain(k)

    def _render_hover(self) -> None:
        with self._lock:
            self.figure.hover(self._hover, self._last_window or self._window(self.col))

    def _explain(self, k: int) -> str:
        run = self.run
        cfg = run.cfg
        n = run.n
        j = int(run.perm[k])
        g = int(run.group[k])
        d = float(run.hinv_diag[k])
        win = self._last_window or self._window(k)
        w, q = run.Wq[:, k], run.Q[:, k]
        err = w - q
        upd = np.abs(run.Err[:, k]).max() * (np.abs(run.U[k, k + 1:]).max() if k + 1 < n else 0.0)
        scale = float(np.mean(run.scales[:, g])) if run.scales.size else float("nan")
        i1, i2 = run.block_of(k)

        def t(color, s):
            return f"<span style='color:{color};font-weight:600'>{s}</span>"

        rank = ""
        if cfg.desc_act:
            rank = f" — desc_act: the input with the {_ordinal(k + 1)} largest {t(COLORS['hinv'], 'diag(H)')}"
        lazy = ""
        if i2 < n:
            lazy = (f"Lazy batches (Step 2): this is block [{i1}, {i2}); columns from {i2} on receive this "
                    "update when the block ends. The total is the same; it is shown here at once.")
        return f"""<div style='font-size:13px;line-height:1.45;padding:4px 6px'>
<b>Step {k + 1} of {n}</b>: input column <b>{j}</b> (position p = {k}, group {g}){rank}.
<ol style='padding-left:18px;margin:6px 0'>
<li>Take the column as it is now, {t(COLORS['w'], 'w')} (every earlier update applied), and round it onto
the group's {cfg.bits}-bit {'symmetric' if cfg.sym else 'asymmetric'} grid:
{t(COLORS['q'], 'q = quant(w)')}, mean scale {scale:.3g}.</li>
<li>Its error, scaled by the inverse Hessian: {t(COLORS['err'], 'e = (w − q)')} / {t(COLORS['hinv'], 'd')},
with {t(COLORS['hinv'], 'd = U<sub>pp</sub> = √[H<sub>F</sub><sup>−1</sup>]<sub>pp</sub>')} = {d:.4g};
‖{t(COLORS['err'], 'w − q')}‖ = {np.linalg.norm(err):.4g}.</li>
<li>Spread it over the {n - k - 1} columns not yet quantized (OBS update, Eq. 3):
{t(COLORS['upd'], 'ΔW<sub>:,F</sub>')} = −{t(COLORS['err'], 'e')} · {t(COLORS['hinv'], 'U<sub>p,F</sub>')};
largest |{t(COLORS['upd'], 'ΔW')}| = {upd:.3g}.</li>
<li>Loss of this column: Σ({t(COLORS['err'], 'w − q')})² / (2{t(COLORS['hinv'], 'd')}²) = {run.losses[k]:.4g}.
So far: {t(COLORS['upd'], f'GPTQ {run.running[k]:.4g}')} vs
{t(COLORS['rtn'], f'RTN {run.running_rtn[k]:.4g}')}
(same columns rounded, nothing compensated).</li>
</ol>
<small style='color:#555'>{lazy} Crop: rows {win.r0}–{win.r1 - 1}, positions {win.c0}–{win.c1 - 1}.
</small></div>"""

    def _render_summary(self) -> None:
        s, run = self.run.summary, self.run
        self.summary = dict(s)
        ratio = s["heldout_ratio"]
        rows = [
            ("weight MSE", s["weight_mse_gptq"], s["weight_mse_rtn"]),
            (f"held-out output MSE ({s['heldout_tokens']} tokens)", s["heldout_mse_gptq"],
             s["heldout_mse_rtn"]),
            ("OBS loss L (calibration)", s["loss_gptq"], s["loss_rtn"]),
        ]
        td = "<td style='text-align:right;padding-left:8px'>"
        body = "".join(f"<tr><td>{name}</td>{td}{g:.3g}</td>{td}{r:.3g}</td></tr>" for name, g, r in rows)
        damp = ("" if abs(s["damp_percent_used"] - run.cfg.damp_percent) < 1e-12 else
                f"<br><b>Damping raised to {s['damp_percent_used']:g}</b> to make H + λI invertible.")
        self.summary_html.value = f"""<div style='font-size:13px;padding:4px 6px'>
<b>{html.escape(run.cfg.label())}</b> on {html.escape(run.name)}
<table style='border-collapse:collapse;margin:6px 0'>
<tr><th></th><th style='color:{COLORS['upd']}'>GPTQ</th><th style='color:{COLORS['rtn']}'>RTN</th></tr>{body}
</table>
Held-out error RTN / GPTQ = <b>{ratio:.2f}×</b>{damp}<br>
<small style='color:#555'>L = Σ<sub>q</sub> (w<sub>q</sub> − q<sub>q</sub>)² /
(2 [H<sub>F</sub><sup>−1</sup>]<sub>qq</sub>)
= ½ tr(ΔW (H + λI) ΔWᵀ), summed over rows, with H = 2/n · XᵀX and n = {s['calib_tokens']} calibration
<i>tokens</i> (the paper's code divides by sequences, so its L is seqlen× larger). Held-out tokens were never
used to build H. GPTQ + RTN computed in {run.seconds:.2f} s.</small></div>"""

    # -----------------------------------------------------------------------------------------------------
    # navigation (public)

    @guarded
    def goto(self, k: int) -> None:
        """Show step k (clamped to the layer's columns)."""
        k = int(np.clip(as_int(k), 0, self.run.n - 1))
        if k == self.col:
            self._render_frame()
        else:
            self.controls["col"].value = k

    @guarded
    def step(self, delta: int = 1) -> None:
        self.goto(self.col + int(delta))

    @guarded
    def next_boundary(self, kind: str = "group") -> None:
        """Jump to the first column of the next group ("group") or lazy-update block ("block")."""
        if kind not in ("group", "block"):
            raise LabInputError(f"kind must be 'group' or 'block', got {kind!r}")
        self.goto(self.run.next_boundary(self.col, kind))

    @guarded
    def highlight(self, col: int | None) -> None:
        """Highlight a column (processing position) in every heatmap and in diag(H); None clears it."""
        self._hover = None if col is None else int(np.clip(as_int(col), 0, self.run.n - 1))
        self._render_hover()

    @guarded
    def apply_preset(self, name: str) -> None:
        if name not in PRESETS:
            raise LabInputError(f"unknown preset {name!r}; presets: {list(PRESETS)}")
        values, blurb = PRESETS[name]
        self.set(**values)
        with self._quietly():
            self.preset.value = name
        self._info(f"<b>{html.escape(name)}</b>: {html.escape(blurb)}")

    def view(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A heatmap as plotted: (z (rows, cols), row indices, processing positions)."""
        return self.figure.view(name)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background job (model load / activation capture), if any, has finished (a load
        deferred until the figure draws starts now)."""
        self._start_deferred_load()
        job = self._job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)

    # -----------------------------------------------------------------------------------------------------
    # callbacks (all guarded)

    def _mark_custom(self) -> None:
        if self.preset.value != CUSTOM:
            with self._quietly():
                self.preset.value = CUSTOM

    @guarded
    def _on_config_change(self, change) -> None:
        if self._quiet:
            return
        self._mark_custom()
        self._recompute()

    @guarded
    def _on_view_change(self, change) -> None:
        if self._quiet:
            return
        self._render_frame(force=True)

    @guarded
    def _sync_play(self, change) -> None:
        # Only for columns set here (goto, a link): a column the browser sent is already the Play's there
        # (jslink), and it reaches the kernel late; pushing it back to the Play (while playing, or from a
        # message still queued at Pause) would make the animation jump back
        from_browser = "value" in getattr(self.controls["col"], "_property_lock", {})
        if not from_browser and not self.play.playing and self.play.value != change["new"]:
            self.play.value = change["new"]

    @guarded
    def _on_col(self, change) -> None:
        if self._quiet:
            return
        self._render_frame()
        if self.fig.playing:
            self._send_ahead()

    @guarded
    def _on_fps(self, change) -> None:
        self.fig.fps = int(change["new"])

    @guarded
    def _on_preset(self, change) -> None:
        if self._quiet or change["new"] == CUSTOM:
            return
        self.apply_preset(change["new"])

    @guarded
    def _on_hover(self, col) -> None:
        """The mouse is over column `col` (processing position) of a view, or left them (None)."""
        self.highlight(col)

    @guarded
    def _on_click(self, col) -> None:
        """A click on a column of any view jumps there."""
        self.goto(as_int(col))

    @guarded
    def _on_copy_link(self, _button=None) -> None:
        qs = self.state_query()
        self.link.value = (
            "<div style='font-size:12px'>Link to this state (select and copy): "
            f"<code style='user-select:all'>?{html.escape(qs)}</code> "
            f"<a href='?{html.escape(qs)}' target='_blank'>open</a></div>")

    @guarded
    def _on_cancel(self, _button=None) -> None:
        if self._job is not None:
            self._job.cancel.set()
            self.progress_label.value = "cancelling…"

    @guarded
    def _on_local_folder(self, _button=None) -> None:
        if not self.local_mode or self.local_path is None:
            raise LabInputError("local folders are disabled in the public app")
        folder = Path(self.local_path.value.strip()).expanduser()
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise LabInputError(f"{folder} is not a model folder (it needs config.json and *.safetensors)")
        value = str(folder.resolve())
        opts = list(self.controls["model"].options)
        if value not in [v for _, v in opts]:
            self.controls["model"].options = [*opts, (f"local: {folder.name}", value)]
        self.controls["model"].value = value  # -> _on_source_change

    @guarded
    def _on_source_change(self, key, change) -> None:
        if self._quiet:
            return
        self._mark_custom()
        self._source_changed(changed=key)

    # -----------------------------------------------------------------------------------------------------
    # changing the layer

    def _source_changed(self, changed: str | None = None) -> None:
        c = self.controls
        model = c["model"].value
        if model == SYNTHETIC:
            self._cancel_job()
            with self._quietly():
                if list(c["block"].options) != list(range(SYNTHETIC_BLOCKS)):
                    c["block"].options = list(range(SYNTHETIC_BLOCKS))
                    c["block"].value = 0
                if list(c["sublayer"].options) != list(SYNTHETIC_SUBLAYERS):
                    c["sublayer"].options = list(SYNTHETIC_SUBLAYERS)
            c["corpus"].disabled = c["nsamples"].disabled = True
            block = int(c["block"].value)
            self._load_now(dataclasses.replace(self._synthetic, seed=block))
            return
        c["corpus"].disabled = c["nsamples"].disabled = False
        if changed == "model" and model in self._structures:
            n_blocks, subs = self._structures[model]
            with self._quietly():
                c["block"].options = list(range(n_blocks))
                c["sublayer"].options = subs
        sub = c["sublayer"].value
        source = ModelSource(model=model, block=int(c["block"].value), sublayer=sub,
                             corpus=c["corpus"].value, nsamples=int(c["nsamples"].value))
        self._start_source_job(source, fresh_model=changed == "model")

    def _load_now(self, source) -> None:
        data = source.load()
        self._show_data(source, data)

    def _show_data(self, source, data: LayerData) -> None:
        run = self._get_run(source, data, self._config())
        with self._lock:
            self.data, self._source, self.run = data, source, run
            self._shown_source_values = self._source_values()
            self._sync_slider_ranges()
            self._render_full()
        if run.warnings:
            self._info("<br>".join(html.escape(w) for w in run.warnings))
        else:
            self._clear_message()

    def _set_source_controls(self, values: dict) -> None:
        c = self.controls
        with self._quietly():
            for k in ("model", "corpus", "nsamples"):
                if k in values and c[k].value != values[k]:
                    c[k].value = values[k]
            if values.get("model") == SYNTHETIC:
                c["block"].options = list(range(SYNTHETIC_BLOCKS))
                c["sublayer"].options = list(SYNTHETIC_SUBLAYERS)
            elif values.get("model") in self._structures:
                n_blocks, subs = self._structures[values["model"]]
                c["block"].options, c["sublayer"].options = list(range(n_blocks)), subs
            for k in ("block", "sublayer"):
                if k in values:
                    self._set_control(k, values[k])
            synthetic = c["model"].value == SYNTHETIC
            c["corpus"].disabled = c["nsamples"].disabled = synthetic

    def _start_deferred_load(self) -> None:
        with self._lock:
            pending, self._deferred = self._deferred, None
        if pending is not None and not self._closed:
            self._start_source_job(pending)

    def _cancel_job(self) -> None:
        """Drop the running job (its result will be ignored) and hide the progress bar."""
        self._deferred = None  # the user chose another layer before the deferred load began
        if self._job is not None:
            self._job.cancel.set()
            self._job = None
            self.progress_box.layout.display = "none"

    def _start_source_job(self, source: ModelSource, fresh_model: bool = False) -> None:
        self._cancel_job()
        job = Job(f"loading {source.model}")
        self._job = job
        self.progress.value = 0.0
        self.progress_label.value = job.label
        self.progress_box.layout.display = "flex"

        def work():
            try:
                progress = functools.partial(self._progress, job)
                n_blocks, subs = model_structure(source.model, progress)
                self._structures[source.model] = (n_blocks, subs)
                src = source
                if src.sublayer not in subs or not 0 <= src.block < n_blocks:
                    if not fresh_model:
                        raise LabInputError(f"{source.model} has blocks 0..{n_blocks - 1} and sublayers "
                                            f"{subs}; "
                                            f"got block {src.block}, sublayer {src.sublayer!r}")
                    src = dataclasses.replace(src, block=min(src.block, n_blocks - 1),
                                              sublayer=src.sublayer if src.sublayer in subs else subs[0])
                if job.cancel.is_set():
                    raise Cancelled("cancelled")
                data = src.load(progress, job.cancel.is_set)
                if job is not self._job:
                    return
                progress(0.98, "running GPTQ")
                self._set_source_controls(self._state_of_source(src))
                self._show_data(src, data)
            except Exception as exc:  # noqa: BLE001
                if job is self._job:
                    self.show_error(exc, where=job.label)
                    self._set_source_controls(self._shown_source_values)
            finally:
                if job is self._job:
                    self.progress_box.layout.display = "none"
                    self._job = None

        if self.threaded:
            job.thread = threading.Thread(target=work, name="LayerLab-load", daemon=True)
            job.thread.start()
        else:
            work()


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _validate_value(key: str, value):
    """Validate one non-source setting (shared by LayerLab.set and parse_query)."""
    if key == "bits":
        v = as_int(value)
        if not BITS[0] <= v <= BITS[1]:
            raise LabInputError(f"bits must be between {BITS[0]} and {BITS[1]}, got {v}")
        return v
    if key == "group_size":
        v = as_int(value)
        if v not in GROUP_SIZES:
            raise LabInputError(f"group_size must be one of {list(GROUP_SIZES)}, got {v}")
        return v
    if key == "block_size":
        v = as_int(value)
        if v not in BLOCK_SIZES:
            raise LabInputError(f"block_size must be one of {list(BLOCK_SIZES)}, got {v}")
        return v
    if key == "nsamples":
        v = as_int(value)
        if v not in NSAMPLES:
            raise LabInputError(f"nsamples must be one of {list(NSAMPLES)}, got {v}")
        return v
    if key == "corpus":
        if value not in CORPORA:
            raise LabInputError(f"corpus must be one of {list(CORPORA)}, got {value!r}")
        return value
    if key == "damp_percent":
        v = as_float(value)
        lo, hi = 10 ** DAMP_EXP[0], 10 ** DAMP_EXP[1]
        if not lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
            raise LabInputError(f"damp_percent must be between {lo:g} and {hi:.3g}, got {v:g}")
        return float(np.clip(v, lo, hi))
    if key in ("desc_act", "sym", "static_groups"):
        return as_bool(value)
    if key in ("col", "row0"):
        v = as_int(value)
        if v < 0:
            raise LabInputError(f"{key} must be >= 0, got {v}")
        return v
    ranges = {"rows": CROP_ROWS, "cols": CROP_COLS, "fps": FPS, "block": (0, 10_000)}
    if key in ranges:
        v = as_int(value)
        lo, hi = ranges[key]
        if not lo <= v <= hi:
            raise LabInputError(f"{key} must be between {lo} and {hi}, got {v}")
        return v
    if key in ("model", "sublayer"):
        return value
    raise LabInputError(f"unknown setting {key!r}")
