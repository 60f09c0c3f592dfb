"""Pieces every view shares: the message box (errors with the fix to try, CSS classes tests can find),
background jobs with progress and Cancel, static plotly plots, and value checks.

Static plots: the Model Lab's and the Sweeps' charts change only when a result arrives, so they are shown
as plotly mime bundles (application/vnd.plotly.v1+json) inside an Output widget, which the
jupyterlab-plotly renderer draws. Unlike a FigureWidget (an anywidget that ships its own 5 MB copy of
plotly.js per figure and must initialise within 2 s, see layer_figure) they cost nothing until their tab
is shown and cannot miss updates: each change replaces the whole output. The go.Figure stays in Python
(`StaticPlot.figure`) for tests.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import threading
from collections.abc import Callable

import ipywidgets as widgets
import numpy as np

from .layer_source import Cancelled

log = logging.getLogger(__name__)

# CSS classes on the message box's content (tests and the browser helpers look for them)
ERROR_CLASS = "gptq-error"
CANCELLED_CLASS = "gptq-cancelled"
INFO_CLASS = "gptq-info"
FIX_CLASS = "gptq-fix"
MESSAGE_CLASS = "gptq-message"  # on the message widget itself

PLOTLY_MIME = "application/vnd.plotly.v1+json"


class InputError(ValueError):
    """A value (from Python or a link) outside what the controls allow."""


def fix_for(exc: BaseException) -> str:
    """The fix to try, for the message box."""
    name = type(exc).__name__
    if isinstance(exc, Cancelled) or name in ("QuantizationCancelled",):
        return "Nothing to fix: what was on screen stays; press the button again to restart."
    if name in ("ModelLoadError", "UnsupportedModelError"):
        return ("Pick another model from the list (the offline default, smollm2-135m, needs no network), or "
                "the synthetic layer.")
    if name == "CorpusError":
        return "Pick the other calibration corpus (prose or code)."
    if isinstance(exc, np.linalg.LinAlgError) or "positive definite" in str(exc):
        return "Raise damp_percent, or calibrate on more samples."
    if isinstance(exc, MemoryError):
        return "Pick a smaller model or fewer calibration samples."
    if isinstance(exc, ValueError):
        return "Change the value back, or pick a preset."
    return "Pick a preset to reset the settings; if it happens again, reload the page."


def message_html(exc: BaseException, where: str = "", fix: str | None = None) -> str:
    """The error box: '<where>: <Type>: <message> Try: <fix>' (a cancellation reads 'Cancelled.')."""
    cancelled = isinstance(exc, Cancelled) or type(exc).__name__ == "QuantizationCancelled"
    text = f"Cancelled. {exc}" if cancelled and str(exc) not in ("", "cancelled") else (
        "Cancelled." if cancelled else f"{type(exc).__name__}: {exc}")
    color, bg = ("#8a6d3b", "#fcf8e3") if cancelled else ("#a94442", "#f2dede")
    cls = CANCELLED_CLASS if cancelled else ERROR_CLASS
    return (f"<div class='{cls}' style='border:1px solid {color};background:{bg};color:{color};"
            f"padding:6px 10px;border-radius:4px;max-width:1100px'><b>{html.escape(where or 'error')}:</b> "
            f"<span class='gptq-error-text'>{html.escape(text)}</span><br>"
            f"<b>Try:</b> <span class='{FIX_CLASS}'>{html.escape(fix or fix_for(exc))}</span></div>")


def info_html(text_html: str) -> str:
    return (f"<div class='{INFO_CLASS}' style='border:1px solid #31708f;background:#d9edf7;color:#31708f;"
            f"padding:6px 10px;border-radius:4px;max-width:1100px'>{text_html}</div>")


def message_widget() -> widgets.HTML:
    w = widgets.HTML(value="")
    w.add_class(MESSAGE_CLASS)
    return w


def guarded(method):
    """Run a callback; on any exception show it in the page (self.show_error), never raise into the kernel."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the whole point: nothing escapes a callback
            self.show_error(exc, where=method.__name__.strip("_"))
            return None

    return wrapper


# ---------------------------------------------------------------------------------------------------------
# background jobs


class Job:
    """One piece of background work: a label, a cancel flag, its thread, and how it ended."""

    def __init__(self, label: str):
        self.label = label
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None
        self.outcome: str = "running"  # -> "done" | "cancelled" | "failed"
        self.notes: list[str] = []  # things the user should know about a finished job (e.g. not saved)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")


class ProgressBar:
    """A progress bar, its label and a Cancel button, hidden while nothing runs."""

    def __init__(self, on_cancel: Callable[[], None], width: str = "300px"):
        W = widgets
        self.bar = W.FloatProgress(min=0.0, max=1.0, value=0.0, layout=W.Layout(width=width))
        self.label = W.Label(value="")
        self.cancel_button = W.Button(description="Cancel", icon="stop", button_style="warning",
                                      layout=W.Layout(width="100px"))
        self.cancel_button.on_click(lambda _b: on_cancel())
        self.box = W.HBox([self.bar, self.label, self.cancel_button], layout=W.Layout(display="none"))

    def start(self, text: str) -> None:
        self.bar.value = 0.0
        self.label.value = text
        self.cancel_button.disabled = False
        self.box.layout.display = "flex"

    def set(self, fraction: float, text: str) -> None:
        self.bar.value = float(np.clip(fraction, 0.0, 1.0))
        self.label.value = text

    def stop(self) -> None:
        self.box.layout.display = "none"

    @property
    def visible(self) -> bool:
        return self.box.layout.display != "none"


def run_job(job: Job, work: Callable[[], None], threaded: bool, name: str) -> None:
    if threaded:
        job.thread = threading.Thread(target=work, name=name, daemon=True)
        job.thread.start()
    else:
        work()


# ---------------------------------------------------------------------------------------------------------
# static plots


class StaticPlot:
    """A plotly figure shown as a mime bundle in an Output widget (see the module doc)."""

    def __init__(self, figure=None, *, layout=None):
        self.output = widgets.Output(layout=layout or widgets.Layout())
        self.figure = None
        if figure is not None:
            self.show(figure)

    def show(self, figure) -> None:
        import plotly.io as pio

        self.figure = figure
        spec = json.loads(pio.to_json(figure, validate=False))
        spec.setdefault("config", {}).update({"displaylogo": False, "responsive": False})
        title = figure.layout.title.text if figure.layout.title and figure.layout.title.text else "plot"
        # setting `outputs` works from any thread and reaches browsers that connect later
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {PLOTLY_MIME: spec, "text/plain": f"<plotly figure: {title}>"}},)

    @property
    def widget(self) -> widgets.Output:
        return self.output


# ---------------------------------------------------------------------------------------------------------
# values


def as_bool(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise InputError(f"expected true or false, got {value!r}")


def as_int(value) -> int:
    if isinstance(value, bool):
        raise InputError(f"expected an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"expected an integer, got {value!r}") from None
    if not np.isfinite(f) or f != int(f):
        raise InputError(f"expected an integer, got {value!r}")
    return int(f)


def as_float(value) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"expected a number, got {value!r}") from None
    if not np.isfinite(f):
        raise InputError(f"expected a finite number, got {value!r}")
    return f


# ---------------------------------------------------------------------------------------------------------
# the figure watchdog

_PROBE_ESM = """
// Tells the kernel when the page rendered, then whether the Layer Lab's figure drew itself: a widget whose
// anywidget missed its 2 s start-up deadline never draws, and its element never gets data-drawn.
export default {
  render({ model, el }) {
    el.style.display = "none";
    model.send({ event: "rendered" });
    let timer = null;
    const watch = (deadline_s) => {
      const t0 = Date.now();
      if (timer) clearInterval(timer);
      timer = setInterval(() => {
        const drawn = document.querySelector(".gptq-layer-figure[data-drawn]") !== null;
        const late = (Date.now() - t0) / 1000 > deadline_s;
        if (drawn || late) {
          clearInterval(timer);
          timer = null;
          model.send({ event: "figure", drawn, seconds: (Date.now() - t0) / 1000 });
        }
      }, 1000);
    };
    watch(model.get("deadline_s"));
    model.on("msg:custom", (msg) => { if (msg && msg.watch) watch(model.get("deadline_s")); });
  }
};
"""


def page_probe(deadline_s: float = 60.0):
    """A hidden, tiny anywidget that tells the kernel when a browser has rendered the page and whether the
    Layer Lab's figure drew itself within deadline_s (its ESM is a few hundred bytes, so it initialises at
    once). None without anywidget."""
    try:
        import anywidget
        import traitlets
    except ImportError:  # pragma: no cover - a dependency (the Layer Lab's figure is an anywidget)
        return None

    class PageProbe(anywidget.AnyWidget):
        _esm = traitlets.Unicode(_PROBE_ESM).tag(sync=True)
        deadline_s = traitlets.Float(60.0).tag(sync=True)

    return PageProbe(deadline_s=deadline_s, layout=widgets.Layout(display="none"))
