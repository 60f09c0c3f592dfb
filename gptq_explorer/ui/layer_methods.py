"""The quantization methods the Layer Lab names, and its compare view: every method on the current layer.

A method is a setting of the method knobs (settings.py: mse_norm, group_aware, gptaq_alpha, rotation,
rotation_seed, ternary); the other knobs (bits, group size, grid, damping, order) stay as the lab has them.
`METHODS` names them, `method_values` gives the knob values that select one, and `method_of` names the
method the knobs show (COMBINED when they match none, e.g. MSE grid and GPTAQ together).

The compare view (`compare_methods`, drawn by `LayerCompare`) quantizes the current layer with RTN and every
method, on the same data, and reports for each:
  * the held-out output MSE on the full-precision model's inputs (what the Layer Lab's summary shows);
  * the held-out distance from the full-precision model's output when the layer is fed the quantized
    model's inputs (load_pair(): the layers before it quantized with RTN 4-bit g128), ||X_fp W^T - X Q^T||^2
    per element. GPTAQ exists for this one: it is the only column where it can be measured;
  * the time the method took (the NumPy engine, one thread).
One click on a row animates that method (its knobs are set).
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable

import ipywidgets as widgets
import numpy as np

from .. import settings
from ..engine import QuantConfig, gptq_quantize, rtn_quantize
from ..metrics.layer_error import output_mse_from_hessian
from ..services.layer_source import UPSTREAM_LABEL, Cancelled, LayerData
from ..services.threads import single_blas_thread
from .common import InputError, Job, ProgressBar, guarded, run_job

METHOD_KEYS = ("mse_norm", "group_aware", "gptaq_alpha", "rotation", "rotation_seed", "ternary")
COMBINED = "(combination)"  # what the method menu shows when the knobs match no single method
GAR_GROUP = 128  # the group size GAR gets when the grid is per row (GAR orders groups)

# name -> (the method knobs it changes from their defaults, one line on what it does)
METHODS: dict[str, tuple[dict, str]] = {
    "GPTQ": ({}, "The 2022 algorithm: round one column, spread its error over the columns not yet done."),
    "GPTQ + MSE grid": (
        {"mse_norm": 2.4},
        "Each group's range shrunk to the one with the least sum |w - q|^2.4 (the reference's grid search) "
        "instead of min-max."),
    "GPTQ + GAR": (
        {"group_aware": True},
        "Groups in order of their largest diag(H), columns inside a group by diag(H): act-order's benefit "
        "with groups kept together (g_idx = i // group size)."),
    "GPTAQ": (
        {"gptaq_alpha": 0.25},
        "Fit the full-precision model's output, not only this layer's own: each step also moves the later "
        "columns by w (x) P (alpha 0.25, GPTQModel's default)."),
    "GPTQ + rotation": (
        {"rotation": "hadamard"},
        "Quantize W R^T for inputs R x (a randomized Hadamard R): an outlier is spread over every column of "
        "its block, so the grid fits typical weights."),
    "ternary": ({"ternary": True}, "Three values per row and group, {min, 0, max} (the reference's trits); "
                "bits is ignored."),
}


def method_values(name: str, values: dict) -> dict:
    """The knob values that select method `name`, given the lab's current `values`: every method knob at
    its default except the method's own; GAR also turns desc_act off (they are two orders) and gives a
    per-row grid groups of GAR_GROUP (it orders groups)."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; methods: {list(METHODS)}")
    out = {**settings.defaults(METHOD_KEYS), **METHODS[name][0]}
    if name == "GPTQ + GAR":
        out["desc_act"] = False
        if values.get("group_size") == -1:
            out["group_size"] = GAR_GROUP
    return out


def method_of(values: dict) -> str:
    """The method whose knobs `values` shows (the rotation seed counts only with a rotation), or COMBINED."""
    def key(v: dict) -> tuple:
        return tuple(v.get(k) for k in METHOD_KEYS if k != "rotation_seed" or v.get("rotation"))

    for name, (changes, _) in METHODS.items():
        if key({**settings.defaults(METHOD_KEYS), **changes}) == key(values):
            return name
    return COMBINED


def method_configs(cfg: QuantConfig) -> list[tuple[str, QuantConfig | None, str]]:
    """(method, its config from the lab's `cfg`, why it is left out or ""), for the compare view: GAR has
    nothing to order with one group per row, so it is left out there rather than compared at another
    group size."""
    values = cfg.to_dict()
    out = []
    for name in METHODS:
        if name == "GPTQ + GAR" and cfg.group_size == -1:
            out.append((name, None, "GAR orders groups; per-row grids have one"))
            continue
        out.append((name, QuantConfig(**{**values, **method_values(name, values)}), ""))
    return out


def compare_methods(plain: LayerData, pair: LayerData, cfg: QuantConfig,
                    progress: Callable[[float, str], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> list[dict]:
    """RTN and every method on one layer: a row each, {method, config (None for RTN or a method left out),
    heldout (on the full-precision inputs; None for GPTAQ, which needs the quantized model's), heldout_fp
    (vs the full-precision output, on the quantized model's inputs), seconds, note}. `plain` holds the
    layer's full-precision inputs, `pair` both streams (source.load_pair())."""
    progress = progress or (lambda f, text: None)
    base = cfg.replace(**settings.defaults(METHOD_KEYS))
    rows = [_rtn_row(plain, pair, base)]
    methods = method_configs(cfg)
    for i, (name, mcfg, why) in enumerate(methods):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled")
        progress((i + 1) / (len(methods) + 1), f"comparing methods: {name}")
        if mcfg is None:
            rows.append({"method": name, "config": None, "heldout": None, "heldout_fp": None, "seconds": None,
                         "note": why})
            continue
        gptaq = mcfg.gptaq_alpha > 0
        t0 = time.perf_counter()
        res = gptq_quantize(pair.W, pair.H, mcfg, dXXT=pair.dXXT if gptaq else None)
        seconds = time.perf_counter() - t0
        heldout = None
        if not gptaq:  # GPTAQ's fit needs the quantized model's inputs: nothing to measure on these
            heldout = output_mse_from_hessian(plain.W, gptq_quantize(plain.W, plain.H, mcfg).weight,
                                              plain.H_heldout)
        note = "needs the quantized model's inputs: only the right column" if gptaq else ""
        rows.append({"method": name, "config": mcfg, "heldout": heldout,
                     "heldout_fp": pair.heldout_fp_mse(res.weight), "seconds": seconds, "note": note})
    return rows


def _rtn_row(plain: LayerData, pair: LayerData, base: QuantConfig) -> dict:
    t0 = time.perf_counter()
    rtn = rtn_quantize(pair.W, base)
    seconds = time.perf_counter() - t0
    heldout = output_mse_from_hessian(plain.W, rtn.weight, plain.H_heldout)
    return {"method": "RTN", "config": None, "heldout": heldout,
            "heldout_fp": pair.heldout_fp_mse(rtn.weight), "seconds": seconds,
            "note": "round to nearest on the same grid: the baseline"}


# ---------------------------------------------------------------------------------------------------------
# the compare view


def _num(v) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.3g}"


class LayerCompare:
    """The compare view of LayerLab (a mixin): `compare_button` opens `compare_box` (the table, its own
    progress bar and Cancel), `compare()` fills it (in the background when the lab is threaded), and each
    method's button animates it (`animate_method`). Uses the lab's `data`, `pair`, `_source`, `config()`,
    `set`, `goto`, `play`, `fig`, `threaded`, `_lock` and `show_error`."""

    def _build_compare(self) -> None:
        W = widgets
        self.compare_rows: list[dict] = []
        self._compare_job: Job | None = None
        self._compare_key = None
        self.compare_button = W.Button(description="Compare methods", icon="table",
                                       layout=W.Layout(width="160px"),
                                       tooltip="every method on this layer: held-out error and time")
        self.compare_button.on_click(lambda _b: self.compare())
        self.compare_status = W.HTML(value="")
        self.compare_progress = ProgressBar(self._cancel_compare, width="200px")
        columns = "150px 150px 190px 70px 90px 1fr"  # method, two errors, time, the button, a note
        self.compare_table = W.GridBox(layout=W.Layout(grid_template_columns=columns, grid_gap="2px 8px",
                                                       align_items="center"))
        close = W.Button(description="close", layout=W.Layout(width="70px"))
        close.on_click(lambda _b: self._close_compare())
        self.compare_box = W.VBox([W.HBox([W.HTML("<b>All methods on this layer</b>"), close],
                                          layout=W.Layout(align_items="center")),
                                   self.compare_status, self.compare_progress.box, self.compare_table],
                                  layout=W.Layout(display="none", border="1px solid #ccc", padding="4px 8px",
                                                  margin="4px 0"))
        self.compare_box.add_class("gptq-compare")

    def _compare_config(self) -> QuantConfig:
        """What the compare view's rows share: the lab's config with every method knob at its default."""
        return self.config().replace(**settings.defaults(METHOD_KEYS))

    @guarded
    def compare(self) -> None:
        """Open the compare view and fill it for the current layer and config (a background job when the
        lab is threaded; wait() waits for it)."""
        self.compare_box.layout.display = "flex"
        self._cancel_compare()
        source, plain, pair, cfg = self._source, self.data, self.pair, self.config()
        key = (source.key, self._compare_config())
        job = Job("comparing methods")
        self._compare_job = job
        self.compare_progress.start("comparing methods")
        self.compare_status.value = (f"<span style='color:#555'>{html.escape(plain.name)}, "
                                     f"{html.escape(key[1].label())}: computing…</span>")

        def work():
            try:
                def progress(f: float, text: str) -> None:
                    if job is self._compare_job:
                        self.compare_progress.set(f, text)

                both = pair if pair is not None else source.load_pair(progress, job.cancel.is_set)
                with single_blas_thread():
                    rows = compare_methods(plain, both, cfg, progress, job.cancel.is_set)
                if job is self._compare_job:
                    with self._lock:
                        if self._source.key == source.key and self.pair is None:
                            self.pair = both  # GPTAQ's data, ready when its button is pressed
                    self._show_compare(rows, key, plain, both)
            except Exception as exc:  # noqa: BLE001 - shown in the page, never raised into the kernel
                if job is self._compare_job:
                    self.compare_status.value = ""
                    self.show_error(exc, where="compare")
            finally:
                if job is self._compare_job:
                    self.compare_progress.stop()
                    self._compare_job = None

        run_job(job, work, self.threaded, "LayerLab-compare")

    def _show_compare(self, rows: list[dict], key, plain: LayerData, pair: LayerData) -> None:
        W = widgets
        self.compare_rows, self._compare_key = rows, key
        best = min((r["heldout_fp"] for r in rows if r["heldout_fp"] is not None), default=None)
        head = ["method", "held-out MSE<br><small>full-precision inputs</small>",
                f"vs full-precision output<br><small>inputs after {UPSTREAM_LABEL} upstream</small>",
                "time (s)", "", "note"]
        cells = [W.HTML(f"<b>{h}</b>") for h in head]
        for r in rows:
            fp = _num(r["heldout_fp"])
            if r["heldout_fp"] is not None and r["heldout_fp"] == best:
                fp = f"<b>{fp}</b>"
            button = W.Button(description="animate", layout=W.Layout(width="85px"),
                              tooltip=f"set the knobs of {r['method']} and play it")
            button.add_class("gptq-animate")
            if r["config"] is None:
                button.disabled = True
                button.layout.visibility = "hidden"
            else:
                button.on_click(lambda _b, name=r["method"]: self.animate_method(name))
            row = [W.HTML(html.escape(r["method"])), W.HTML(_num(r["heldout"])), W.HTML(fp),
                   W.HTML(_num(r["seconds"])), button,
                   W.HTML(f"<small style='color:#555'>{html.escape(r['note'])}</small>")]
            for cell in row:
                cell.add_class("gptq-compare-cell")
            cells += row
        self.compare_table.children = cells
        cfg = key[1]
        self.compare_status.value = (
            f"<span class='gptq-compare-done' style='color:#555'>{html.escape(plain.name)}, "
            f"{html.escape(cfg.label())} and each method's knobs, the same data for every method: "
            f"{plain.X_heldout.shape[0]} held-out tokens. The right column feeds the layer the quantized "
            f"model's inputs (the layers before it {UPSTREAM_LABEL}) and compares with the full-precision "
            "model's output.</span>")

    def _mark_compare_stale(self) -> None:
        """After a layer or config change: a table for other settings says so (the method knobs do not
        count: every row sets its own)."""
        if self._compare_key is None or self.compare_box.layout.display == "none":
            return
        if self._compare_key != (self._source.key, self._compare_config()):
            self.compare_status.value = ("<span style='color:#8a6d3b'>This table is for other settings or "
                                         "another layer: press <b>Compare methods</b> again.</span>")

    @guarded
    def animate_method(self, name: str) -> None:
        """Set the knobs of method `name` (the others stay) and play it from the first column; when the
        browser asks for reduced motion (layer_room), only set it up at the first column."""
        values = {k: self.controls[k].value for k in self.CONFIG_KEYS}
        self.set(**method_values(name, values))
        self.goto(0)
        room = getattr(self, "room", None)
        if room is not None and room.reduced_motion:
            self._info(f"<b>{html.escape(name)}</b> is set up at the first column: press Play (or Space) to "
                       "animate it (your browser asks for reduced motion).")
            return
        self.play.playing = True
        self.fig.playing = True

    def _cancel_compare(self) -> None:
        if self._compare_job is not None:
            self._compare_job.cancel.set()
            self._compare_job = None
            self.compare_progress.stop()

    def _close_compare(self) -> None:
        self._cancel_compare()
        self.compare_box.layout.display = "none"
