"""Sweeps: one layer's output error over a grid of configs (bits x group size, optionally x desc_act or x
damping), GPTQ next to RTN, plus whole-model perplexity wherever a shipped or computed report has it.

    from gptq_explorer.ui import Sweeps
    sw = Sweeps(layer_lab)        # follows the Layer Lab's current layer and its sym / static groups
    sw.run()                      # background thread; progress bar and Cancel; cached per config
    sw                            # displays

Each cell quantizes the layer with the torch engine (gptq_quantize / rtn_quantize, backend="torch") and
measures the output MSE on the layer's HELD-OUT inputs, ||X_h W^T - X_h Q^T||^2 / numel, from the
held-out Hessian (metrics.output_mse_from_hessian): calibration and evaluation never share tokens.
Results are cached per (layer, config) for the whole process, so a sweep seen before redraws at once.
Charts are static plotly figures (common.StaticPlot); `sw.mse_plot.figure` / `sw.ppl_plot.figure` hold them.
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
from ..services.layer_source import SYNTHETIC, Cancelled, LayerData, SyntheticSource
from ..services.threads import single_blas_thread
from ..settings import KNOBS
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

SWEEP_BITS = (2, 3, 4, 8)
SWEEP_GROUPS = (-1, 256, 128, 64, 32)
FACETS = {
    "none": [None],
    "desc_act": [False, True],
    "damp_percent": [0.001, 0.01, 0.1],
}
FACET_LABEL = {"none": "(none)", "desc_act": "desc_act off / on", "damp_percent": "damping 0.1% / 1% / 10%"}
CORPORA = KNOBS["corpus"].offered  # the corpora the dashboards offer
MAX_CACHED = 5000
_CACHE: OrderedDict = OrderedDict()  # (layer key, QuantConfig) -> (gptq mse, rtn mse, seconds)
_CACHE_LOCK = threading.Lock()


def _group_label(g: int) -> str:
    return "per row" if g == -1 else f"g{g}"


def cell(data: LayerData, key: tuple, cfg: QuantConfig) -> tuple[float, float]:
    """(GPTQ, RTN) held-out output MSE of one config on one layer (cached)."""
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a raised damping is reported by the Layer Lab, not per cell
        q_gptq = gptq_quantize(W, H, cfg, backend="torch").weight
    q_rtn = rtn_quantize(W, cfg, backend="torch").weight
    Hh = data.H_heldout
    out = (output_mse_from_hessian(data.W, q_gptq.double().numpy(), Hh),
           output_mse_from_hessian(data.W, q_rtn.double().numpy(), Hh), time.perf_counter() - t0)
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
    sw.mse_plot / sw.ppl_plot            StaticPlot (figure + output widget)
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
        self.mse_plot = StaticPlot()
        self.ppl_plot = StaticPlot()
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

    def configs(self, base: QuantConfig | None = None) -> list[tuple[object, int, int, QuantConfig]]:
        """[(facet value, bits, group size, config)] of the current sweep."""
        base = base or self._layer()[2]
        facet = self.facet.value
        out = []
        for fv in FACETS[facet]:
            for b in SWEEP_BITS:
                for g in SWEEP_GROUPS:
                    change = {"bits": b, "group_size": g}
                    if facet != "none":
                        change[facet] = fv
                    if change.get("group_size") == -1 or base.group_size == -1:
                        change.setdefault("static_groups", False)
                    out.append((fv, b, g, base.replace(**change)))
        return out

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
    def _on_facet(self, _change) -> None:
        self._show_cached()

    def _collect(self, key, base) -> tuple[dict, int, int]:
        """The grid from the cache (NaN where a cell is missing); (grid, cells present, cells total)."""
        cfgs = self.configs(base)
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
        grid, have, total = self._collect(key, base)
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
            + ". Colour: held-out output MSE (log).</div>")

    def run(self) -> None:
        """Compute the missing cells of the current sweep in the background."""
        if self.job is not None and self.job.outcome == "running":
            self.message.value = info_html("A sweep is already running: wait for it, or press Cancel.")
            return
        data, key, base = self._layer()
        todo = [c for c in self.configs(base) if cached(key, c[3]) is None]
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
            with single_blas_thread():
                for n, (_fv, _b, _g, cfg) in enumerate(todo):
                    job.check()
                    cell(data, key, cfg)
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
            tag = "" if fv is None else (f" — desc_act {'on' if fv else 'off'}" if isinstance(fv, bool)
                                         else f" — damp {fv:g}")
            titles += [f"GPTQ{tag}", f"RTN{tag}", f"RTN / GPTQ{tag}"]
        fig = make_subplots(rows=rows, cols=3, subplot_titles=titles, horizontal_spacing=0.09,
                            vertical_spacing=0.12 if rows > 1 else 0.1)
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
                text = [["—" if not np.isfinite(v) else (f"{v:.2f}×" if m == "ratio" else f"{v:.2g}")
                         for v in row] for row in z]
                common = dict(x=x, y=y, text=text, texttemplate="%{text}", textfont=dict(size=10),
                              customdata=z, name=m, showscale=(r == 1 and c != 2))
                if m == "ratio":
                    fig.add_trace(go.Heatmap(z=zl, colorscale="PiYG", zmid=0, zmin=-1, zmax=1,
                                             colorbar=dict(x=1.0, len=0.8 / rows, y=1 - 0.5 / rows,
                                                           title=dict(text="RTN/GPTQ"), tickvals=[-1, 0, 1],
                                                           ticktext=["0.1×", "1×", "10×"]),
                                             hovertemplate="%{y} %{x}: RTN / GPTQ = %{customdata:.3g}"
                                                           "<extra></extra>", **common), row=r, col=c)
                else:
                    fig.add_trace(go.Heatmap(z=zl, colorscale="Viridis", zmin=lo, zmax=hi,
                                             colorbar=dict(x=0.62, len=0.8 / rows, y=1 - 0.5 / rows,
                                                           title=dict(text="log10 MSE")),
                                             hovertemplate="%{y} %{x}: held-out output MSE %{customdata:.4g}"
                                                           "<extra>" + m.upper() + "</extra>", **common),
                                  row=r, col=c)
                fig.update_xaxes(title_text="group size" if r == rows else None, row=r, col=c)
                fig.update_yaxes(title_text="bits" if c == 1 else None, row=r, col=c)
        title = "Held-out output MSE of one layer" + (f": {name}" if name else "")
        if base is not None:
            title += f" ({'sym' if base.sym else 'asym'})"
        if note:
            title += f"<br><sup>{html.escape(note)}</sup>"
        fig.update_layout(width=980, height=140 + 230 * rows, template="plotly_white",
                          title=dict(text=title, font=dict(size=14)), margin=dict(l=70, r=30, t=80, b=50))
        return fig

    @guarded
    def refresh_perplexity(self) -> None:
        """Perplexity of whole-model runs over bits x group size, from shipped and computed reports."""
        from ..services.results import known_reports

        model = self._model_name()
        corpus = self.corpus.value
        reports = known_reports(model, self._cache_dir) if model else []
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
            if r.get("method") not in cells or not c.get("sym", True) or c.get("desc_act"):
                continue
            if c.get("bits") in SWEEP_BITS and c.get("group_size") in SWEEP_GROUPS:
                k = (c["bits"], c["group_size"])
                prev = cells[r["method"]].get(k)
                if prev is None or (prev[1] != "precomputed" and r["origin"] == "precomputed"):
                    cells[r["method"]][k] = (p, r["origin"])
        fig = make_subplots(rows=1, cols=2, subplot_titles=["RTN", "GPTQ"], horizontal_spacing=0.12)
        x = [_group_label(g) for g in SWEEP_GROUPS]
        y = [f"{b}-bit" for b in SWEEP_BITS]
        self.perplexity_grid = {}
        vals = [v[0] for m in cells for v in cells[m].values()]
        lo, hi = (np.log10(min(vals)), np.log10(max(vals))) if vals else (0.0, 1.0)
        for c, m in enumerate(("rtn", "gptq"), start=1):
            z = np.full((len(SWEEP_BITS), len(SWEEP_GROUPS)), np.nan)
            origin = [["" for _ in SWEEP_GROUPS] for _ in SWEEP_BITS]
            for (b, g), (p, o) in cells[m].items():
                z[SWEEP_BITS.index(b), SWEEP_GROUPS.index(g)] = p
                origin[SWEEP_BITS.index(b)][SWEEP_GROUPS.index(g)] = o
            self.perplexity_grid[m] = z
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
        self.ppl_plot.show(fig)
