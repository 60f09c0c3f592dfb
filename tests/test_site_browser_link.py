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

import base64
import warnings
from pathlib import Path

import numpy as np
import pytest

from gptq_explorer.engine import QuantConfig, gptq_quantize

pytestmark = pytest.mark.browser

LAYERS = "0:mlp.down_proj"
KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent")

ARRAYS_JS = """() => {
  const b64 = (a) => { const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let s = "";
    for (let i = 0; i < u.length; i += 0x8000) {
      s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
    }
    return btoa(s); };
  const L = window.gptqExplorer.layer(), c = window.gptqExplorer.codes();
  return {W: b64(L.W), H: b64(L.H), d_out: L.d_out, d_in: L.d_in, codes: b64(c)};
}"""

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

# navigator.clipboard.writeText stood in for before the page loads: it records the text (or refuses)
CLIPBOARD_JS = """(refuse) => {
  window.__copied = [];
  Object.defineProperty(navigator, 'clipboard', {configurable: true, value: {
    writeText: (text) => refuse ? Promise.reject(new DOMException('denied', 'NotAllowedError'))
                                : (window.__copied.push(text), Promise.resolve()),
  }});
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from gptq_explorer.models.cache_folders import offline_model_ready
    from gptq_explorer.services.site_export import export_site, parse_layers

    if not offline_model_ready():
        pytest.skip("the offline SmolLM2 is not converted (gptq-explorer prepare)")
    folder = tmp_path_factory.mktemp("site") / "site"
    export_site(folder, layers=parse_layers(LAYERS))
    return folder


def open_site(browser, site: Path, hash_: str = "", clipboard: str | None = None):
    """The page from file://, ready; any request that is not file:// is aborted and recorded. clipboard:
    "record" or "refuse" stands in for navigator.clipboard.writeText."""
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
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
    page.goto((site / "index.html").as_uri() + hash_)
    page.wait_for_function("window.gptqExplorer !== undefined", timeout=30_000)
    page.evaluate("() => window.gptqExplorer.ready()")
    return page


def page_arrays(page) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = page.evaluate(ARRAYS_JS)
    o, i = raw["d_out"], raw["d_in"]
    W = np.frombuffer(base64.b64decode(raw["W"]), dtype="<f4").reshape(o, i)
    H = np.frombuffer(base64.b64decode(raw["H"]), dtype="<f4").reshape(i, i)
    codes = np.frombuffer(base64.b64decode(raw["codes"]), dtype="<i4").reshape(o, i)
    return W, H, codes


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
