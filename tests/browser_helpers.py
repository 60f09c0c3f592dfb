"""Helpers for the real-browser tests (tests/test_ui_browser.py): a standalone Voila server on loopback,
headless Debian Chromium driven by Playwright, and reading the page's plotly state.

docs/testing.md says how the browser tests run. Nothing here downloads anything: Playwright's own browsers
are never installed; the Debian `chromium` binary is used, and every request that does not go to 127.0.0.1
(or data:/blob:) is aborted.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_PREFIXES = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")

# What the Layer Lab or Voila put in the page when something failed (LayerLab.show_error writes
# "<where>: <Error>: ... Try: <fix>" on a #f2dede background; Voila writes "There was an error when
# executing cell" with tracebacks off).
ERROR_PATTERNS = (
    re.compile(r"\bTry:"),
    re.compile(r"There was an error when executing cell"),
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r"\b\w+Error: "),
)

# What the Layer Lab's canvas figure shows (layer_canvas.js publishes it on its element as gptqState after
# each draw): diag(H), the cursor, the running curves up to the cursor (NaN after), the "error" heatmap,
# the colour and axis ranges, the diag(H) title. Keys as in the plotly figure it replaced.
PLOT_STATE_JS = """() => {
  const el = document.querySelector('.gptq-layer-figure[data-drawn]');
  if (!el || !el.gptqState) return null;
  const s = el.gptqState;
  const plain = (a) => Array.from(a, (x) => (Number.isFinite(x) ? x : null));
  return {
    drawn: s.drawn, seq: s.seq, n: s.n, window: s.window, hover: s.hover,
    diag_h: plain(s.diag_h),
    marker_x: s.marker_x,
    gptq_y: plain(s.gptq_y),
    rtn_y: plain(s.rtn_y),
    error_z: s.error_z.map(plain),
    curves_top: s.curves_top,
    error_cmax: s.error_cmax,
    cursor_path: s.cursor_path,
    diag_title: s.diag_title,
    panels: s.panels, label: s.label, basis: s.basis, bands: s.bands, correction_max: s.correction_max,
  };
}"""


# Records, on every animation frame of the page, the column the Layer Lab's figure shows and the column
# slider's readout, each time it changes ([time ms, value] in window.__frames / window.__ticks), until
# window.__stopCounting: counted in the page, so the counting costs no round trips.
COUNT_FRAMES_JS = """() => {
  const el = document.querySelector('.gptq-layer-figure[data-drawn]');
  const label = Array.from(document.querySelectorAll('.widget-slider label.widget-label'))
    .find((l) => l.textContent.trim() === 'column');
  const readout = label ? label.closest('.widget-slider').querySelector('.widget-readout') : null;
  window.__frames = [];
  window.__ticks = [];
  let last = null, lastTick = null;
  const tick = () => {
    const x = el && el.gptqState ? el.gptqState.k : null;
    if (x !== null && x !== last) { window.__frames.push([performance.now(), x]); last = x; }
    const v = readout ? readout.textContent.trim() : null;  // the Play control's column, browser side
    if (v !== null && v !== lastTick) { window.__ticks.push([performance.now(), v]); lastTick = v; }
    if (!window.__stopCounting) requestAnimationFrame(tick);
  };
  window.__stopCounting = false;
  requestAnimationFrame(tick);
}"""


def decode(v) -> np.ndarray:
    """A plotly data array as read from the page: a typed-array spec {dtype, bdata, shape} or a list."""
    if v is None:
        return np.zeros(0)
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        if v.get("shape"):
            a = a.reshape([int(s) for s in str(v["shape"]).split(",")])
        return a.astype(np.float64)
    return np.asarray(v, dtype=np.float64)  # None (JSON null) becomes NaN


def plot_state(page) -> dict | None:
    """The Layer Lab figure's state in the page, arrays decoded (None while nothing is drawn)."""
    raw = page.evaluate(PLOT_STATE_JS)
    if raw is None:
        return None
    out = dict(raw)
    for key in ("diag_h", "marker_x", "gptq_y", "rtn_y", "error_z"):
        out[key] = decode(raw[key])
    return out


def plot_drawn(page) -> dict | None:
    """The Layer Lab figure's state once it has drawn a frame with diag(H), else None."""
    s = plot_state(page)
    return s if s and s["drawn"] and s["diag_h"].size else None


def wait_for_app(page, timeout: float, interval: float = 0.25) -> dict:
    """Controls visible, then the figure drawn: {"widgets_at", "plot_at" (time.monotonic()), "state"}."""
    page.wait_for_selector(".slider-container", state="visible", timeout=timeout * 1000)
    widgets_at = time.monotonic()
    state = wait_until(lambda: plot_drawn(page), timeout, interval, "the Layer Lab figure drawn")
    return {"widgets_at": widgets_at, "plot_at": time.monotonic(), "state": state}


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """The HTTP status of a GET (None when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll predicate() until it returns something truthy; that value, or TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class VoilaServer:
    """Standalone Voila (the running interpreter's, launched as `./run.sh app` does: gptq_explorer.ui.serve)
    serving one notebook from its folder on 127.0.0.1.

    The notebook folder's voila.json applies (preheated pool, per-kernel env, tracebacks off); `extra_args`
    override it (the tests shorten the culling intervals). Output goes to `log_path`. `stop()` ends the
    whole process tree: the server and every kernel it started (kernels run in their own sessions, so
    they are collected as psutil children before the server goes)."""

    def __init__(self, notebook: Path, *, log_path: Path, extra_args=(), env: dict | None = None):
        self.notebook = Path(notebook)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        cmd = [sys.executable, "-m", "gptq_explorer.ui.serve"]  # as ./run.sh app: voila, starting sooner
        self.cmd = [*cmd, self.notebook.name, "--no-browser", "--Voila.ip=127.0.0.1", f"--port={self.port}",
                    *extra_args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None

    def start(self) -> VoilaServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=self.notebook.parent, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait until the server answers GET /voila/static/voila.js (GET / would start a kernel); returns
        the seconds since start."""
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"voila exited with {self.proc.returncode}:\n{self.log_tail()}")
            return http_status(f"{self.url}/voila/static/voila.js", timeout=2.0) == 200

        wait_until(ready, timeout, 0.3, "voila to answer /voila/static/voila.js")
        return time.monotonic() - self.started_at

    def kernel_alive(self, kernel_id: str) -> bool:
        """GET /api/kernels/<id> (standalone Voila exposes the single-kernel route, not the list)."""
        status = http_status(f"{self.url}/api/kernels/{kernel_id}")
        if status not in (200, 404):
            raise RuntimeError(f"GET /api/kernels/{kernel_id} answered {status}")
        return status == 200

    def kernel_processes(self) -> list:
        """The live ipykernel processes this server started."""
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and any(
                        "ipykernel" in part for part in p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for p in tree:  # whatever survived (kernels are in sessions of their own)
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=5)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None


def launch_chromium(playwright, executable: str):
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)


def open_page(browser, *, viewport=(1500, 1150)):
    """A page that may only reach loopback, recording page errors and the kernel websocket URLs."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.page_errors = []  # type: ignore[attr-defined]
    page.kernel_ids = []  # type: ignore[attr-defined]
    page.blocked = []  # type: ignore[attr-defined]
    page.console_errors = []  # type: ignore[attr-defined]

    def route(r):
        url = r.request.url
        if url.startswith(LOCAL_PREFIXES):
            r.continue_()
        else:
            page.blocked.append(url)
            r.abort()

    def websocket(ws):
        m = re.search(r"/api/kernels/([0-9a-f-]{36})/channels", ws.url)
        if m and m.group(1) not in page.kernel_ids:
            page.kernel_ids.append(m.group(1))

    page.route("**/*", route)
    page.on("pageerror", lambda e: page.page_errors.append(str(e)))
    page.on("websocket", websocket)
    # console errors are for diagnosis only: the blocked CDN icon font logs "Failed to load resource"
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
            and page.console_errors.append(m.text[:300]))
    return page


def error_texts(page) -> list[str]:
    """Error text in the page: the Layer Lab's error box, Voila's cell-error notice, tracebacks, and
    any error/stderr outputs."""
    body = page.inner_text("body")
    found = [m.group(0) for pat in ERROR_PATTERNS for m in [pat.search(body)] if m]
    outputs = page.evaluate("""() => Array.from(document.querySelectorAll(
        '[data-mime-type="application/vnd.jupyter.stderr"], [data-mime-type="application/vnd.jupyter.error"]'
      )).map((e) => e.innerText.slice(0, 300))""")
    # the explorer's own error boxes carry the CSS class gptq-error (ui/common.py)
    boxes = page.evaluate("""() => Array.from(document.querySelectorAll('.gptq-error'))
      .map((e) => e.innerText.slice(0, 300))""")
    return found + [f"output: {t}" for t in outputs] + [f"error box: {t}" for t in boxes if t not in found]


# Every plotly plot in the page with its trace names and y values (the Model Lab's and the Sweeps' charts
# are mime-rendered plots, not FigureWidgets).
ALL_PLOTS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map((gd) => ({
  title: gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '',
  traces: (gd.data || []).map((t) => ({name: t.name, type: t.type,
    x: t.x && t.x.bdata === undefined ? Array.from(t.x) : t.x,
    y: t.y && t.y.bdata === undefined ? Array.from(t.y) : t.y})),
}))"""


def all_plots(page) -> list[dict]:
    """[{title, traces: [{name, type, x, y}]}] for every plotly plot in the page (y decoded; x as given)."""
    out = page.evaluate(ALL_PLOTS_JS)
    for plot in out:
        for t in plot["traces"]:
            t["y"] = decode(t["y"])
    return out


def slider(page, label: str):
    """An ipywidgets slider by its description (exact)."""
    return page.locator(".widget-slider").filter(
        has=page.locator("label.widget-label", has_text=re.compile(rf"^{re.escape(label)}$")))


def slider_value(page, label: str) -> str:
    return slider(page, label).locator(".widget-readout").inner_text().strip()


def dump_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
