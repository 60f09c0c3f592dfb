"""The Layer Lab's one figure: five cropped heatmaps, the current column, diag(H) and the running errors.

Drawn by a small widget of our own (LayerCanvas: an anywidget whose ESM, layer_canvas.js, draws on one
canvas), not plotly: plotly.js re-lays-out its whole 8-panel figure on every call, far too slow for an
animation whatever changed (docs/performance.md), and its FigureWidget ships a
5 MB copy of plotly.js that had to start within anywidget's start-up deadline on a loaded machine. The canvas
draws a frame in a few milliseconds, and its ESM is small.

Two synced traits carry the state, as float32 bytes (binary widget buffers, no JSON lists):
  scene  what changes with the run: diag(H), the two running error curves (whole; the view draws them up to
         the cursor), the colour ranges, the axes' ranges, the diag(H) title;
  frame  one animation step: the cursor k, the crop window, the five heatmaps' z (GPTAQ: and its
         correction, a sixth), the column profile.
What a method adds travels in the scene: the titles of a rotated run's views (its basis, or back in the
original one), diag(H) before the rotation, GAR's groups as bands on the diag(H) strip.
and `hover` (both ways: the view sets it when the mouse is over a column; Python sets it for highlight()).
The view answers {"event": "drawn", "seq"} (at most 4 times a second, and the last frame always) and
{"event": "click", "col"}.

Grid:  W | updated | Q  /  error | compensation | column profile  /  diag(H) | curves
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import anywidget
import ipywidgets as widgets
import numpy as np
import traitlets

from .layer_run import Run, Window

HEATMAPS = ("W", "updated", "Q", "error", "compensation")  # every run; GPTAQ's adds "correction"
ROTATED_TITLES = {"W": "W Rᵀ (the rotated layer)", "updated": "W Rᵀ being updated"}
ORIGINAL_TITLES = {"W": "W (original basis)", "updated": "layer so far, · R", "Q": "Q so far, · R",
                   "error": "error so far, · R", "compensation": "ΔW just applied, · R",
                   "obs": "OBS update, · R", "correction": "GPTAQ correction, · R"}
COLORS = {  # the same names and colours as layer_canvas.js (the explanation text uses them)
    "w": "#1f77b4",  # weights being updated
    "q": "#ff7f0e",  # quantized values
    "err": "#d62728",  # quantization error w - q
    "hinv": "#9467bd",  # H / H^-1 terms, diag(H)
    "upd": "#2ca02c",  # the compensation (OBS update), GPTQ
    "corr": "#17becf",  # GPTAQ's correction (and plain GPTQ beside GPTAQ in the summary)
    "rtn": "#7f7f7f",
    "cursor": "#111111",
    "hover": "#e377c2",
}
# The same colours, darker where needed, for text on white (the explanation, the summary): WCAG AA asks a
# contrast of 4.5:1 for text, which the orange, green, purple, cyan and grey above do not reach
TEXT_COLORS = {**COLORS, "q": "#b35900", "hinv": "#7b4fa8", "upd": "#237f23", "corr": "#0e7c86",
               "rtn": "#666666"}
FIGURE_CLASS = "gptq-layer-figure"
# its box: grows to the canvas's own size, shrinks with the page (the canvas follows its width; the text
# beside it goes under it below FIGURE_BASIS, layer_controls)
FIGURE_BASIS = "640px"
FIGURE_LAYOUT = {"flex": f"1 1 {FIGURE_BASIS}", "min_width": "0", "max_width": "860px"}
# layer_canvas.js imports its picture from layer_canvas_paint.js; an anywidget's ESM is one text: the
# import line is replaced by that file, its exports made local names (services/site_export.py does the same)
_CANVAS = Path(__file__).with_name("layer_canvas.js")
ESM = re.sub(r'^import \{[^}]*\} from "\./(layer_canvas_\w+\.js)";\n',
             lambda m: re.sub(r"^export ", "", _CANVAS.with_name(m.group(1)).read_text(encoding="utf-8"),
                              flags=re.M),
             _CANVAS.read_text(encoding="utf-8"), flags=re.M)


def f32(a) -> bytes:
    """float32 bytes of an array (a binary buffer of the widget message; NaN stays NaN)."""
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def from_f32(b) -> np.ndarray:
    return np.frombuffer(bytes(b), dtype=np.float32).astype(np.float64)


class LayerCanvas(anywidget.AnyWidget):
    """The canvas view (layer_canvas.js). Set `scene` and `frame` (see the module docstring)."""

    _esm = traitlets.Unicode(ESM).tag(sync=True)
    scene = traitlets.Dict().tag(sync=True)
    frame = traitlets.Dict().tag(sync=True)
    hover = traitlets.Int(-1).tag(sync=True)
    # the animation clock runs in the page (layer_canvas.js): `playing` and `cursor` are jslinked to the
    # Play control's playing and value; while playing the view advances `cursor` at `fps` through frames
    # the kernel sent ahead, so no step waits for a round trip to the kernel
    cursor = traitlets.Int(0).tag(sync=True)
    playing = traitlets.Bool(False).tag(sync=True)
    fps = traitlets.Int(15).tag(sync=True)
    seq = traitlets.Int(0)  # frames sent, kernel side only: the view answers with the seq it drew


def _log_range(values: np.ndarray, fallback: float = 1e-6) -> list[float]:
    pos = values[np.isfinite(values) & (values > 0)]
    lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (fallback, 1.0)
    return [float(np.log10(lo * 0.8)), float(np.log10(hi * 1.25))]


def method_scene(run: Run, basis: str) -> dict:
    """The scene's part that depends on the method: the diag(H) strip's title, GAR's groups (bands of
    positions [start, end) with the original group each one is), a rotated run's titles and its diag(H)
    before the rotation."""
    cfg = run.cfg
    if cfg.desc_act:
        order = "desc_act order: decreasing diag(H)"
    elif cfg.group_aware:
        order = "GAR order: groups kept together"
    else:
        order = "column order"
    out: dict = {"diag_title": f"diag(H), {order}", "basis": "", "titles": {}, "bands": []}
    if cfg.group_aware:
        ends = [*run.group_starts[1:], run.n]
        width = cfg.group_width(run.n)
        out["bands"] = [[int(a), int(b), int(run.perm[a]) // width] for a, b in zip(run.group_starts, ends)]
    if run.R is not None:
        out["basis"] = basis
        out["titles"] = ORIGINAL_TITLES if basis == "original" else ROTATED_TITLES
        out["diag_title"] = f"diag(R H Rᵀ), {order}"
        out["diag_h_orig"] = f32(run.diag_h_orig)
    return out


class LabFigure:
    """Owns the LayerCanvas widget; all updates go through full() (per run) and frame() (per step)."""

    def __init__(self, run: Run, k: int, win: Window, fr: dict, on_hover, on_click, lock=None,
                 basis: str = "rotated"):
        self._callbacks = (on_hover, on_click)
        self.on_answer = None  # called with each of the view's answers {"trace_edit_id": seq}
        self._lock = lock if lock is not None else threading.RLock()
        self.win: Window | None = None
        self.n = run.n
        self._fr: dict[str, np.ndarray] = {}
        self.gen = 0  # frames of one generation share the run and the crop settings (layer_canvas.js)
        self._ahead_upto = -1  # the last column sent ahead in this generation
        self._ahead_from = 0
        self._crop: tuple | None = None
        self.adopt(LayerCanvas())
        self.full(run, basis)
        self.frame(run, k, win, fr, None)

    def adopt(self, widget: LayerCanvas) -> None:
        """Use this widget from now on; wires the view's messages. The class gptq-layer-figure lets the page
        probe find it (layer_lab: the watchdog)."""
        on_hover, on_click = self._callbacks
        self.widget = widget
        widget.add_class(FIGURE_CLASS)
        widget.layout = widgets.Layout(**FIGURE_LAYOUT)

        def on_msg(_widget, content, _buffers, _fig=self):
            if not isinstance(content, dict):
                return
            if content.get("event") == "drawn" and _fig.on_answer is not None:
                _fig.on_answer({"trace_edit_id": content.get("seq")})
            elif content.get("event") == "click":
                on_click(content.get("col"))

        widget.on_msg(on_msg)
        widget.observe(lambda ch: on_hover(None if ch["new"] < 0 else ch["new"]), names="hover")
        # Messages from the browser (the hover position) are applied by ipywidgets inside traitlets'
        # hold_trait_notifications(), which is per object, not per thread: an update another thread sends
        # meanwhile (the Layer Lab's background model load) could be merged with it. So the browser's
        # messages are applied under the same lock as every figure update.
        original = widget.set_state

        def set_state(sync_data, _original=original, _lock=self._lock):
            with _lock:
                _original(sync_data)

        widget.set_state = set_state

    def fresh_copy(self) -> LayerCanvas:
        """A new widget holding this one's current state."""
        w = self.widget
        return LayerCanvas(scene=dict(w.scene), frame=dict(w.frame), hover=w.hover, seq=w.seq,
                           cursor=w.cursor, playing=w.playing, fps=w.fps)

    # -----------------------------------------------------------------------------------------------------

    def full(self, run: Run, basis: str = "rotated") -> None:
        """What changes with the run (or a rotated run's basis): diag(H), the curves, the colour ranges, the
        axes, the titles."""
        self.n = run.n
        self.gen += 1
        self._ahead_upto = -1
        wmax = float(np.percentile(np.abs(run.W0), 99.5)) or 1.0
        emax = float(np.percentile(np.abs(run.Wq - run.Q), 99.5)) or 1.0
        both = np.concatenate([run.curve_gptq, run.curve_rtn])
        diags = run.diag_h if run.R is None else np.r_[run.diag_h, run.diag_h_orig]  # both lines fit
        self.widget.scene = {
            "n": int(run.n), "d_out": int(run.d_out), "diag_h": f32(run.diag_h),
            "curve_gptq": f32(run.curve_gptq), "curve_rtn": f32(run.curve_rtn),
            "wmax": wmax, "emax": emax, "diag_range": _log_range(diags),
            # the top is the larger final error: the curves grow by orders of magnitude (hence log)
            "curves_range": [_log_range(both)[0], float(np.log10(max(run.curve_gptq[-1], run.curve_rtn[-1],
                                                                     1e-30) * 1.25))],
            "gen": self.gen, "label": run.cfg.label(), **method_scene(run, basis),
        }
        self.win = None

    def new_crop(self) -> None:
        """The crop settings changed: frames sent ahead with the old ones are void."""
        self.gen += 1
        self._ahead_upto = -1
        self.widget.scene = {**self.widget.scene, "gen": self.gen}

    def frame(self, run: Run, k: int, win: Window, fr: dict, hover: int | None, sent: bool = False) -> None:
        """One animation frame (one message): the five crops, the column profile, the cursor. sent=True: the
        view already has this frame (sent ahead while playing): keep it here, send nothing."""
        crop = (win.r0, win.r1, win.c1 - win.c0)
        if crop != self._crop:
            if self._crop is not None:
                self.new_crop()  # other rows or another width: frames sent ahead are void
            self._crop = crop
        self._fr = {name: np.asarray(z, dtype=np.float64) for name, z in fr.items()}
        self._shown = (k, win)
        widget = self.widget
        if sent:
            self.win = win
            return
        with widget.hold_sync():
            widget.seq += 1
            widget.frame = {"seq": widget.seq, **self._frame_state(run, k, win, fr)}
            widget.hover = -1 if hover is None else int(hover)
        self.win = win

    def _frame_state(self, run: Run, k: int, win: Window, fr: dict) -> dict:
        w, q = run.Wq[win.r0:win.r1, k], run.Q[win.r0:win.r1, k]
        return {"gen": self.gen, "k": int(k), "r0": win.r0, "r1": win.r1, "c0": win.c0, "c1": win.c1,
                "z": {name: f32(z) for name, z in fr.items()}, "w": f32(w), "q": f32(q)}

    def has_sent(self, k: int) -> bool:
        """Whether the view got column k's frame ahead, in this generation."""
        return self._ahead_from <= k <= self._ahead_upto

    def send_ahead(self, run: Run, k: int, make, count: int) -> int:
        """Send the view the frames after column k it does not have yet (up to k + count), in one message;
        make(j) -> (window, heatmaps) of column j. Returns how many were sent."""
        if k < self._ahead_from:  # a jump back: the view may have dropped those frames
            self._ahead_upto = -1
        self._ahead_from = k
        start, stop = max(k, self._ahead_upto) + 1, min(k + count, run.n - 1)
        if stop < start:
            return 0
        metas, buffers, names = [], [], None
        for j in range(start, stop + 1):
            win, fr = make(j)
            st = self._frame_state(run, j, win, fr)
            names = names or list(st["z"])  # one run: the same views in every frame
            metas.append({key: v for key, v in st.items() if key not in ("z", "w", "q")})
            buffers += [st["z"][name] for name in names] + [st["w"], st["q"]]
        self.widget.send({"event": "ahead", "gen": self.gen, "names": names, "frames": metas},
                         buffers=buffers)
        self._ahead_upto = stop
        return stop - start + 1

    def hover(self, col: int | None, win: Window) -> None:
        self.widget.hover = -1 if col is None else int(col)

    # -----------------------------------------------------------------------------------------------------
    # what the view shows (the same numbers the browser draws: tests and notebooks read them here)

    def view(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A heatmap as drawn: (z (rows, cols), row indices, processing positions)."""
        _, win = self._shown
        return self._fr[name].copy(), win.rows, win.cols

    def shown(self) -> dict:
        """diag(H), the running curves as drawn (NaN after the cursor), the cursor, the highlight, the
        colour and axis ranges and the diag(H) title."""
        s, f = self.widget.scene, self.widget.frame
        k = f["k"]
        curves = {}
        for key in ("curve_gptq", "curve_rtn"):
            c = from_f32(s[key])
            c[k + 1:] = np.nan
            curves[key] = c
        hover = self.widget.hover
        return {"diag_h": from_f32(s["diag_h"]), "gptq": curves["curve_gptq"], "rtn": curves["curve_rtn"],
                "k": k, "hover": None if hover < 0 else hover, "wmax": s["wmax"], "emax": s["emax"],
                "diag_range": s["diag_range"], "curves_range": s["curves_range"],
                "diag_title": s["diag_title"], "basis": s["basis"], "titles": dict(s["titles"]),
                "bands": [tuple(b) for b in s["bands"]], "label": s["label"], "panels": list(f["z"]),
                "w": from_f32(f["w"]), "q": from_f32(f["q"]), "seq": f["seq"]}
