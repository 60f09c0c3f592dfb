"""The real-browser tests' shared fixtures and page helpers, in one place. tests/conftest.py registers this
module (`pytest_plugins`), so a browser test file just names the fixtures it needs, with no import:

    pytestmark = pytest.mark.browser

    def test_something(browser, voila):
        page = open_page(browser)                       # browser_helpers.open_page
        try:
            page.goto(f"{voila.url}/?model=synthetic", timeout=PAGE_TIMEOUT * 1000)
            ...
            assert_clean(page, "after something")
        finally:
            close_page(page)

and imports the helpers below by name (`from browser_fixtures import ARTIFACTS, PAGE_TIMEOUT, ...`).

Fixtures (module scope, each: a test file gets its own, started at its first use and ended after the file's
last test; `-n 2 --dist loadfile` keeps a file in one worker, so it is one Chromium and one Voila server per
file that uses them, and none for a file that does not):
  chromium  the Debian Chromium's path; skips the test where Chromium or Playwright is absent (the only copy
            of that skip: a file with a fixture of its own that needs a browser asks for `chromium`).
  browser   headless Chromium driven by Playwright (browser_helpers.launch_chromium). A file may define its
            own `browser` (test_site_browser.py does: it writes its timings at teardown), which overrides it.
  site      the static Layer Lab (docs/site.md) exported into a temporary folder from the offline SmolLM2:
            the layers named by the test file's SITE_LAYERS ("0:self_attn.q_proj" if it names none); skips
            where the offline model is not converted.
  voila     a standalone Voila server on loopback (browser_helpers.VoilaServer) serving
            notebooks/explorer.ipynb with notebooks/voila.json, culling shortened to CULL_IDLE / CULL_INTERVAL
            (s) and connected kernels never culled; clears artifacts/browser/*.png when it starts, logs to
            artifacts/browser/voila.log, and writes the timings noted so far to artifacts/browser/timings.json
            when it ends.

Helpers:
  ARTIFACTS        artifacts/browser: screenshots, logs, timings
  VIEWPORTS        the room's screens, (width, height): a projector, laptops, a notebook's width
  PAGE_TIMEOUT     s a page may take to open on a loaded machine; MODEL_TIMEOUT: s for the offline model
  note_timing(key, seconds)   record a timing (TIMINGS, written to timings.json) and print it
  wait_on_page(page, predicate, timeout, what)   browser_helpers.wait_until, but a timeout fails with the
                   page's errors and a screenshot artifacts/browser/failed-<what>.png
  assert_clean(page, where)   no page error and no error text in the page
  close_page(page) close a page, recording its kernels in CLOSED (test_ui_browser.py checks they are culled)
  diagnose(page)   why a figure may not have followed the kernel, for failure messages
  fit(page, texts, selects)   what sticks out of the window, and which texts (the elements `texts` selects)
                   or menus (`selects`) are cut: {scroll, inner, client, measured, wide, cut}
  serious_violations(page, path)   axe-core on the page as it is (once injected: Axe().axe_script): all
                   its violations written to path, the serious or critical ones returned
  open_site(browser, site, hash_, clipboard, viewport)   the static site from file://, drawn, every other
                   request aborted and recorded (page.outside), page errors in page.errors
  page_arrays(page)   the site's W, H and codes, exactly (float32 / int32)
  page_heldout(page)  the site's held-out inputs, as the page decoded them

docs/testing.md says how the browser tests run; browser_helpers.py has the Voila server, Chromium and
page-reading helpers these build on (also used by scripts/ and benchmarks/, outside pytest).
"""

from __future__ import annotations

import base64
import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import VoilaServer, chromium_path, dump_json, error_texts, launch_chromium, wait_until

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explorer.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CULL_IDLE, CULL_INTERVAL = 30, 5  # s (voila.json: 900 / 60); with less, pages still connecting were culled
PAGE_TIMEOUT = 150.0  # s: a page opens slowly on a loaded machine (docs/performance.md)
MODEL_TIMEOUT = 180.0  # s: the offline model's first conversion can take a minute
VIEWPORTS = ((1280, 720), (1366, 768), (1920, 1080), (1000, 800))  # a projector, laptops, a notebook's width
SERIOUS = ("serious", "critical")  # axe-core's impacts that fail a test
SITE_LAYERS = "0:self_attn.q_proj"  # the static site's layers where a test file names none

TIMINGS: dict[str, float] = {}
CLOSED: list[tuple[str, float]] = []  # (kernel id, monotonic time the page closed)

ANYWIDGET_TIMEOUT = "[anywidget] Failed to initialize model."


@pytest.fixture(scope="module")
def chromium():
    """The Debian Chromium's path; skips where Chromium or Playwright is absent."""
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium; run.sh test does it)")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install playwright; never `playwright install`)")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    """Headless Chromium driven by Playwright, one per test file."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p, chromium)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def voila(chromium):
    """A standalone Voila server on loopback serving notebooks/explorer.ipynb, one per test file."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # this run's screenshots only
        old.unlink()
    server = VoilaServer(
        NOTEBOOK, log_path=ARTIFACTS / "voila.log",
        extra_args=[f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE}",
                    f"--MappingKernelManager.cull_interval={CULL_INTERVAL}",
                    # the open pages' kernels must not be culled mid-test; a closed page has no
                    # connection left, so this also checks that closing a page drops its connection
                    "--MappingKernelManager.cull_connected=False"],
        env={"GPTQ_EXPLORER_THREADS": "1", "OMP_NUM_THREADS": "1", "GPTQ_EXPLORER_LOCAL": "0"})
    server.start()
    try:
        note_timing("voila_ready", server.wait_ready())
        yield server
    finally:
        server.stop()
        print(f"[browser] voila log: {server.log_path}")
        dump_json(ARTIFACTS / "timings.json", TIMINGS)


@pytest.fixture(scope="module")
def site(request, tmp_path_factory):
    """The static Layer Lab exported from the offline SmolLM2 (the test file's SITE_LAYERS), one per file."""
    from gptq_explorer.models.cache_folders import offline_model_ready
    from gptq_explorer.services.site_export import export_site, parse_layers

    if not offline_model_ready():
        pytest.skip("the offline SmolLM2 is not converted (gptq-explorer prepare)")
    folder = tmp_path_factory.mktemp("site") / "site"
    export_site(folder, layers=parse_layers(getattr(request.module, "SITE_LAYERS", SITE_LAYERS)))
    return folder


def note_timing(key: str, seconds: float) -> None:
    TIMINGS[key] = round(seconds, 2)
    print(f"[browser timing] {key}: {seconds:.1f} s")


def diagnose(page) -> str:
    """Why a plot may not have followed the kernel, for failure messages."""
    why = f"page errors: {page.page_errors}; console errors: {page.console_errors[:5]}"
    if any(ANYWIDGET_TIMEOUT in e for e in page.page_errors + page.console_errors):
        why += ("; the FigureWidget's anywidget runtime missed its 2 s initialisation deadline, after which "
                "anywidget drops every kernel->browser message for that model: the figure is frozen")
    return why


def wait_on_page(page, predicate, timeout: float, what: str, interval: float = 0.1):
    """wait_until, failing with the page's errors (and a screenshot) instead of a bare timeout."""
    try:
        return wait_until(predicate, timeout, interval, what)
    except TimeoutError as exc:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"failed-{re.sub(r'[^a-z0-9]+', '-', what.lower())[:40]}.png"
        page.screenshot(path=str(shot), full_page=True)
        raise AssertionError(f"{exc} ({diagnose(page)}; screenshot {shot.name})") from None


def assert_clean(page, where: str) -> None:
    assert page.page_errors == [], f"{where}: page errors {page.page_errors}"
    errors = error_texts(page)
    assert errors == [], f"{where}: error text in the page: {errors}"


def close_page(page) -> None:
    page.close(run_before_unload=True)
    now = time.monotonic()
    for kid in page.kernel_ids:
        CLOSED.append((kid, now))


# What sticks out of the window, and which texts or menus are cut (their text wider than their box).
# Elements inside a box that clips them still count: a clipped control is what the instructor saw. A menu
# (<select>) is cut when a copy of it at its natural width (its widest option and its arrow) is wider.
FIT_JS = """({texts, selects}) => {
  const shown = (e, r = e.getBoundingClientRect()) => r.width > 0 && r.height > 0
    && getComputedStyle(e).visibility !== 'hidden';
  const name = (e) => e.tagName + '.' + String(e.className.baseVal ?? e.className).trim().split(/\\s+/)
    .slice(0, 3).join('.') + (e.id ? '#' + e.id : '') + ' "' + (e.textContent || '').trim().slice(0, 30)
    + '"';
  const wide = [], cut = [];
  let measured = 0;
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();  // the style only of what sticks out (a page has thousands of nodes)
    if (r.right > innerWidth + 1 && shown(e, r) && wide.length < 10) {
      wide.push(name(e) + ` right=${Math.round(r.right)}`);
    }
  }
  for (const e of document.querySelectorAll(texts)) {
    if (!shown(e)) continue;
    measured += 1;
    if (e.scrollWidth > e.clientWidth + 1 && cut.length < 10) {
      cut.push(name(e) + ` ${e.scrollWidth}>${e.clientWidth}`);
    }
  }
  for (const e of selects ? document.querySelectorAll(selects) : []) {
    if (!shown(e)) continue;
    measured += 1;
    const twin = e.cloneNode(true);
    twin.removeAttribute('id');
    twin.style.cssText = 'position:absolute;visibility:hidden;width:auto;min-width:0;max-width:none';
    document.body.appendChild(twin);
    const need = twin.getBoundingClientRect().width, has = e.getBoundingClientRect().width;
    twin.remove();
    if (need > has + 1 && cut.length < 10) cut.push(name(e) + ` ${Math.round(need)}>${Math.round(has)}`);
  }
  return { scroll: document.scrollingElement.scrollWidth, inner: innerWidth,
           client: document.documentElement.clientWidth, measured, wide, cut };
}"""


def fit(page, texts: str, selects: str = "") -> dict:
    """FIT_JS on the page: {scroll (the document's scrollWidth), inner (the window's width), client (the
    width the page lays out in, without a scroll bar), measured (texts and menus looked at), wide (what
    sticks out of the window), cut (texts and menus cut)}."""
    return page.evaluate(FIT_JS, {"texts": texts, "selects": selects})


def serious_violations(page, path: Path) -> list[str]:
    """axe-core on the page as it is now (inject it first, once: page.evaluate(Axe().axe_script)): every
    violation goes to path; the serious or critical ones come back as 'id (impact): targets'."""
    violations = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")["violations"]
    dump_json(path, {"violations": violations})
    return [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes'][:3]]}" for v in violations
            if v["impact"] in SERIOUS]


# ---- the static site (docs/site.md), opened from file://

# navigator.clipboard.writeText stood in for before the page loads: it records the text (or refuses)
CLIPBOARD_JS = """(refuse) => {
  window.__copied = [];
  Object.defineProperty(navigator, 'clipboard', {configurable: true, value: {
    writeText: (text) => refuse ? Promise.reject(new DOMException('denied', 'NotAllowedError'))
                                : (window.__copied.push(text), Promise.resolve()),
  }});
}"""

# the page's arrays as base64 (float32 / int32 bytes): one transfer, exact
ARRAYS_JS = """() => {
  const b64 = (a) => { const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let s = "";
    for (let i = 0; i < u.length; i += 0x8000) {
      s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
    }
    return btoa(s); };
  const L = window.gptqExplorer.layer(), c = window.gptqExplorer.codes();
  return {W: b64(L.W), H: b64(L.H), d_out: L.d_out, d_in: L.d_in, codes: b64(c)};
}"""


def open_site(browser, site: Path, hash_: str = "", clipboard: str | None = None,
              viewport: tuple[int, int] = (1600, 1100), init_script: str | None = None):
    """The page from file://, ready (its run drawn, RTN's curve too); any request that is not file:// is
    aborted and recorded (page.outside), page errors go to page.errors. clipboard: "record" or "refuse"
    stands in for navigator.clipboard.writeText; init_script runs before the page's own scripts."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.outside, page.errors = [], []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            page.outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    if clipboard:
        page.add_init_script(f"({CLIPBOARD_JS})({'true' if clipboard == 'refuse' else 'false'})")
    if init_script:
        page.add_init_script(init_script)
    page.goto((site / "index.html").as_uri() + hash_)
    page.wait_for_function("window.gptqExplorer !== undefined", timeout=30_000)
    page.evaluate("() => window.gptqExplorer.ready()")
    return page


def page_heldout(page) -> np.ndarray:
    """The site's held-out inputs (tokens, d_in) as the page decoded them (float16 values, as float32)."""
    raw = page.evaluate("""() => { const L = window.gptqExplorer.layer(), u = new Uint8Array(L.Xh.buffer);
      let s = "";
      for (let i = 0; i < u.length; i += 0x8000) {
        s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
      }
      return {Xh: btoa(s), tokens: L.tokens, d_in: L.d_in}; }""")
    return np.frombuffer(base64.b64decode(raw["Xh"]), dtype="<f4").reshape(raw["tokens"], raw["d_in"])


def page_arrays(page) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = page.evaluate(ARRAYS_JS)
    o, i = raw["d_out"], raw["d_in"]
    W = np.frombuffer(base64.b64decode(raw["W"]), dtype="<f4").reshape(o, i)
    H = np.frombuffer(base64.b64decode(raw["H"]), dtype="<f4").reshape(i, i)
    codes = np.frombuffer(base64.b64decode(raw["codes"]), dtype="<i4").reshape(o, i)
    return W, H, codes
