"""Pieces every view shares: the Dashboard base (display, the message box with errors and the fix to try,
CSS classes tests can find, quiet control changes, waiting for the background job), links to a state,
background jobs with progress and Cancel, static plotly plots, and value checks.

Static plots: the Model Lab's and the Sweeps' charts change only when a result arrives, so they are shown
as plotly mime bundles (application/vnd.plotly.v1+json) inside an Output widget, which the
jupyterlab-plotly renderer draws. Unlike a FigureWidget (an anywidget that ships its own 5 MB copy of
plotly.js per figure and must initialise within 2 s, see layer_figure) they cost nothing until their tab
is shown and cannot miss updates: each change replaces the whole output. The go.Figure stays in Python
(`StaticPlot.figure`) for tests.
"""

from __future__ import annotations

import contextlib
import functools
import html
import json
import logging
import threading
from collections.abc import Callable
from urllib.parse import urlencode

import ipywidgets as widgets
import numpy as np

from ..models.catalog import DEFAULT_MODEL
from ..services.layer_source import Cancelled

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


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, Cancelled) or type(exc).__name__ == "QuantizationCancelled"


def fix_for(exc: BaseException, fixes: dict[str, str] | None = None) -> str:
    """The fix to try, for the message box. `fixes`: a dashboard's own fix per exception class name
    ("Cancelled" for a cancellation), where it knows better."""
    name = "Cancelled" if _cancelled(exc) else type(exc).__name__
    if fixes and name in fixes:
        return fixes[name]
    if name == "Cancelled":
        return "Nothing to fix: what was on screen stays; press the button again to restart."
    if name in ("ModelLoadError", "UnsupportedModelError"):
        return (f"Pick another model from the list (the offline default, {DEFAULT_MODEL}, needs no network), "
                "or the synthetic layer.")
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
    cancelled = _cancelled(exc)
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


def query_of(values: dict) -> str:
    """A state as a URL query string (no leading '?'); a bool reads 1 or 0."""
    return urlencode({k: ("1" if v else "0") if isinstance(v, bool) else v for k, v in values.items()})


def link_html(query: str, open_link: bool = True) -> str:
    """What 'Copy link' shows: the state as a query string to select and copy (and a link opening it)."""
    qs = html.escape(query)
    opener = f" <a href='?{qs}' target='_blank'>open</a>" if open_link else ""
    return ("<div class='gptq-link' style='font-size:12px'>Link to this state (select and copy): "
            f"<code style='user-select:all'>?{qs}</code>{opener}</div>")


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
# what every dashboard does


class Shown:
    """Something displayed through its outermost widget, `root` (`lab.widget`, or `lab` as a cell's last
    line)."""

    root: widgets.Widget

    @property
    def widget(self) -> widgets.Widget:
        return self.root

    def _repr_mimebundle_(self, **kwargs):
        return self.root._repr_mimebundle_(**kwargs)


class Dashboard(Shown):
    """The Layer Lab, the Model Lab and the Sweeps: errors and notes in the message box, control changes
    that skip the callbacks (`with self._quietly():`), and waiting for the background job. A subclass
    calls `_init_dashboard()` first, then sets `message` (message_widget()) and `root`; `job` is its
    background Job (or None). NAME names it in the log; FIXES: its own fixes (see fix_for)."""

    NAME = "dashboard"
    FIXES: dict[str, str] = {}
    message: widgets.HTML
    job: Job | None

    def _init_dashboard(self) -> None:
        self.errors: list[str] = []
        self.last_error: BaseException | None = None
        self._quiet = 0

    @contextlib.contextmanager
    def _quietly(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def show_error(self, exc: BaseException, where: str = "") -> None:
        """Show an exception in the page with the fix to try (and log the traceback). The box has the CSS
        class gptq-error (gptq-cancelled for a cancellation), its fix gptq-fix."""
        self.last_error = exc
        self.errors.append("Cancelled." if _cancelled(exc) else f"{type(exc).__name__}: {exc}")
        log.warning("%s %s failed", self.NAME, where, exc_info=exc)
        self.message.value = message_html(exc, where, fix_for(exc, self.FIXES))

    def _info(self, text_html: str) -> None:
        self.message.value = info_html(text_html)

    def _clear_message(self) -> None:
        self.message.value = ""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background job, if any, has finished (or `timeout` seconds)."""
        if self.job is not None:
            self.job.join(timeout)

    def _start_job(self, job: Job, steps: Callable[[], None], finish: Callable[[], None], name: str) -> None:
        """Run `steps` as the background job `job` (a thread named `name` where self.threaded): its outcome
        becomes "done", "cancelled" (steps raised Cancelled) or "failed" (the error is shown in the page),
        copied to self.last_outcome; then finish() runs, whatever happened."""

        def work():
            try:
                steps()
                job.outcome = "done"
            except Cancelled:
                job.outcome = "cancelled"
            except Exception as exc:  # noqa: BLE001 - shown in the page, never raised into the kernel
                job.outcome = "failed"
                self.show_error(exc, where=job.label)
            finally:
                self.last_outcome = job.outcome
                finish()

        run_job(job, work, self.threaded, name)


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
        self.finished = threading.Event()  # set once its work has returned (run_job), or by its owner

    def join(self, timeout: float | None = None) -> None:
        """Wait until the work has returned: also right after the job was published, before its thread
        started (a Thread cannot be joined then)."""
        self.finished.wait(timeout)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")


class ProgressBar:
    """A progress bar, its label and a Cancel button, hidden while nothing runs."""

    def __init__(self, on_cancel: Callable[[], None], width: str = "300px"):
        W = widgets
        self.bar = W.FloatProgress(min=0.0, max=1.0, value=0.0, layout=W.Layout(width=width))
        self.label = W.Label(value="")
        # the plain style: "warning" is white on orange, a contrast of 2.7:1 (WCAG AA asks 4.5:1)
        self.cancel_button = W.Button(description="Cancel", icon="stop", layout=W.Layout(width="100px"))
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
    """Run `work` for `job`, in a daemon thread named `name` or here; job.finished is set when it returns."""

    def run():
        try:
            work()
        finally:
            job.finished.set()

    if threaded:
        job.thread = threading.Thread(target=run, name=name, daemon=True)
        job.thread.start()
    else:
        run()


# ---------------------------------------------------------------------------------------------------------
# static plots


class StaticPlot:
    """A plotly figure shown as a mime bundle in an Output widget (see the module doc)."""

    def __init__(self, figure=None, *, layout=None, responsive: bool = False):
        self.output = widgets.Output(layout=layout or widgets.Layout())
        self.responsive = responsive
        self.figure = None
        if figure is not None:
            self.show(figure)

    def show(self, figure) -> None:
        """Show `figure`. A responsive plot takes its box's width (the figure's own width is dropped in the
        page, kept in `figure`), so it fits a projector's or a notebook's width; its height stays."""
        import plotly.io as pio

        self.figure = figure
        spec = json.loads(pio.to_json(figure, validate=False))
        spec.setdefault("config", {}).update({"displaylogo": False, "responsive": self.responsive})
        if self.responsive:
            spec.setdefault("layout", {}).pop("width", None)
            spec["layout"]["autosize"] = True
        title = figure.layout.title.text if figure.layout.title and figure.layout.title.text else "plot"
        # setting `outputs` works from any thread and reaches browsers that connect later
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {PLOTLY_MIME: spec, "text/plain": f"<plotly figure: {title}>"}},)

    @property
    def widget(self) -> widgets.Output:
        return self.output


# ---------------------------------------------------------------------------------------------------------
# values


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
