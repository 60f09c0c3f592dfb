"""The static Layer Lab (docs/site.md) in a real room, with the app's own checks
(tests/test_ui_browser_room.py): at each of the app's screens (VIEWPORTS) the page fits (nothing wider than
the window, no label, number or menu cut) and is saved as artifacts/browser/site-<w>x<h>.png; axe-core finds
no serious or critical violation with the page drawn (artifacts/browser/axe-site.json), playing, and
showing the copy-link field; every control is reached with Tab, in the order of the page, with a visible
focus outline, and works from the keyboard.

The site is one block-0 layer of the offline SmolLM2 (the shared `site` fixture, browser_fixtures.py), opened
from file:// with every other request aborted. Run alone:
`.venv/bin/python -m pytest -m browser tests/test_site_browser_room.py -s`.
"""

from __future__ import annotations

import json

import pytest
from browser_fixtures import ARTIFACTS, VIEWPORTS, fit, open_site, serious_violations

pytestmark = pytest.mark.browser

# the page's texts that must not be cut (browser_fixtures.fit): block boxes only (an inline box has no
# width of its own to be cut by; the controls' labels, outputs and notes are flex items, hence blocks)
TEXTS = ("h1, header p, #controls b, #controls label, #controls small, #controls output, button, "
         "#messages > div, #run-status, #explain > div, #summary, #summary td, #summary th, footer")
# the page's controls in the page's order, as Tab reaches them; then the footer's three links
CONTROLS = ("layer", "bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "back", "play",
            "forward", "col", "fps", "rows", "cols", "row0", "copy-link")
FOCUS_JS = """() => { const e = document.activeElement, s = getComputedStyle(e);
  return {id: e.id || e.tagName.toLowerCase(), visible: e.matches(':focus-visible'), style: s.outlineStyle,
          width: s.outlineWidth}; }"""


def _state(page) -> dict:
    return page.evaluate("() => window.gptqExplorer.state()")


def _drawn_column(page) -> int:
    return page.evaluate("() => document.querySelector('#figure').gptqState.k")


def test_the_site_fits_every_screen(browser, site):
    # desc_act and an unknown key: the longer explanation and a note above the figure are shown too
    page = open_site(browser, site, "#desc_act=1&col=40&foo=1", viewport=VIEWPORTS[0])
    try:
        assert "unknown key foo" in page.inner_text("#messages")
        problems, measured = [], []
        for w, h in VIEWPORTS:
            page.set_viewport_size({"width": w, "height": h})
            page.wait_for_timeout(300)  # the canvas follows its box (a ResizeObserver) and redraws
            found = fit(page, TEXTS, "select")
            measured.append(found["measured"])
            page.screenshot(path=str(ARTIFACTS / f"site-{w}x{h}.png"))
            canvas = page.locator("#figure canvas").bounding_box()
            if (found["scroll"] > min(found["inner"], found["client"]) or found["wide"] or found["cut"]
                    or canvas["x"] + canvas["width"] > w):
                problems.append(f"{w}x{h}: {found}, canvas {canvas}")
        assert problems == [], "\n".join(problems)
        # the measuring looked at the page's texts and its three menus at every size
        assert min(measured) >= 40, measured
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_no_serious_accessibility_violation(browser, site):
    """axe-core with the page drawn, while it plays, and with the link shown in its field (the clipboard
    refused), a note above the figure all along."""
    from axe_playwright_python.sync_playwright import Axe

    page = open_site(browser, site, "#col=10&foo=1", clipboard="refuse", viewport=(1280, 720))
    try:
        page.evaluate(Axe().axe_script)
        found = {"drawn": serious_violations(page, ARTIFACTS / "axe-site.json")}
        page.click("#play")
        page.wait_for_function("() => document.querySelector('#figure').gptqState.k >= 14", timeout=20_000)
        assert page.inner_text("#play") == "❚❚ pause"
        found["playing"] = serious_violations(page, ARTIFACTS / "axe-site-playing.json")
        page.click("#play")
        page.click("#copy-link")
        page.wait_for_function("() => !document.querySelector('#link-text').hidden", timeout=5_000)
        found["copy-link"] = serious_violations(page, ARTIFACTS / "axe-site-copy-link.json")
        assert len(found) == 3 and all(v == [] for v in found.values()), json.dumps(found, indent=1)
        # the step buttons are named after what they do, not their arrows
        for name in ("previous column", "next column", "▶ play", "Copy link"):
            assert page.get_by_role("button", name=name, exact=True).count() == 1, name
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_keyboard_reaches_every_control(browser, site):
    page = open_site(browser, site, "#col=10", viewport=(1280, 720))
    try:
        page.evaluate("() => document.activeElement.blur()")
        reached = []
        for _ in range(len(CONTROLS) + 3):
            page.keyboard.press("Tab")
            reached.append(page.evaluate(FOCUS_JS))
        # every control, in the page's order, then the footer's links; each with the 3 px focus outline
        assert [r["id"] for r in reached] == [*CONTROLS, "a", "a", "a"], reached
        assert all(r["visible"] and r["style"] == "solid" and r["width"] == "3px" for r in reached), reached

        # and each works from the keyboard: the column slider's arrows, the step buttons, play, a menu, a box
        page.focus("#col")
        page.keyboard.press("ArrowRight")
        page.wait_for_function("() => document.querySelector('#figure').gptqState.k === 11", timeout=10_000)
        page.focus("#forward")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelector('#figure').gptqState.k === 12", timeout=10_000)
        page.focus("#back")
        page.keyboard.press("Space")
        page.wait_for_function("() => document.querySelector('#figure').gptqState.k === 11", timeout=10_000)
        assert _state(page)["col"] == 11
        page.focus("#play")
        page.keyboard.press("Space")
        page.wait_for_function("() => document.querySelector('#figure').gptqState.k >= 14", timeout=20_000)
        page.keyboard.press("Space")
        assert page.inner_text("#play") == "▶ play"
        paused = _drawn_column(page)
        page.wait_for_timeout(400)
        assert _drawn_column(page) == paused
        page.focus("#bits")
        page.keyboard.press("ArrowDown")  # 4 -> 5 bits: a new run
        page.evaluate("() => window.gptqExplorer.ready()")
        page.focus("#desc_act")
        page.keyboard.press("Space")
        page.evaluate("() => window.gptqExplorer.ready()")
        state = _state(page)
        assert (state["bits"], state["desc_act"]) == (5, True)
        assert "desc_act" in page.evaluate("() => document.querySelector('#figure').gptqState.diag_title")
        assert page.outside == [] and page.errors == []
    finally:
        page.close()
