"""Sweeps: one layer's output error over a grid of configs (bits x group size, optionally x desc_act, x
damping or x method), GPTQ next to RTN, plus whole-model perplexity wherever a shipped or computed report
has it.

    from gptq_explorer.ui import Sweeps
    sw = Sweeps(layer_lab)        # follows the Layer Lab's current layer and its sym / static groups
    sw.run()                      # background thread; progress bar and Cancel; cached per config
    sw                            # displays

Each cell quantizes the layer with the torch engine (gptq_quantize / rtn_quantize, backend="torch") and
measures the output MSE on the layer's HELD-OUT inputs, ||X_h W^T - X_h Q^T||^2 / numel, from the
held-out Hessian (metrics.output_mse_from_hessian): calibration and evaluation never share tokens.
Results are cached per (layer, config) for the whole process, so a sweep seen before redraws at once.
Charts are static plotly figures (common.StaticPlot); `sw.mse_plot.figure` / `sw.ppl_plot.figure` hold them.

The method axis (facet "method": GPTQ, + MSE grid, + GAR, GPTAQ, + rotation; layer_methods.METHODS names
them) needs what GPTAQ needs: the layer's inputs in the quantized model and in the full-precision one
(source.load_pair(): the layers before it quantized with RTN 4-bit g128). So on that axis every method runs
on the quantized model's inputs, as whole-model GPTQ does, and every cell measures how far the layer's
held-out output is from the full-precision model's, ||X_fp W^T - X Q^T||^2 / numel (what GPTAQ fits;
LayerData.heldout_fp_mse). Its RTN column rounds on each method's grid and basis (RTN + MSE grid, RTN +
rotation). GAR has nothing to order per row: that column is left out. The same holds for any sweep whose
base config (the Layer Lab's) has GPTAQ on. The perplexity panel then shows the shipped method table
(services.results.method_runs, its own reduced protocol) by method and config.
"""

from __future__ import annotations

import html
import threading
import time
from collections import OrderedDict

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..engine import QuantConfig, gptq_quantize, rtn_quantize
from ..metrics.layer_error import output_mse_from_hessian
from ..models.catalog import DEFAULT_MODEL
from ..services.layer_source import SYNTHETIC, UPSTREAM_LABEL, Cancelled, LayerData, SyntheticSource
from ..services.reports import describe_report
from ..services.results import method_label, method_runs
from ..services.threads import single_blas_thread
from ..settings import BEYOND_PAPER_KEYS, KNOBS, defaults
from .common import (
    Dashboard,
    InputError,
    Job,
    ProgressBar,
    StaticPlot,
    guarded,
    info_html,
    message_html,
    message_widget,
)
from .layer_methods import method_values

SWEEP_BITS = (2, 3, 4, 8)
SWEEP_GROUPS = (-1, 256, 128, 64, 32)
SWEEP_METHODS = ("GPTQ", "GPTQ + MSE grid", "GPTQ + GAR", "GPTAQ", "GPTQ + rotation")  # layer_methods' names
FACETS = {
    "none": [None],
    "desc_act": [False, True],
    "damp_percent": [0.001, 0.01, 0.1],
    "method": list(SWEEP_METHODS),
}
FACET_LABEL = {"none": "(none)", "desc_act": "desc_act off / on", "damp_percent": "damping 0.1% / 1% / 10%",
               "method": "method: GPTQ, +MSE, +GAR, GPTAQ, +rotation"}
CORPORA = KNOBS["corpus"].offered  # the corpora the dashboards offer
MAX_CACHED = 5000
_CACHE: OrderedDict = OrderedDict()  # (layer key, QuantConfig) -> (gptq mse, rtn mse, seconds)
_CACHE_LOCK = threading.Lock()


def _short(v: float) -> str:
    """A cell's number in at most 6 characters (a narrow page's cells are ~40 px): 0.061, 2.1e-4."""
    if v != 0 and abs(v) < 0.01:
        mantissa, exp = f"{v:.1e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{v:.2g}"


def _group_label(g: int) -> str:
    return "per row" if g == -1 else f"g{g}"


def cell_config(base: QuantConfig, facet: str, value, bits: int,
                group_size: int) -> tuple[QuantConfig | None, str]:
    """(the config of one cell of the sweep, "") or (None, why the cell is left out). The base config's
    other settings stay; per row there are no static groups and nothing for GAR to order, and GAR gives
    way to desc_act (two orders)."""
    values = {**base.to_dict(), "bits": bits, "group_size": group_size}
    if facet == "method":
        if value == "GPTQ + GAR" and group_size == -1:
            return None, "GAR orders groups; per row there is one"
        values.update(method_values(value, values))
    elif facet != "none":
        values[facet] = value
    if group_size == -1 or base.group_size == -1:
        values["static_groups"] = False
    if group_size == -1 or values["desc_act"]:
        values["group_aware"] = False
    return QuantConfig(**values), ""


def cell(data: LayerData, key: tuple, cfg: QuantConfig) -> tuple[float, float]:
    """(GPTQ, RTN) held-out output MSE of one config on one layer (cached). With the full-precision stream
    (source.load_pair()) the distance from the full-precision model's output instead, and GPTAQ can run."""
    ck = (key, cfg)
    with _CACHE_LOCK:
        if ck in _CACHE:
            _CACHE.move_to_end(ck)
            return _CACHE[ck][:2]
    import torch

    t0 = time.perf_counter()
    W = torch.tensor(data.W, dtype=torch.float32)  # copies (the cached arrays are read-only)
    H = torch.tensor(data.H, dtype=torch.float32)
    import warnings

    dXXT = torch.tensor(data.dXXT, dtype=torch.float32) if cfg.gptaq_alpha > 0 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a raised damping is reported by the Layer Lab, not per cell
        q_gptq = gptq_quantize(W, H, cfg, dXXT, backend="torch").weight
    q_rtn = rtn_quantize(W, cfg, backend="torch").weight
    if data.has_fp:
        measure = data.heldout_fp_mse
    else:
        def measure(Q):
            return output_mse_from_hessian(data.W, Q, data.H_heldout)
    out = (measure(q_gptq.double().numpy()), measure(q_rtn.double().numpy()), time.perf_counter() - t0)
    with _CACHE_LOCK:
        _CACHE[ck] = out
        while len(_CACHE) > MAX_CACHED:
            _CACHE.popitem(last=False)
    return out[:2]


def cached(key: tuple, cfg: QuantConfig) -> tuple[float, float] | None:
    with _CACHE_LOCK:
        v = _CACHE.get((key, cfg))
    return None if v is None else v[:2]


class Sweeps(Dashboard):
    """The Sweeps view (see the module doc). Public API:

    Sweeps(layer_lab=None, *, source=None, model_lab=None, threaded=True, autorun=False)
    sw.run() / sw.cancel() / sw.wait()   the sweep (background); sw.set(facet=..., corpus=...)
    sw.grid                              {facet value: {"gptq": (bits x groups), "rtn": ..., "ratio": ...}}
                                         (on the method axis "gptq" holds the method's own error)
    sw.mse_plot / sw.ppl_plot            StaticPlot (figure + output widget)
    sw.perplexity_grid                   {"rtn" / "gptq": (bits x groups)} of the perplexity panel; on the
                                         method axis {"rows": methods, "cols": (bits, group, sym), "z": ...}
    source: a LayerSource to sweep when there is no Layer Lab (tests, notebooks).
    """

    NAME = "Sweeps"
    CHOICES = {"facet": list(FACETS), "corpus": list(CORPORA)}  # what `set` takes

    def __init__(self, layer_lab=None, *, source=None, model_lab=None, threaded: bool = True,
                 autorun: bool = False, model: str | None = None, cache_dir=None):
        self.layer_lab = layer_lab
        self.model_lab = model_lab
        if source is None and layer_lab is None:
            source = SyntheticSource()
        self._source = source
        self._model = model
        self._cache_dir = cache_dir
        self.threaded = bool(threaded)
        self._init_dashboard()
        self.job: Job | None = None
        self.last_outcome: str | None = None
        self.grid: dict = {}
        self.cells_done = 0
        self._build()
        self.mse_plot.show(self._mse_figure())
        self.refresh_perplexity()
        self._show_cached()
        if autorun:
            self.run()

    # -----------------------------------------------------------------------------------------------------

    def _build(self) -> None:
        W = widgets
        self.facet = W.Dropdown(options=[(FACET_LABEL[k], k) for k in FACETS], value="none",
                                description="third axis", layout=W.Layout(width="300px"),
                                style={"description_width": "75px"})
        self.corpus = W.Dropdown(options=list(CORPORA), value="prose", description="perplexity on",
                                 layout=W.Layout(width="220px"), style={"description_width": "90px"})
        self.run_button = W.Button(description="Sweep this layer", icon="play", button_style="primary",
                                   layout=W.Layout(width="160px"))
        self.run_button.on_click(lambda _b: self.run())
        self.refresh_button = W.Button(description="Refresh perplexity", icon="refresh",
                                       layout=W.Layout(width="160px"))
        self.refresh_button.on_click(lambda _b: self.refresh_perplexity())
        self.facet.observe(self._on_facet, names="value")
        self.corpus.observe(lambda _c: self.refresh_perplexity(), names="value")
        self.progress = ProgressBar(self.cancel)
        self.message = message_widget()
        self.layer_info = W.HTML(value="")
        # responsive: the page's width, not a fixed 980 px (a notebook's column is narrower)
        self.mse_plot = StaticPlot(responsive=True, layout=W.Layout(width="100%"))
        self.ppl_plot = StaticPlot(responsive=True, layout=W.Layout(width="100%"))
        self.root = W.VBox([
            W.HTML("<h3 style='margin:4px 0'>Sweeps</h3>"),
            self.message, self.progress.box,
            W.HBox([self.facet, self.run_button], layout=W.Layout(align_items="center")),
            self.layer_info, self.mse_plot.widget,
            W.HBox([self.corpus, self.refresh_button], layout=W.Layout(align_items="center")),
            self.ppl_plot.widget])

    # -----------------------------------------------------------------------------------------------------
    # what to sweep

    def _layer(self) -> tuple[LayerData, tuple, QuantConfig]:
        """(layer data, its cache key, the base config) from the Layer Lab, or the given source."""
        if self.layer_lab is not None:
            lab = self.layer_lab
            return lab.data, lab._source.key, lab.config()
        return self._source.load(), self._source.key, QuantConfig()

    def _layer_source(self):
        return self.layer_lab._source if self.layer_lab is not None else self._source

    def paired(self, base: QuantConfig | None = None) -> bool:
        """Whether this sweep runs on the quantized model's inputs and measures the distance from the
        full-precision output (the method axis, or GPTAQ in the base config), which needs the source's
        full-precision stream (load_pair)."""
        base = base or self._layer()[2]
        wanted = self.facet.value == "method" or base.gptaq_alpha > 0
        return wanted and hasattr(self._layer_source(), "load_pair")

    def configs(self, base: QuantConfig | None = None) -> list[tuple[object, int, int, QuantConfig | None]]:
        """[(facet value, bits, group size, config)] of the current sweep; config None for a cell left
        out (see cell_config; GPTAQ without the full-precision stream)."""
        base = base or self._layer()[2]
        facet, paired = self.facet.value, self.paired(base)
        out = []
        for fv in FACETS[facet]:
            for b in SWEEP_BITS:
                for g in SWEEP_GROUPS:
                    cfg, _why = cell_config(base, facet, fv, b, g)
                    out.append((fv, b, g, cfg if cfg is None or paired or not cfg.gptaq_alpha else None))
        return out

    def _measured_key(self, key: tuple, base: QuantConfig) -> tuple:
        """The cache key of the cells: the layer's, and "pair" where they are measured on both streams."""
        return (*key, "pair") if self.paired(base) else key

    def _model_name(self) -> str | None:
        if self._model is not None:
            return self._model
        if self.model_lab is not None:
            return self.model_lab.model
        if self.layer_lab is not None:
            m = self.layer_lab.state()["model"]
            return m if m != SYNTHETIC else DEFAULT_MODEL
        return DEFAULT_MODEL

    # -----------------------------------------------------------------------------------------------------
    # running

    def set(self, **values) -> None:
        """Change the third axis (facet) and the perplexity corpus; a bad value raises InputError (also
        shown in the page)."""
        for k, v in values.items():
            try:
                if k not in self.CHOICES:
                    raise InputError(f"unknown setting {k!r}; allowed: {list(self.CHOICES)}")
                if v not in self.CHOICES[k]:
                    raise InputError(f"{k} must be one of {self.CHOICES[k]}, got {v!r}")
            except InputError as exc:
                self.show_error(exc, "set")
                raise
            getattr(self, k).value = v

    @guarded
    def _on_facet(self, change) -> None:
        self._show_cached()
        if "method" in (change["old"], change["new"]):
            self.refresh_perplexity()

    def _collect(self, key, base) -> tuple[dict, int, int]:
        """The grid from the cache (NaN where a cell is missing or left out); (grid, cells present, cells
        to compute)."""
        cfgs = [c for c in self.configs(base) if c[3] is not None]
        facets = FACETS[self.facet.value]
        grid = {fv: {m: np.full((len(SWEEP_BITS), len(SWEEP_GROUPS)), np.nan) for m in ("gptq", "rtn")}
                for fv in facets}
        have = 0
        for fv, b, g, cfg in cfgs:
            v = cached(key, cfg)
            if v is not None:
                have += 1
                i, j = SWEEP_BITS.index(b), SWEEP_GROUPS.index(g)
                grid[fv]["gptq"][i, j], grid[fv]["rtn"][i, j] = v
        for fv in facets:
            with np.errstate(divide="ignore", invalid="ignore"):
                grid[fv]["ratio"] = grid[fv]["rtn"] / grid[fv]["gptq"]
        return grid, have, len(cfgs)

    def _show_cached(self, note: str = "") -> None:
        data, key, base = self._layer()
        grid, have, total = self._collect(self._measured_key(key, base), base)
        self.grid, self.cells_done = grid, have
        self.mse_plot.show(self._mse_figure(data.name, base, note or (
            "" if have == total else f"{have} of {total} cells computed: press 'Sweep this layer'")))
        self.layer_info.value = (
            f"<div style='font-size:13px'>Layer: <b>{html.escape(data.name)}</b> ({data.W.shape[0]}x"
            f"{data.W.shape[1]}; {data.X_calib.shape[0]} calibration, {data.X_heldout.shape[0]} held-out "
            f"tokens). Fixed: {'sym' if base.sym else 'asym'}, static groups "
            f"{'on' if base.static_groups else 'off'}, block size {base.block_size}"
            + ("" if self.facet.value == "desc_act" else f", desc_act {'on' if base.desc_act else 'off'}")
            + ("" if self.facet.value == "damp_percent" else f", damp {base.damp_percent:.3g}")
            + f". Colour: {html.escape(self._measure_text(base))} (log).{self._method_note(base)}</div>")

    def _measure_text(self, base: QuantConfig) -> str:
        if self.paired(base):
            return "held-out distance from the full-precision output, ||X_fp W^T - X Q^T||^2 per element"
        return "held-out output MSE"

    def _method_note(self, base: QuantConfig) -> str:
        """What the method axis (or GPTAQ in the base config) changes, in words, for the layer line."""
        if self.facet.value != "method" and base.gptaq_alpha == 0:
            return ""
        if not self.paired(base):
            return (" <b>GPTAQ is left out</b>: it needs the layer's inputs in the full-precision model too, "
                    "and this layer source has only one stream (no load_pair).")
        text = (f"<br>Every cell runs on the quantized model's inputs (the layers before this one "
                f"{html.escape(UPSTREAM_LABEL)}; captured when you press 'Sweep this layer'), which GPTAQ "
                "needs, and is compared with the full-precision model's output.")
        if self.facet.value == "method":
            text += (" The RTN column rounds on each method's grid and basis; GAR has nothing to order per "
                     "row (left out).")
        return text

    def run(self) -> None:
        """Compute the missing cells of the current sweep in the background."""
        if self.job is not None and self.job.outcome == "running":
            self.message.value = info_html("A sweep is already running: wait for it, or press Cancel.")
            return
        data, key, base = self._layer()
        paired, mkey = self.paired(base), self._measured_key(key, base)
        todo = [c for c in self.configs(base) if c[3] is not None and cached(mkey, c[3]) is None]
        job = Job(f"sweeping {data.name}")
        self.job = job
        if not todo:
            job.outcome = "done"
            job.finished.set()
            self.last_outcome = "done"
            self._show_cached()
            return
        self.progress.start(f"{job.label}: 0 of {len(todo)} configs")
        self.run_button.disabled = True
        self.message.value = ""

        def steps():
            measured = data
            if paired:  # the quantized model's inputs too (a capture for a real model; cached afterwards)
                def loading(f, text):
                    self.progress.set(0.0, f"{job.label}: the quantized model's inputs: {text}")

                measured = self._layer_source().load_pair(loading, job.cancel.is_set)
            with single_blas_thread():
                for n, (_fv, _b, _g, cfg) in enumerate(todo):
                    job.check()
                    cell(measured, mkey, cfg)
                    self.progress.set((n + 1) / len(todo),
                                      f"{job.label}: {n + 1} of {len(todo)} configs ({cfg.label()})")

        def finish():
            self.progress.stop()
            self.run_button.disabled = False
            if job.outcome == "cancelled":
                self._show_cached(note="cancelled: only the cells finished before Cancel are shown")
                self.message.value = message_html(Cancelled("the sweep stopped; finished cells are kept"),
                                                  where=job.label)
            elif job.outcome == "done":
                self._show_cached()

        self._start_job(job, steps, finish, "Sweeps-run")

    @guarded
    def cancel(self) -> None:
        if self.job is not None and self.job.outcome == "running":
            self.job.cancel.set()
            self.progress.label.value = "cancelling…"

    # -----------------------------------------------------------------------------------------------------
    # figures

    def _mse_figure(self, name: str = "", base: QuantConfig | None = None, note: str = "") -> go.Figure:
        facets = FACETS[self.facet.value] if hasattr(self, "facet") else [None]
        grid = self.grid or {}
        rows = len(facets)
        titles = []
        for fv in facets:
            if isinstance(fv, str):  # a method: its own name, and RTN on its grid and basis
                rtn = method_label("rtn", method_values(fv, {}))
                titles += [fv, rtn, f"{rtn} / {fv}"]
                continue
            tag = "" if fv is None else (f" — desc_act {'on' if fv else 'off'}" if isinstance(fv, bool)
                                         else f" — damp {fv:g}")
            titles += [f"GPTQ{tag}", f"RTN{tag}", f"RTN / GPTQ{tag}"]
        what = "distance from FP output" if base is not None and self.paired(base) else "held-out output MSE"
        # the MSE colour bar sits in the gap after the RTN panel (the ratio's after the last): the gap is
        # wide enough for a thin bar, its numbers and its title, so it never covers a heatmap
        fig = make_subplots(rows=rows, cols=3, subplot_titles=titles, horizontal_spacing=0.14,
                            vertical_spacing=0.12 if rows > 1 else 0.1)
        bar_x = fig.layout.xaxis2.domain[1] + 0.008
        x = [_group_label(g) for g in SWEEP_GROUPS]
        y = [f"{b}-bit" for b in SWEEP_BITS]
        all_mse = np.concatenate([np.ravel(grid[fv][m]) for fv in facets if fv in grid
                                  for m in ("gptq", "rtn")]) if grid else np.array([])
        finite = all_mse[np.isfinite(all_mse) & (all_mse > 0)]
        lo, hi = (np.log10(finite.min()), np.log10(finite.max())) if finite.size else (-6.0, 0.0)
        for r, fv in enumerate(facets, start=1):
            g = grid.get(fv) or {m: np.full((len(SWEEP_BITS), len(SWEEP_GROUPS)), np.nan)
                                 for m in ("gptq", "rtn", "ratio")}
            for c, m in enumerate(("gptq", "rtn", "ratio"), start=1):
                z = g[m]
                with np.errstate(divide="ignore", invalid="ignore"):
                    zl = np.log10(z)
                text = [["—" if not np.isfinite(v) else (f"{v:.2f}×" if m == "ratio" else _short(v))
                         for v in row] for row in z]
                common = dict(x=x, y=y, text=text, texttemplate="%{text}", textfont=dict(size=10),
                              customdata=z, name=m, showscale=(r == 1 and c != 2))
                if m == "ratio":
                    fig.add_trace(go.Heatmap(z=zl, colorscale="PiYG", zmid=0, zmin=-1, zmax=1,
                                             colorbar=dict(x=1.008, xanchor="left", len=0.8 / rows,
                                                           y=1 - 0.5 / rows, thickness=12,
                                                           title=dict(text="RTN/GPTQ", side="right"),
                                                           tickvals=[-1, 0, 1],
                                                           ticktext=["0.1×", "1×", "10×"]),
                                             hovertemplate="%{y} %{x}: RTN / GPTQ = %{customdata:.3g}"
                                                           "<extra></extra>", **common), row=r, col=c)
                else:
                    fig.add_trace(go.Heatmap(z=zl, colorscale="Viridis", zmin=lo, zmax=hi,
                                             colorbar=dict(x=bar_x, xanchor="left", len=0.8 / rows,
                                                           y=1 - 0.5 / rows, thickness=12,
                                                           title=dict(text="log10 MSE", side="right")),
                                             hovertemplate="%{y} %{x}: " + what + " %{customdata:.4g}"
                                                           "<extra>" + m.upper() + "</extra>", **common),
                                  row=r, col=c)
                fig.update_xaxes(title_text="group size" if r == rows else None, row=r, col=c)
                fig.update_yaxes(title_text="bits" if c == 1 else None, row=r, col=c)
        title = what[0].upper() + what[1:] + " of one layer" + (f": {name}" if name else "")
        if base is not None:
            title += f" ({'sym' if base.sym else 'asym'})"
        if note:
            title += f"<br><sup>{html.escape(note)}</sup>"
        fig.update_layout(width=980, height=140 + 230 * rows, template="plotly_white",
                          title=dict(text=title, font=dict(size=14)), margin=dict(l=70, r=30, t=80, b=50))
        return fig

    @guarded
    def refresh_perplexity(self) -> None:
        """Perplexity of whole-model runs over bits x group size, from shipped and computed reports (on the
        method axis: the shipped method table by method and config)."""
        from ..services.results import known_reports

        model = self._model_name()
        corpus = self.corpus.value
        reports = known_reports(model, self._cache_dir) if model else []
        if self.facet.value == "method":
            table = method_runs(model) if model else []
            fig, self.perplexity_grid = method_perplexity_figure(
                table, [r for r in reports if r["origin"] == "computed"], corpus, model)
        else:
            fig, self.perplexity_grid = perplexity_figure(reports, corpus, model)
        self.ppl_plot.show(fig)


# ---------------------------------------------------------------------------------------------------------
# the perplexity panel


def _paper_gptq(config: dict) -> bool:
    """The config uses none of the methods after GPTQ (a field missing from an older report: off)."""
    return all(config.get(k, v) == v for k, v in defaults(BEYOND_PAPER_KEYS).items())


def perplexity_figure(reports: list[dict], corpus: str, model: str | None) -> tuple[go.Figure, dict]:
    """RTN and GPTQ (the paper's: sym, desc_act off, no method after it) over bits x group size, a shipped
    report before a computed one; (figure, {"rtn" / "gptq": perplexity grid})."""
    cells: dict[str, dict] = {"rtn": {}, "gptq": {}}
    fp = {}
    for r in reports:
        p = (r.get("perplexity") or {}).get(corpus)
        if p is None or r.get("overrides"):
            continue
        if r.get("method") == "fp":
            fp.setdefault(r["origin"], p)
            continue
        c = r.get("config") or {}
        if r.get("method") not in cells or not c.get("sym", True) or c.get("desc_act") or not _paper_gptq(c):
            continue
        if c.get("bits") in SWEEP_BITS and c.get("group_size") in SWEEP_GROUPS:
            k = (c["bits"], c["group_size"])
            prev = cells[r["method"]].get(k)
            if prev is None or (prev[1] != "precomputed" and r["origin"] == "precomputed"):
                cells[r["method"]][k] = (p, r["origin"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=["RTN", "GPTQ"], horizontal_spacing=0.12)
    x = [_group_label(g) for g in SWEEP_GROUPS]
    y = [f"{b}-bit" for b in SWEEP_BITS]
    grid = {}
    vals = [v[0] for m in cells for v in cells[m].values()]
    lo, hi = (np.log10(min(vals)), np.log10(max(vals))) if vals else (0.0, 1.0)
    for c, m in enumerate(("rtn", "gptq"), start=1):
        z = np.full((len(SWEEP_BITS), len(SWEEP_GROUPS)), np.nan)
        origin = [["" for _ in SWEEP_GROUPS] for _ in SWEEP_BITS]
        for (b, g), (p, o) in cells[m].items():
            z[SWEEP_BITS.index(b), SWEEP_GROUPS.index(g)] = p
            origin[SWEEP_BITS.index(b)][SWEEP_GROUPS.index(g)] = o
        grid[m] = z
        text = [["—" if not np.isfinite(v) else f"{v:.1f}" + ("" if o == "precomputed" else "*")
                 for v, o in zip(row, orow)] for row, orow in zip(z, origin)]
        fig.add_trace(go.Heatmap(
            z=np.log10(z), x=x, y=y, text=text, texttemplate="%{text}", customdata=z, zmin=lo, zmax=hi,
            colorscale="Cividis", showscale=c == 2, name=m,
            colorbar=dict(title=dict(text="log10 ppl")),
            hovertemplate="%{y} %{x}: perplexity %{customdata:.3f}<extra>" + m.upper() + "</extra>"),
            row=1, col=c)
        fig.update_xaxes(title_text="group size", row=1, col=c)
        fig.update_yaxes(title_text="bits" if c == 1 else None, row=1, col=c)
    base = fp.get("precomputed") or fp.get("computed")
    sub = (f"FP: {base:.2f}. " if base else "") + ("— = no run yet (compute it in the Model Lab); "
                                                   "* = computed here with reduced settings")
    fig.update_layout(width=980, height=340, template="plotly_white",
                      title=dict(text=f"Whole-model perplexity on {corpus}, {html.escape(model or '')} "
                                      f"(sym, desc_act off)<br><sup>{sub}</sup>", font=dict(size=14)),
                      margin=dict(l=70, r=30, t=80, b=50))
    return fig, grid


def _method_order(label: str) -> tuple:
    return (not label.startswith("RTN"), label.count("+"), not label.startswith("GPTQ"), label)


def method_perplexity_figure(table: list[dict], computed: list[dict], corpus: str,
                             model: str | None) -> tuple[go.Figure, dict]:
    """Perplexity by method (rows: services.results.method_label) and config (columns: bits, group size,
    grid) from the shipped method table, and from reports computed here where the table has none (marked
    *: another protocol); (figure, {"rows", "cols", "z"})."""
    cells: dict[tuple, tuple[float, str]] = {}
    for origin, reports in (("methods", table), ("computed", computed)):
        for r in reports:
            p, c = (r.get("perplexity") or {}).get(corpus), r.get("config") or {}
            if p is None or r.get("overrides") or r.get("method") not in ("rtn", "gptq"):
                continue
            key = (method_label(r["method"], c), c.get("bits"), c.get("group_size"), c.get("sym", True))
            cells.setdefault(key, (p, origin))
    rows = sorted({k[0] for k in cells}, key=_method_order)
    cols = sorted({k[1:] for k in cells}, key=lambda t: (-t[0], t[1] == -1, t[1], not t[2]))
    z = np.full((len(rows), len(cols)), np.nan)
    text = [["—"] * len(cols) for _ in rows]
    for (label, *col), (p, origin) in cells.items():
        i, j = rows.index(label), cols.index(tuple(col))
        z[i, j] = p
        text[i][j] = f"{p:.2f}" + ("*" if origin == "computed" else "")
    x = [f"{b}-bit {_group_label(g)}" + ("" if sym else " asym") for b, g, sym in cols]
    fig = go.Figure()
    if cells:
        fig.add_trace(go.Heatmap(
            z=np.log10(z), x=x, y=rows, text=text, texttemplate="%{text}", customdata=z, colorscale="Cividis",
            name="methods", colorbar=dict(title=dict(text="log10 ppl")),
            hovertemplate="%{y}, %{x}: perplexity %{customdata:.3f}<extra></extra>"))
    else:
        fig.add_annotation(text="no method run shipped or computed for this model yet", x=0.5, y=0.5,
                           xref="paper", yref="paper", showarrow=False, font=dict(size=14, color="#888"))
    ref = next((r for r in table if r.get("calibration")), table[0] if table else None)
    protocol = f"shipped method table, reduced protocol: {describe_report(ref)}" if ref else "no shipped runs"
    sub = f"{protocol}; * = computed here with reduced settings (another protocol); — = no run"
    fig.update_layout(width=980, height=160 + 34 * max(len(rows), 3), template="plotly_white",
                      title=dict(text=f"Whole-model perplexity on {corpus} by method, "
                                      f"{html.escape(model or '')}<br><sup>{html.escape(sub)}</sup>",
                                 font=dict(size=14)),
                      margin=dict(l=190, r=30, t=80, b=50), yaxis=dict(autorange="reversed"))
    return fig, {"rows": rows, "cols": cols, "z": z}
