"""The static Layer Lab (docs/site.md) in headless Chromium, from file://, every other request aborted: its
first frame comes as soon as the worker's column loop has passed the cursor's column, before the run is
done, and the page says what is still computing; the run's final codes are the NumPy engine's. Its "Copy
link" button copies the address with the page's state (or, where the clipboard refuses, shows it selected in
a text field), and is a keyboard-reachable button with a name.

The site is one block-0 layer of the offline SmolLM2, the 1536-wide down_proj: its run goes on for a good
while after the first block, so the first frame is drawn from a partial run. The browser fixtures are the
shared ones (browser_fixtures.py, registered in conftest.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from browser_fixtures import open_site, page_arrays

from gptq_explorer.engine import QuantConfig, gptq_quantize, rtn_quantize

pytestmark = pytest.mark.browser

SITE_LAYERS = "0:mlp.down_proj"  # the shared `site` fixture exports it
KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent")

# What the page shows at each draw of the figure, recorded in the page as it happens: the seq drawn, the
# column, whether the run's codes and summary are there yet, and the run's status line
WATCH_DRAWS_JS = """() => {
  const fig = document.querySelector('#figure');
  window.__draws = [];
  new MutationObserver(() => window.__draws.push({
    seq: Number(fig.getAttribute('data-drawn')), k: fig.gptqState.k,
    codes: window.gptqExplorer.codes() !== null, summary: window.gptqExplorer.summary() !== null,
    status: document.querySelector('#run-status').textContent,
  })).observe(fig, {attributes: true, attributeFilter: ['data-drawn']});
}"""


def test_the_first_frame_comes_before_the_run_is_done(browser, site):
    page = open_site(browser, site, "#col=0")
    try:
        opened = page.evaluate("() => window.gptqExplorer.timings()")
        # the page opened on column 0: drawn once the first lazy block (128 columns) was done
        assert (opened["open_first_done"], opened["open_n"]) == (128, 1536)
        assert 0 < opened["open_to_first_frame_ms"] <= opened["open_to_complete_ms"]
        page.evaluate(WATCH_DRAWS_JS)
        page.evaluate("(v) => window.gptqExplorer.set(v)", {"bits": 3, "desc_act": True, "col": 700})
        change = page.evaluate("() => window.gptqExplorer.timings()")["changes"][-1]
        # the frame of column 700 was handed to the canvas when the loop had done the block ending at 768
        assert (change["first_done"], change["n"]) == (768, 1536)
        assert 0 < change["ms"] <= change["full_ms"] and change["result_ms"] <= change["full_ms"]
        draws = page.evaluate("() => window.__draws")
        first, last = draws[0], draws[-1]
        # drawn while the rest of the run went on: no codes, no summary yet, and the page says so
        assert first["k"] == 700 and not first["codes"] and not first["summary"]
        assert "768 of 1536 columns" in first["status"]
        assert last["k"] == 700 and last["codes"] and last["summary"] and last["status"] == ""
        assert "Computed in" in page.inner_text("#summary") and "…" not in page.inner_text("#summary")
        # the run's final codes: the NumPy engine's on the page's own layer
        state = page.evaluate("() => window.gptqExplorer.state()")
        W, H, codes = page_arrays(page)
        cfg = QuantConfig(**{k: state[k] for k in KEYS})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = gptq_quantize(W.astype(np.float64), H.astype(np.float64), cfg)
        assert float(np.mean(codes == ref.codes)) >= 0.999
        summary = page.evaluate("() => window.gptqExplorer.summary()")
        assert summary["loss_gptq"] == pytest.approx(ref.loss, rel=1e-6)
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


# Every draw of the figure from the page's start (an init script: before the page's own), with the scales of
# the scene drawn: the hook's ranges() and what the canvas published (gptqState)
WATCH_SCALES_JS = """window.__scales = [];
new MutationObserver((records) => { for (const r of records) {
  const fig = r.target, s = fig.gptqState, x = window.gptqExplorer;
  window.__scales.push({seq: Number(fig.getAttribute('data-drawn')), k: s.k, codes: x.codes() !== null,
                        ranges: x.ranges(), cmax: s.error_cmax, top: s.curves_top});
} }).observe(document, {attributes: true, attributeFilter: ['data-drawn'], subtree: true});"""


def test_the_first_frame_has_the_final_scales(browser, site):
    """The error heatmap's colour range and the curves' axis of a run's first frame (drawn from a partial
    run) are its last frame's: they come from RTN, known before GPTQ's run ends (docs/site.md)."""
    page = open_site(browser, site, "#col=0", init_script=WATCH_SCALES_JS)
    try:
        runs = {"open": page.evaluate("() => window.__scales.splice(0)")}
        # a new grid (RTN's Gram matrix made again, on the other worker), a new order, a new damping
        for values in ({"bits": 3, "desc_act": True}, {"desc_act": False}, {"damp_percent": 0.1}):
            page.evaluate("(v) => window.gptqExplorer.set(v)", values)
            runs[",".join(values)] = page.evaluate("() => window.__scales.splice(0)")
        for name, draws in runs.items():
            first, last = draws[0], draws[-1]
            # drawn while GPTQ still ran, then again with its result: the same scales, and what the canvas
            # drew is what the hook says
            assert len(draws) >= 2 and not first["codes"] and last["codes"], (name, draws)
            assert all(d["ranges"] == first["ranges"] for d in draws), (name, draws)
            assert all(d["cmax"] == d["ranges"]["emax"] and d["top"] == d["ranges"]["curves_range"][1]
                       for d in draws), (name, draws)
        # the colour range is RTN's error's 99.5th percentile (gptq_engine.absPercentile: every 4th entry of
        # the column-major 576 x 1536 error), the axis's top RTN's end x 1.25 (GPTQ ends below it)
        state = page.evaluate("() => window.gptqExplorer.state()")
        W = page_arrays(page)[0].astype(np.float64)
        D = W - rtn_quantize(W, QuantConfig(**{k: state[k] for k in KEYS})).weight
        emax = np.percentile(np.abs(D.T.ravel()[::4]), 99.5)
        assert last["ranges"]["emax"] == pytest.approx(emax, rel=1e-9)
        summary = page.evaluate("() => window.gptqExplorer.summary()")
        assert summary["calib_mse_gptq"] < summary["calib_mse_rtn"]
        assert 10 ** last["top"] == pytest.approx(1.25 * summary["calib_mse_rtn"], rel=1e-9)
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_copy_link_copies_the_address_with_the_state(browser, site):
    page = open_site(browser, site, "#bits=3&col=42", clipboard="record")
    try:
        button = page.get_by_role("button", name="Copy link")
        assert button.count() == 1
        page.evaluate("(v) => window.gptqExplorer.set(v)", {"group_size": -1, "rows": 16})
        # reached and pressed from the keyboard: the tab order gets there from the top of the page
        page.evaluate("() => document.activeElement.blur()")
        for _ in range(40):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.id") == "copy-link":
                break
        assert page.evaluate("() => document.activeElement.id") == "copy-link"
        page.keyboard.press("Enter")
        page.wait_for_function("() => window.__copied.length === 1", timeout=5_000)
        url = page.evaluate("() => window.__copied[0]")
        assert url.startswith((site / "index.html").as_uri() + "#")
        for key in ("bits=3", "group_size=-1", "col=42", "rows=16", "sublayer=mlp.down_proj"):
            assert key in url
        assert page.inner_text("#copy-status") == "Link copied."
        assert page.evaluate("() => document.querySelector('#link-text').hidden")
        # the link opens the same view
        other = open_site(browser, site, url[url.index("#"):])
        try:
            state = other.evaluate("() => window.gptqExplorer.state()")
            assert (state["bits"], state["group_size"], state["col"], state["rows"]) == (3, -1, 42, 16)
        finally:
            other.close()
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_copy_link_without_the_clipboard_shows_the_link_selected(browser, site):
    page = open_site(browser, site, "#bits=2&col=7", clipboard="refuse")
    try:
        page.click("#copy-link")
        page.wait_for_function("() => !document.querySelector('#link-text').hidden", timeout=5_000)
        field = page.evaluate("""() => { const f = document.querySelector('#link-text');
          return {value: f.value, focused: document.activeElement === f, start: f.selectionStart,
                  end: f.selectionEnd, label: f.getAttribute('aria-label')}; }""")
        assert "bits=2" in field["value"] and "col=7" in field["value"] and field["focused"]
        assert (field["start"], field["end"]) == (0, len(field["value"])) and field["label"]
        assert "copy it" in page.inner_text("#copy-status")
        assert page.outside == [] and page.errors == []
    finally:
        page.close()
