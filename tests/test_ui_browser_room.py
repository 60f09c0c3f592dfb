"""The app in a real room: a projector's and a laptop's screens, a notebook's width, the keyboard, a screen
reader's view (axe), presenter mode, Save picture and reduced motion, in headless Chromium.

One page (`?model=synthetic`) is reused: for each viewport, each tab must fit (nothing wider than the window,
no label or number cut) and is saved as artifacts/browser/room-<w>x<h>-<tab>.png; axe-core finds no serious
or critical violation on any tab (its results: artifacts/browser/axe-<tab>.json); the Layer Lab's keys move
the figure's column; P toggles presenter mode; Save picture downloads a PNG. A second page, with
prefers-reduced-motion, starts paused and a method's "animate" only sets it up.

Uses the shared Voila server and Chromium fixtures of browser_fixtures.py (skips where Chromium or
Playwright is absent). Run alone: `.venv/bin/python -m pytest -m browser tests/test_ui_browser_room.py -s`.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from browser_fixtures import (
    ARTIFACTS,
    PAGE_TIMEOUT,
    VIEWPORTS,
    assert_clean,
    close_page,
    fit,
    note_timing,
    serious_violations,
    wait_on_page,
)
from browser_helpers import open_page, plot_state, slider, slider_value, wait_for_app, wait_until

pytestmark = pytest.mark.browser

TABS = {"layer": "Layer Lab", "model": "Model Lab", "sweeps": "Sweeps", "questions": "Questions"}
# the labels and numbers that must not be cut (browser_fixtures.fit)
TEXTS = ('.widget-label, .widget-readout, .lm-TabBar-tabLabel, button, .widget-html-content, '
         '.widget-html-content b, .widget-html-content h3, .gptq-model-name')


@pytest.fixture(scope="module")
def page(browser, voila):
    p = open_page(browser, viewport=VIEWPORTS[0])
    t0 = time.monotonic()
    p.goto(f"{voila.url}/?model=synthetic", timeout=PAGE_TIMEOUT * 1000)
    wait_for_app(p, PAGE_TIMEOUT, 0.3)
    note_timing("room_page_ready", time.monotonic() - t0)
    try:
        yield p
    finally:
        close_page(p)


def _tab(page, key: str) -> None:
    """Show a tab and wait until its content is there (the Sweeps: the sweep finished)."""
    page.locator(".lm-TabBar-tab", has_text=TABS[key]).click()
    if key == "layer":
        page.wait_for_selector(".gptq-layer-figure[data-drawn]", state="visible", timeout=30_000)
    elif key == "model":
        page.wait_for_selector(".gptq-model-status", state="visible", timeout=60_000)
        page.wait_for_selector(".gptq-method-table", state="visible", timeout=30_000)
    elif key == "sweeps":
        wait_on_page(page, lambda: page.locator(".js-plotly-plot:visible").count() >= 2
                     and not page.locator("button:visible", has_text="Cancel").count(), 90,
                     "the sweep to finish")
    else:
        page.wait_for_selector(".gptq-question", state="visible", timeout=30_000)
    time.sleep(0.25)  # plotly's responsive resize and the canvas's ResizeObserver settle


def _column(page) -> int | None:
    s = plot_state(page)
    return int(s["marker_x"][0]) if s and s["marker_x"].size else None


def _column_is(page, k: int, what: str) -> None:
    wait_on_page(page, lambda: _column(page) == k, 15, f"{what}: the figure at column {k}")


def test_every_tab_fits_every_screen(page):
    t0 = time.monotonic()
    problems = []
    for w, h in VIEWPORTS:
        page.set_viewport_size({"width": w, "height": h})
        for key in TABS:
            _tab(page, key)
            found = fit(page, TEXTS)
            page.screenshot(path=str(ARTIFACTS / f"room-{w}x{h}-{key}.png"))
            if found["scroll"] > found["inner"] or found["wide"] or found["cut"]:
                problems.append(f"{w}x{h} {key}: {found}")
    note_timing("room_viewports", time.monotonic() - t0)
    assert problems == [], "\n".join(problems)
    assert_clean(page, "every tab at every size")


def test_no_serious_accessibility_violation(page):
    """axe-core on every tab: no serious or critical violation (no exclusion needed: what ipywidgets' own
    markup lacked, the room's script adds, see gptq_explorer/ui/layer_room.js)."""
    from axe_playwright_python.sync_playwright import Axe

    page.set_viewport_size({"width": 1280, "height": 720})
    page.evaluate(Axe().axe_script)  # axe-core, once (Axe.run would inject it again for every tab)
    found = {}
    t0 = time.monotonic()
    for key in TABS:
        _tab(page, key)
        bad = serious_violations(page, ARTIFACTS / f"axe-{key}.json")
        if bad:
            found[key] = bad
    note_timing("room_axe", time.monotonic() - t0)
    assert found == {}, json.dumps(found, indent=1)
    # every slider is named after its description, and the Play control's icon buttons after their action
    _tab(page, "layer")
    names = page.evaluate("""() => Array.from(document.querySelectorAll('.widget-slider')).filter((s) =>
      s.getClientRects().length).map((s) => [s.querySelector('.widget-label').textContent.trim(),
      s.querySelector('.noUi-handle').getAttribute('aria-label')])""")
    assert names and all(label == name for label, name in names), names
    assert page.locator(".widget-play button[aria-label='play']").count() == 1


def test_keyboard_map(page):
    page.set_viewport_size({"width": 1280, "height": 720})
    _tab(page, "layer")
    figure = page.locator(".gptq-layer-figure")
    figure.focus()
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineWidth")
    assert outline == "3px", outline  # focus is visible (:focus-visible: reached from the keyboard)
    page.keyboard.press("Home")
    _column_is(page, 0, "Home")
    page.keyboard.press("Space")  # play
    wait_on_page(page, lambda: (_column(page) or 0) >= 3, 30, "Space to play")
    page.keyboard.press("Space")  # pause
    col = int(wait_until(lambda: (c := _column(page)) is not None and _still(page, c), 10, 0.2, "a pause"))
    page.keyboard.press("ArrowRight")
    _column_is(page, col + 1, "→")
    page.keyboard.press("ArrowLeft")
    _column_is(page, col, "←")
    page.keyboard.press("End")
    _column_is(page, 575, "End")
    page.keyboard.press("Home")
    _column_is(page, 0, "Home")
    page.keyboard.press("n")  # the next group starts at 128 (group size 128)
    _column_is(page, 128, "N")
    page.keyboard.press("b")  # the next lazy-update block (block size 128)
    _column_is(page, 256, "B")
    assert slider_value(page, "column") == "256"

    # a key the focused control handles is its own: a slider's arrows move that slider, not the column
    handle = slider(page, "frames/s").locator(".noUi-handle")
    handle.focus()
    page.keyboard.press("ArrowRight")
    wait_until(lambda: slider_value(page, "frames/s") == "16", 10, what="frames/s to follow its arrow key")
    page.keyboard.press("ArrowLeft")
    # and no key acts while typing in a menu (the preset's)
    page.locator(".gptq-layer-lab").get_by_label("preset").focus()
    page.keyboard.press("n")
    time.sleep(0.5)
    assert _column(page) == 256
    assert_clean(page, "after the keys")


def _still(page, col: int) -> int | None:
    time.sleep(0.4)
    return col if _column(page) == col else None


def test_presenter_mode_and_save_picture(page):
    page.set_viewport_size({"width": 1280, "height": 720})
    _tab(page, "layer")
    lab = page.locator(".gptq-layer-lab")
    text_size = ("() => parseFloat(getComputedStyle(document.querySelector('.gptq-lab-text div[style]'))"
                 ".fontSize)")
    normal = page.evaluate(text_size)
    page.locator(".gptq-layer-figure").focus()
    page.keyboard.press("p")
    wait_on_page(page, lambda: lab.get_attribute("data-presenter") == "1", 5, "P to turn presenter mode on")
    assert not page.locator(".gptq-lab-panel").is_visible()  # the controls are hidden
    assert page.evaluate(text_size) >= 1.3 * normal  # bigger type
    box = page.locator(".gptq-layer-figure canvas").bounding_box()
    assert box["y"] + box["height"] <= 720 + 1, box  # the whole figure on the projector's screen
    found = fit(page, TEXTS)
    assert not (found["wide"] or found["cut"]), found
    page.screenshot(path=str(ARTIFACTS / "room-1280x720-presenter.png"))
    page.keyboard.press("p")
    wait_on_page(page, lambda: lab.get_attribute("data-presenter") == "0", 5, "P to turn presenter mode off")
    assert page.locator(".gptq-lab-panel").is_visible()
    button = page.locator(".gptq-room button", has_text="Presenter")
    button.click()
    wait_on_page(page, lambda: button.get_attribute("aria-pressed") == "true", 5, "the Presenter button")
    button.click()
    wait_on_page(page, lambda: lab.get_attribute("data-presenter") == "0", 5, "the Presenter button, off")

    # Save picture: the canvas as a PNG named after the layer, the config and the column
    col = _column(page)
    with page.expect_download(timeout=15_000) as download:
        page.locator(".gptq-save-picture").click()
    d = download.value
    name = d.suggested_filename
    assert re.fullmatch(rf"gptq-synthetic-576x576-seed-0-4-bit-g128-sym-col{col}\.png", name), name
    path = ARTIFACTS / "room-save-picture.png"
    d.save_as(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    assert_clean(page, "presenter mode and Save picture")


def test_reduced_motion_starts_paused(browser, voila):
    page = open_page(browser, viewport=(1280, 720))
    page.emulate_media(reduced_motion="reduce")
    try:
        page.goto(f"{voila.url}/?model=synthetic", timeout=PAGE_TIMEOUT * 1000)
        wait_for_app(page, PAGE_TIMEOUT, 0.3)
        page.wait_for_selector(".gptq-room[data-reduced-motion='1']", state="attached", timeout=10_000)
        # a method's "animate" sets it up at the first column without playing it
        page.locator("button", has_text="Compare methods").click()
        page.wait_for_selector(".gptq-compare-done", state="visible", timeout=90_000)
        page.locator("button[title='set the knobs of GPTAQ and play it']").click()
        wait_on_page(page, lambda: (s := plot_state(page)) and s["label"] == "4-bit g128 sym GPTAQ a=0.25",
                     60, "GPTAQ set up")
        page.wait_for_function("() => document.body.innerText.includes('asks for reduced motion')",
                               timeout=10_000)
        time.sleep(1.0)
        assert _column(page) == 0  # not playing
        # the reader's own Play still plays
        page.locator(".gptq-layer-figure").focus()
        page.keyboard.press("Space")
        wait_on_page(page, lambda: (_column(page) or 0) >= 2, 30, "Space to play under reduced motion")
        page.keyboard.press("Space")
        assert_clean(page, "reduced motion")
    finally:
        close_page(page)
