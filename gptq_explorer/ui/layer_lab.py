"""The Layer Lab: watch GPTQ quantize one linear layer column by column, next to round-to-nearest.

    from gptq_explorer.ui import LayerLab
    lab = LayerLab()            # synthetic 576x576 layer: instant, no model
    lab                         # displays (or lab.widget inside your own layout)

One object, one view. Controls pick the layer (model, block, sublayer, calibration corpus and size) and the
GPTQ config; the engine's stepper runs once per config (cached) and every column can then be replayed on
a crop in O(crop) (see layer_run). Each column's frame (the five cropped heatmaps and the column profile)
goes to ONE long-lived canvas widget (layer_figure) in one message of binary buffers; the animation's
clock runs in that widget's view (layer_animation).

The class is put together from: layer_controls (the widgets, their layout and callbacks), layer_animation
(drawing, Play, frames sent ahead, the figure watchdog), layer_loading (which layer, background loads),
layer_methods (the methods the menu names, the compare view), layer_hessian (the Hessian view),
layer_room (keys, presenter mode, Save picture) and controls.Lab (knobs, state, links, presets). This
module holds the state, `set` / `from_query`, the runs and navigation.

Voila: a widget's synced state is the whole picture, so a browser that connects later draws the current
figure from it, and every change after the first display happens in a callback. Every callback is wrapped:
an error is shown in the page with the fix to try, never raised into the kernel. Loading a model runs in
a background thread with a progress bar and a Cancel button.
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import settings
from ..engine import QuantConfig
from ..services.layer_source import (
    SYNTHETIC,
    SYNTHETIC_BLOCKS,
    SYNTHETIC_SUBLAYERS,
    LayerData,
    LayerSource,
    ModelSource,
    SyntheticSource,
    curated_models,
)
from ..services.threads import single_blas_thread
from .common import InputError, as_int, guarded
from .controls import Lab
from .layer_animation import LayerAnimation
from .layer_controls import SOURCE_KEYS, VIEW_KEYS, LayerControls
from .layer_hessian import LayerHessian
from .layer_loading import LayerLoading, model_options, state_of_source
from .layer_methods import METHOD_KEYS, LayerCompare, method_values
from .layer_room import LayerRoom
from .layer_run import BASES, Run, compute_run

MAX_CACHED_RUNS = 8
RUN_CACHE_BYTES = 200 * 2**20  # cached runs of one lab (a 576x576 run is ~14 MB)

KNOBS = ("corpus", "nsamples", "bits", "group_size", "damp_percent", "desc_act", "sym", "static_groups",
         "block_size", *METHOD_KEYS)
CONFIG_KEYS = tuple(k for k in KNOBS if k in settings.QUANT_KEYS)
# the rest of the state: (low, high) integers (high None: unbounded), a list of the allowed values, or None
# (checked against the model); basis: how a rotated run is drawn; hessian: the Hessian view open (1) or not
VIEW_RULES = {"model": None, "block": (0, 10_000), "sublayer": None, "col": (0, None), "rows": (4, 96),
              "cols": (4, 128), "row0": (0, None), "fps": (1, 30), "basis": list(BASES), "hessian": (0, 1)}
DEFAULTS: dict = {"model": SYNTHETIC, "block": 0, "sublayer": SYNTHETIC_SUBLAYERS[0],
                  **settings.defaults(KNOBS), "col": 0, "rows": 24, "cols": 32, "row0": 0, "fps": 15,
                  "basis": BASES[0], "hessian": 0}
STATE_KEYS = tuple(DEFAULTS)

LabInputError = InputError  # the Layer Lab's name for it (a value outside what the controls allow)
_NEEDS_NOTHING = "Pick another model from the list, or the synthetic layer, which needs nothing."


class LayerLab(LayerControls, LayerAnimation, LayerLoading, LayerCompare, LayerHessian, LayerRoom,
               Lab):
    """The Layer Lab (see the module doc). Public API:

    LayerLab(source=None, *, models=None, local_mode=False, threaded=True, state=None)
    lab.widget / display(lab)       the view
    lab.set(**values)               change controls from Python (validated; one recompute)
    lab.state() / lab.state_query() the whole state, as a dict / a URL query string
    LayerLab.from_query(qs)         rebuild a lab from a query string (bad values are listed in the page)
    lab.goto(k), lab.step(+1), lab.next_boundary("group" | "block"), lab.highlight(col)
    lab.apply_preset(name), lab.wait(), lab.run (the current Run), lab.summary (its numbers)
    lab.apply_method(name)          set the knobs of a method of layer_methods.METHODS
    lab.data, lab.pair              the layer's data; both models' inputs (GPTAQ), None until asked for
    lab.compare(), lab.compare_rows every method on this layer (the compare view); animate_method(name)
    lab.set(hessian=1)              the Hessian view (layer_hessian); lab.hessian_numbers, its numbers
    lab.view(name)                  a heatmap's (z, rows, cols) as plotted, name in HEATMAPS
    lab.presenter = True            presenter mode (layer_room: also the P key; the keys, Save picture)
    lab.config()                    the QuantConfig the controls show
    LayerLab.KNOBS                  the knobs it shows; lab.controls[name] is a knob's control
    """

    NAME = "LayerLab"
    KNOBS = KNOBS
    CONFIG_KEYS = CONFIG_KEYS
    VIEW_RULES = VIEW_RULES
    DEFAULTS = DEFAULTS
    FIXES = {"Cancelled": "Nothing to fix: the previous layer stays on screen.",
             **dict.fromkeys(("ModelLoadError", "CorpusError", "UnsupportedModelError"), _NEEDS_NOTHING)}

    def __init__(self, source: LayerSource | None = None, *, models=None, local_mode: bool = False,
                 threaded: bool = True, state: dict | None = None, defer_load_s: float | None = None):
        self._init_dashboard()
        self.local_mode = bool(local_mode)
        self.threaded = bool(threaded)
        # A model's layer loads in the background; with defer_load_s it starts only once the figure has
        # drawn itself in a browser (or after that many seconds): the load (torch's import, forward
        # passes) otherwise takes the CPU and the kernel's attention from the page that is opening.
        self.defer_load_s = defer_load_s
        self._deferred: ModelSource | None = None
        self.summary: dict = {}
        self._lock = threading.RLock()
        self._job = None
        self._runs: OrderedDict = OrderedDict()
        self._hover: int | None = None
        self._structures: dict[str, tuple[int, list[str]]] = {}
        self._last_window = None

        source = source or SyntheticSource()
        self._synthetic = source if isinstance(source, SyntheticSource) else SyntheticSource()
        self._model_options = model_options(models, source)
        values = {**DEFAULTS, **{k: v for k, v in (state or {}).items() if k in DEFAULTS}}
        values.update(state_of_source(source))
        self._build_controls(values)
        conflict = self._resolve_conflicts(None)  # a link may name two column orders
        pending = self._load_first(source)
        self._set_source_controls(state_of_source(self._source))
        self._shown_source_values = self._source_values()
        self.run = self._first_run()
        self._sync_slider_ranges()
        self._build_figures()
        self._build_layout()
        self._render_full()
        if self.check_value("hessian", values["hessian"]):
            self.controls["hessian"].value = True  # a link opened the Hessian view
        if pending is not None:
            self._load_later(pending)
        if conflict:
            self._info(conflict)

    def _load_later(self, pending: ModelSource) -> None:
        self._set_source_controls(state_of_source(pending))
        self._info(f"Loading {html.escape(pending.name)} in the background; showing a synthetic layer "
                   "meanwhile.")
        if self.defer_load_s is None:
            self._start_source_job(pending)
        else:
            self._deferred = pending  # started by the figure's first answer, or by this timer
            timer = threading.Timer(self.defer_load_s, self._start_deferred_load)
            timer.daemon = True
            timer.start()

    @property
    def job(self):
        """The background load running now, or None."""
        return self._job

    # -----------------------------------------------------------------------------------------------------
    # state

    @property
    def col(self) -> int:
        return int(self.controls["col"].value)

    @classmethod
    def parse_query(cls, query: str, *, local_mode: bool = False, models=None) -> tuple[dict, list[str]]:
        """(values, problems) from a query string: unknown keys and bad values are listed, not applied."""
        allowed = {SYNTHETIC, *(curated_models() if models is None else
                                (models if not isinstance(models, dict) else models.keys()))}
        return super().parse_query(query, local_mode=local_mode, allowed_models=allowed)

    @classmethod
    def _parse_value(cls, key: str, raw: str, *, local_mode: bool = False, allowed_models=()):
        if key == "model":
            if raw not in allowed_models and not (local_mode and Path(raw).is_dir()):
                raise LabInputError(f"'{raw}' is not one of the offered models")
            return raw
        if key == "sublayer":
            if not raw.replace(".", "").replace("_", "").replace("x", "").isalnum():
                raise LabInputError(f"'{raw}' is not a sublayer name")
            return raw
        return cls.check_value(key, raw)

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
        else:
            lab = cls(source=cls._source_of({**DEFAULTS, **values}), state=values, **kwargs)
        if problems:
            lab._info("Some settings in the link were not used: "
                      + "; ".join(html.escape(p) for p in problems))
        return lab

    @staticmethod
    def _source_of(values: dict) -> LayerSource:
        if values["model"] == SYNTHETIC:
            block = int(values["block"])
            return SyntheticSource(seed=block if 0 <= block < SYNTHETIC_BLOCKS else 0)
        return ModelSource(model=values["model"], block=values["block"], sublayer=values["sublayer"],
                           corpus=values["corpus"], nsamples=values["nsamples"])

    def _options_for(self, key: str, model: str) -> list | None:
        """The allowed blocks or sublayers of a model, or None while its structure is not known yet."""
        options = self._structure_options(model)
        return None if options is None else options[0 if key == "block" else 1]

    def _validate(self, key: str, value, values: dict):
        """The value a control would take, or LabInputError saying what is allowed."""
        if key in ("block", "sublayer"):
            value = as_int(value) if key == "block" else str(value)
            opts = self._options_for(key, values.get("model", self.controls["model"].value))
            if opts is not None and value not in opts:
                raise LabInputError(f"{key} must be one of {opts}, got {value!r}")
            if key == "block" and value < 0:
                raise LabInputError(f"block must be >= 0, got {value}")
            return value
        return super()._validate(key, value, values)

    def _validate_all(self, values: dict) -> dict:
        """Every value checked, and the config they make together (GAR and desc_act are two orders, GAR needs
        groups): InputError before anything changes."""
        clean = super()._validate_all(values)
        knobs = {k: self.controls[k].value for k in CONFIG_KEYS}
        try:
            QuantConfig.from_dict({**knobs, **{k: v for k, v in clean.items() if k in CONFIG_KEYS}})
        except ValueError as exc:
            raise LabInputError(str(exc)) from None
        return clean

    @guarded
    def _apply(self, clean: dict) -> None:
        """What `set` does with checked values: a layer change reloads the layer, a config change re-runs
        GPTQ once, a view change redraws."""
        c = self.controls
        model_changed = "model" in clean and clean["model"] != c["model"].value
        source_change = any(k in SOURCE_KEYS and clean[k] != c[k].value for k in clean)
        with self._quietly():
            if model_changed:
                self._set_source_controls({"model": clean["model"]})
            for key in clean:
                if key != "model":
                    self._set_control(key, clean[key])
        if "fps" in clean:
            self.fig.fps = int(clean["fps"])
        self._sync_method()
        if any(k in clean for k in (*SOURCE_KEYS, *CONFIG_KEYS)):
            self._mark_custom()
        if source_change:
            self._initial_view = {k: clean[k] for k in ("col", "row0") if k in clean}
            explicit = "block" in clean or "sublayer" in clean
            self._source_changed(changed="model" if model_changed and not explicit else None)
        elif any(k in CONFIG_KEYS for k in clean):
            self._recompute()
        elif "basis" in clean:
            self._render_full()
        elif any(k in clean for k in ("col", *VIEW_KEYS)):
            self._render_frame(force=True)
        if "hessian" in clean:
            self._sync_hessian()

    # -----------------------------------------------------------------------------------------------------
    # runs

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

    def _first_run(self) -> Run:
        cfg = self.config()
        return self._get_run(self._source, self._data_for(cfg), cfg)

    def _recompute(self, clear: bool = False) -> None:
        """Run the controls' config on the layer shown (cached runs come back at once) and draw it. GPTAQ on
        a model's layer first needs its second capture: a background job, which comes back here."""
        cfg = self.config()
        data = self._data_for(cfg)
        if data is None:
            self._start_pair_job(self._source)
            return
        run = self._get_run(self._source, data, cfg)
        with self._lock:
            self.run = run
            self._sync_slider_ranges()
            self._render_full()
        if run.warnings:
            self._info("<br>".join(html.escape(w) for w in run.warnings))
        elif clear or (self.message.value and not self._job):
            self._clear_message()
        self._mark_compare_stale()
        self._hessian_changed()

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
    # navigation and presets (public)

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
    def apply_method(self, name: str) -> None:
        """Set the knobs of a method (layer_methods.METHODS); bits, group size, grid, damping stay."""
        values = {k: self.controls[k].value for k in self.CONFIG_KEYS}
        self.set(**method_values(name, values))

    @guarded
    def apply_preset(self, name: str) -> None:
        values, blurb = self._preset(name)
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
        super().wait(timeout)
        for job in (self._compare_job, self._hessian_job):
            if job is not None:
                job.join(timeout)
