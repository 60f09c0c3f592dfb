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
  voila     a standalone Voila server on loopback (browser_helpers.VoilaServer) serving
            notebooks/explorer.ipynb with notebooks/voila.json, culling shortened to CULL_IDLE / CULL_INTERVAL
            (s) and connected kernels never culled; clears artifacts/browser/*.png when it starts, logs to
            artifacts/browser/voila.log, and writes the timings noted so far to artifacts/browser/timings.json
            when it ends.

Helpers:
  ARTIFACTS        artifacts/browser: screenshots, logs, timings
  PAGE_TIMEOUT     s a page may take to open on a loaded machine; MODEL_TIMEOUT: s for the offline model
  note_timing(key, seconds)   record a timing (TIMINGS, written to timings.json) and print it
  wait_on_page(page, predicate, timeout, what)   browser_helpers.wait_until, but a timeout fails with the
                   page's errors and a screenshot artifacts/browser/failed-<what>.png
  assert_clean(page, where)   no page error and no error text in the page
  close_page(page) close a page, recording its kernels in CLOSED (test_ui_browser.py checks they are culled)
  diagnose(page)   why a figure may not have followed the kernel, for failure messages

docs/testing.md says how the browser tests run; browser_helpers.py has the Voila server, Chromium and
page-reading helpers these build on (also used by scripts/ and benchmarks/, outside pytest).
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest
from browser_helpers import VoilaServer, chromium_path, dump_json, error_texts, launch_chromium, wait_until

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explorer.ipynb"
ARTIFACTS = ROOT / "artifacts" / "browser"
CULL_IDLE, CULL_INTERVAL = 30, 5  # s (voila.json: 900 / 60); with less, pages still connecting were culled
PAGE_TIMEOUT = 150.0  # s: a page opens slowly on a loaded machine (docs/performance.md)
MODEL_TIMEOUT = 180.0  # s: the offline model's first conversion can take a minute

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
