"""The Layer Lab's one figure: five cropped heatmaps, the current column, diag(H) and the running errors.

One FigureWidget (each ships plotly.js, ~5 MB, and anywidget gives each model 2 s to initialize: a
second figure failed to initialize on a loaded machine and never updated). Built complete as a go.Figure
and then wrapped; afterwards only `plotly_update` in callbacks, one message per frame.

Cost per frame, measured here: plotly.js redraws the whole figure on every data update, so the
browser, not Python, bounds the frame rate. Hence: fixed axis ranges (no autorange), and the cursor and
hover highlights are ONE path shape each, in paper coordinates, spanning every heatmap and diag(H),
instead of ten overlay traces (that alone cut the browser's redraw by a third). In Python, arrays travel
as float32 typed-array specs, which plotly.py passes through without per-element validation.

Grid (3 rows x 6 columns):  W | updated | Q  /  error | compensation | column profile  /  diag(H) | curves
Traces: 0-4 heatmaps (HEATMAPS order), 5-7 profile (w, q, w - q), 8 diag(H), 9 cursor marker on
diag(H), 10 GPTQ curve, 11 RTN curve. Shapes: 0 cursor path, 1 hover path, 2 crop band on diag(H).
"""

from __future__ import annotations

import base64
import threading
from copy import deepcopy

import numpy as np
import plotly.graph_objects as go
from plotly.basedatatypes import Undefined
from plotly.subplots import make_subplots

from .layer_run import Run, Window

HEATMAPS = ("W", "updated", "Q", "error", "compensation")
COLORS = {
    "w": "#1f77b4",  # weights being updated
    "q": "#ff7f0e",  # quantized values
    "err": "#d62728",  # quantization error w - q
    "hinv": "#9467bd",  # H / H^-1 terms, diag(H)
    "upd": "#2ca02c",  # the compensation (OBS update), GPTQ
    "rtn": "#7f7f7f",
    "cursor": "#111111",
    "hover": "#e377c2",
}
HEATMAP_TITLES = {
    "W": ("W (original)", "#444"),
    "updated": ("weights being updated", COLORS["w"]),
    "Q": ("Q(W) so far", COLORS["q"]),
    "error": ("error w − q", COLORS["err"]),
    "compensation": ("compensation ΔW just applied", COLORS["upd"]),
}
TR_PROFILE, TR_DIAG, TR_MARK, TR_GPTQ, TR_RTN = 5, 8, 9, 10, 11
SH_CURSOR, SH_HOVER, SH_BAND = 0, 1, 2
WIDTH, HEIGHT = 820, 860
FIGURE_CLASS = "gptq-layer-figure"


def spec(a) -> dict:
    """A plotly typed-array spec (float32, base64): plotly.py passes it through without validating each
    element (6x faster per assignment than a numpy array) and plotly.js decodes it."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = {"dtype": "f4", "bdata": base64.b64encode(a.tobytes()).decode("ascii")}
    if a.ndim > 1:
        out["shape"] = ",".join(str(s) for s in a.shape)
    return out


def array(v) -> np.ndarray:
    """The numbers of a trace property: a typed-array spec, a numpy array or a list."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(s) for s in v["shape"].split(",")]) if "shape" in v else a
    return np.asarray(v if v is not None else [], dtype=np.float64)


EMPTY = spec(np.zeros(0))


def _axis(i: int, kind: str = "x") -> str:
    return f"{kind}axis{i if i > 1 else ''}"


class LabFigure:
    """Owns the FigureWidget; knows which trace is which. All updates go through `_update`."""

    def __init__(self, run: Run, k: int, win: Window, fr: dict, on_hover, on_click, lock=None):
        titles = [HEATMAP_TITLES[h][0] for h in HEATMAPS] + [
            "column p: w, q, w − q", "diag(H): how much each input is used",
            "output error of the partly quantized layer"]
        two = [{"colspan": 2}, None]
        fig = make_subplots(rows=3, cols=6, specs=[two * 3, two * 3, [{"colspan": 3}, None, None] * 2],
                            subplot_titles=titles, horizontal_spacing=0.07, vertical_spacing=0.085,
                            row_heights=[0.35, 0.35, 0.30])
        for i, name in enumerate(HEATMAPS):
            caxis = {"error": "coloraxis2", "compensation": "coloraxis3"}.get(name, "coloraxis")
            fig.add_trace(go.Heatmap(
                z=spec(fr[name]), x=spec(win.cols), y=spec(win.rows), coloraxis=caxis, name=name,
                hovertemplate="row %{y}, position %{x}<br>%{z:.4g}<extra>" + name + "</extra>"),
                row=i // 3 + 1, col=2 * (i % 3) + 1)
        for name, color, mode in (("w", COLORS["w"], "lines+markers"), ("q", COLORS["q"], "markers"),
                                  ("w − q", COLORS["err"], "lines")):
            fig.add_trace(go.Scatter(x=EMPTY, y=EMPTY, mode=mode, name=name, legendgroup="column",
                                     line=dict(color=color, width=1.5), marker=dict(size=4, color=color)),
                          row=2, col=5)
        fig.add_trace(go.Scatter(x=EMPTY, y=EMPTY, mode="lines", name="diag(H)", showlegend=False,
                                 line=dict(color=COLORS["hinv"], width=1.5),
                                 hovertemplate="position %{x}: diag(H) = %{y:.4g}<extra></extra>"),
                      row=3, col=1)
        fig.add_trace(go.Scatter(x=EMPTY, y=EMPTY, mode="markers", name="cursor", showlegend=False,
                                 hoverinfo="skip", marker=dict(size=9, color=COLORS["cursor"])), row=3, col=1)
        for name, color in (("GPTQ", COLORS["upd"]), ("RTN", COLORS["rtn"])):
            fig.add_trace(go.Scatter(x=EMPTY, y=EMPTY, mode="lines", name=name, legendgroup="curves",
                                     line=dict(color=color, width=2),
                                     hovertemplate="after %{x}: %{y:.4g}<extra>" + name + "</extra>"),
                          row=3, col=4)
        for i, h in enumerate(HEATMAPS):
            fig.layout.annotations[i].font = dict(color=HEATMAP_TITLES[h][1], size=13)
        fig.layout.annotations[5].font = dict(color="#444", size=13)
        fig.layout.annotations[6].font = dict(color=COLORS["hinv"], size=13)
        fig.layout.annotations[7].font = dict(color="#444", size=13)
        for i in range(1, 6):
            fig.layout[_axis(i)].update(autorange=False, showgrid=False)
            fig.layout[_axis(i, "y")].update(autorange=False, showgrid=False)
        cb = dict(thickness=10, len=0.3)
        fig.update_layout(
            width=WIDTH, height=HEIGHT, margin=dict(l=45, r=110, t=40, b=45), template="plotly_white",
            legend=dict(x=1.02, y=0.3, yanchor="top", font=dict(size=11), tracegroupgap=12),
            coloraxis=dict(colorscale="RdBu_r", colorbar=dict(x=1.02, y=0.83, title=dict(text="w"), **cb)),
            coloraxis2=dict(colorscale="RdBu_r", cmid=0,
                            colorbar=dict(x=1.02, y=0.5, title=dict(text="w−q"), **cb)),
            coloraxis3=dict(colorscale="PiYG", cmid=0,
                            colorbar=dict(x=1.12, y=0.5, title=dict(text="ΔW"), **cb)),
            yaxis=dict(title=dict(text="row", font=dict(size=11), standoff=4)),
            yaxis4=dict(title=dict(text="row", font=dict(size=11), standoff=4)),
            xaxis4=dict(title=dict(text="position p", font=dict(size=11), standoff=4)),
            xaxis5=dict(title=dict(text="position p", font=dict(size=11), standoff=4)),
            yaxis7=dict(type="log", dtick=1, exponentformat="power"),
            xaxis6=dict(title=dict(text="row", font=dict(size=11), standoff=4)),
            xaxis7=dict(title=dict(text="position p", font=dict(size=11), standoff=4)),
            xaxis8=dict(title=dict(text="columns quantized", font=dict(size=11), standoff=4)),
            # log: the running error grows by orders of magnitude; linear left the first columns at 0
            yaxis8=dict(type="log", dtick=1, exponentformat="power",
                        title=dict(text="calibration output MSE", font=dict(size=11), standoff=8)),
            shapes=[
                dict(type="path", xref="paper", yref="paper", path="M 0 0", line=dict(color=COLORS["cursor"],
                                                                                      width=2)),
                dict(type="path", xref="paper", yref="paper", path="M 0 0", visible=False,
                     line=dict(color=COLORS["hover"], width=2, dash="dot")),
                dict(type="rect", xref="x7", yref="y7 domain", x0=0, x1=1, y0=0, y1=1, layer="below",
                     fillcolor="rgba(17,17,17,0.08)", line=dict(width=0)),
            ],
        )
        # paper coordinates of the grid, for the highlight paths
        lay = fig.layout
        self._dom = {i: (tuple(lay[_axis(i)].domain), tuple(lay[_axis(i, "y")].domain)) for i in range(1, 9)}
        self._callbacks = (on_hover, on_click)
        self.on_answer = None  # called with each of the view's answers {"trace_edit_id": ...}
        self._lock = lock if lock is not None else threading.RLock()
        self.adopt(go.FigureWidget(fig))
        self.win: Window | None = None
        self.n = run.n

    def adopt(self, widget: go.FigureWidget) -> None:
        """Use this FigureWidget (built complete) from now on; wires the hover/click callbacks. The class
        gptq-layer-figure lets the page probe find it (layer_lab: the watchdog)."""
        on_hover, on_click = self._callbacks
        self.widget = widget
        for i in range(len(HEATMAPS)):
            widget.data[i].on_hover(on_hover)
        widget.data[TR_DIAG].on_hover(on_hover)
        widget.data[TR_DIAG].on_click(on_click)
        widget.add_class(FIGURE_CLASS)
        # Messages from the browser (hover points, plotly's trace deltas) are applied by ipywidgets inside
        # traitlets' hold_trait_notifications(), which is per object, not per thread: an update another
        # thread sends meanwhile (the Layer Lab's background model load) sets _py2js_update to the message
        # and back to None, the hold collapses the two into None, and the message is never sent: the page
        # kept the synthetic layer's diag(H) after the model loaded (~40% of the browser test's runs). So
        # the browser's messages are applied under the same lock as every figure update.
        original = widget.set_state
        # plotly's view answers every update with "deltas": the values plotly.js filled in. Nothing here
        # reads them, and plotly's own handler fails on them (it cannot merge a delta into our typed-array
        # props: an AssertionError that IPython formatted as a coloured traceback on every animation frame,
        # ~40% of the kernel's time, and the page drew 2 frames/s). So they are dropped here; the edit id
        # they answer goes to on_answer (the Layer Lab's figure watchdog).
        def set_state(sync_data, _original=original, _lock=self._lock, _fig=self):
            answer = None
            if isinstance(sync_data, dict) and ("_js2py_traceDeltas" in sync_data
                                                or "_js2py_layoutDelta" in sync_data):
                sync_data = dict(sync_data)
                answer = sync_data.pop("_js2py_traceDeltas", None)
                sync_data.pop("_js2py_layoutDelta", None)
            if sync_data:
                with _lock:
                    _original(sync_data)
            if isinstance(answer, dict) and _fig.on_answer is not None:
                _fig.on_answer(answer)

        widget.set_state = set_state

    def resend(self) -> None:
        """Send the view the whole current state in one message (data arrays of every trace, axes, colour
        axes, shapes, titles). plotly_update sends only what differs from the Python side, which already
        holds this state, so this goes through plotly's own message call (FigureWidget._send_update_msg)."""
        fig = self.widget
        idx = list(range(len(fig.data)))
        restyle = {p: [fig._data[i].get(p, Undefined) for i in idx] for p in ("x", "y", "z")}
        keep = ("xaxis", "yaxis", "coloraxis", "shapes", "annotations")
        relayout = {k: deepcopy(v) for k, v in fig._layout.items() if k.startswith(keep)}
        fig._send_update_msg(restyle, relayout, idx)

    def fresh_copy(self) -> go.FigureWidget:
        """A new FigureWidget holding this one's current state, complete at construction (nothing needs to
        be sent to it afterwards, so a browser that is already connected draws it whole)."""
        return go.FigureWidget(self.widget.to_dict())

    # -----------------------------------------------------------------------------------------------------

    def _update(self, traces: dict[int, dict], layout: dict) -> None:
        """One plotly_update (one message): traces {index: {prop: value}}, layout {path: value}."""
        idx = sorted(traces)
        props = sorted({p for d in traces.values() for p in d})
        restyle = {p: [traces[i].get(p, Undefined) for i in idx] for p in props}
        self.widget.plotly_update(restyle_data=restyle or None, relayout_data=layout or None,
                                  trace_indexes=idx or None)

    def _column_path(self, col: int | None, win: Window) -> str:
        """SVG path (paper coordinates) boxing column `col` in every heatmap and marking it on diag(H)."""
        if col is None:
            return "M 0 0"
        parts = []
        if win.c0 <= col < win.c1:
            frac0, frac1 = (col - win.c0) / (win.c1 - win.c0), (col + 1 - win.c0) / (win.c1 - win.c0)
            for g in range(3):
                (a, b), (_, top) = self._dom[g + 1]
                bottom = self._dom[g + 4][1][0] if g < 2 else self._dom[g + 1][1][0]
                x0, x1 = a + frac0 * (b - a), a + frac1 * (b - a)
                parts.append(f"M {x0:.5f} {bottom:.5f} H {x1:.5f} V {top:.5f} H {x0:.5f} Z")
        (a, b), (lo, hi) = self._dom[7]
        x = a + (col + 0.5) / self.n * (b - a)
        parts.append(f"M {x:.5f} {lo:.5f} V {hi:.5f}")
        return " ".join(parts)

    def full(self, run: Run, desc_act: bool) -> None:
        """What changes with the run: diag(H), the curves' axes, the colour ranges, the titles."""
        self.n = run.n
        pos = spec(np.arange(run.n))
        wmax = float(np.percentile(np.abs(run.W0), 99.5)) or 1.0
        emax = float(np.percentile(np.abs(run.Wq - run.Q), 99.5)) or 1.0
        top = float(max(run.curve_gptq[-1], run.curve_rtn[-1], 1e-30))
        both = np.concatenate([run.curve_gptq, run.curve_rtn])
        low = float(both[both > 0].min()) if np.any(both > 0) else top * 1e-6
        order = "desc_act order: decreasing diag(H)" if desc_act else "column order"
        d = run.diag_h
        lo, hi = float(d[d > 0].min()) if np.any(d > 0) else 1e-6, float(d.max()) or 1.0
        self._update(
            {TR_DIAG: {"x": pos, "y": spec(d)}, TR_GPTQ: {"x": pos}, TR_RTN: {"x": pos}},
            {"xaxis7.range": [-0.5, run.n - 0.5], "xaxis8.range": [-0.5, run.n - 0.5],
             "yaxis7.range": [np.log10(lo * 0.8), np.log10(hi * 1.25)],
             "yaxis8.range": [np.log10(low * 0.8), np.log10(top * 1.25)],
             "coloraxis.cmin": -wmax, "coloraxis.cmax": wmax,
             "coloraxis2.cmin": -emax, "coloraxis2.cmax": emax,
             "annotations[6].text": f"diag(H), {order}"})
        self.win = None

    def frame(self, run: Run, k: int, win: Window, fr: dict, hover: int | None) -> None:
        """One animation frame (one message): 4 small z matrices (5 and the coordinates when the crop
        moved), the column profile, the marker on diag(H), the two curves and the cursor path."""
        moved = win != self.win
        traces: dict[int, dict] = {}
        layout: dict = {"shapes[0].path": self._column_path(k, win)}
        for i, name in enumerate(HEATMAPS):
            if name != "W" or moved:
                traces[i] = {"z": spec(fr[name])}
        w, q = run.Wq[win.r0:win.r1, k], run.Q[win.r0:win.r1, k]
        for i, vals in enumerate((w, q, w - q)):
            traces[TR_PROFILE + i] = {"y": spec(vals)}
        traces[TR_MARK] = {"x": spec([k]), "y": spec([run.diag_h[k]])}
        g = np.full(run.n, np.nan, np.float32)
        r = g.copy()
        g[: k + 1] = run.curve_gptq[: k + 1]
        r[: k + 1] = run.curve_rtn[: k + 1]
        traces[TR_GPTQ], traces[TR_RTN] = {"y": spec(g)}, {"y": spec(r)}
        if moved:
            cols, rows = spec(win.cols), spec(win.rows)
            for i in range(len(HEATMAPS)):
                traces[i].update(x=cols, y=rows)
                layout[f"{_axis(i + 1)}.range"] = [win.c0 - 0.5, win.c1 - 0.5]
                layout[f"{_axis(i + 1, 'y')}.range"] = [win.r1 - 0.5, win.r0 - 0.5]
            for i in range(3):
                traces[TR_PROFILE + i]["x"] = rows
            layout["xaxis6.range"] = [win.r0 - 0.5, win.r1 - 0.5]
            layout["shapes[2].x0"], layout["shapes[2].x1"] = win.c0 - 0.5, win.c1 - 0.5
            layout["shapes[1].path"] = self._column_path(hover, win)
            layout["shapes[1].visible"] = hover is not None
        self._update(traces, layout)
        self.win = win

    def hover(self, col: int | None, win: Window) -> None:
        path = self._column_path(col, win)
        self._update({}, {"shapes[1].path": path, "shapes[1].visible": col is not None})

    def sync(self) -> None:
        """Make the synced state equal to the Python state.

        plotly's FigureWidget syncs its full data only at construction and when displayed on its own;
        inside a container, changes made before the browser connects (Voila) would be lost. Assigning
        these traits updates the model that a connecting browser reads (live views ignore them)."""
        fig = self.widget
        fig._widget_layout = deepcopy(fig._layout_obj._props)
        fig._widget_data = deepcopy(fig._data)

    def view(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tr = self.widget.data[HEATMAPS.index(name)]
        return array(tr.z).astype(np.float64), array(tr.y).astype(int), array(tr.x).astype(int)
