"""The Layer Lab's Hessian view in a real browser: a link with `hessian=1` opens it (the spectrum drawn, its
numbers as text in `.gptq-hessian`), a damping change redraws it, and the page shows no error.

Uses the shared Voila server and Chromium fixtures of browser_fixtures.py (skips where Chromium or
Playwright is absent). Run alone:
`.venv/bin/python -m pytest -m browser tests/test_ui_browser_hessian.py -s`.
"""

from __future__ import annotations

import re
import time

import pytest
from browser_fixtures import (
    ARTIFACTS,
    PAGE_TIMEOUT,
    assert_clean,
    close_page,
    note_timing,
    wait_on_page,
)
from browser_helpers import open_page, slider, wait_for_app

pytestmark = pytest.mark.browser

CONDITION = re.compile(r"condition number (\S+) → (\S+) after damping \(λ = (\S+) × mean diag\(H\)")


def _numbers(page) -> str:
    return page.inner_text(".gptq-hessian").replace("\xa0", " ")


def test_a_link_opens_the_hessian_view(browser, voila):
    page = open_page(browser)
    try:
        t0 = time.monotonic()
        page.goto(f"{voila.url}/?model=synthetic&hessian=1", timeout=PAGE_TIMEOUT * 1000)
        wait_for_app(page, PAGE_TIMEOUT, 0.3)
        page.wait_for_selector(".gptq-hessian .gptq-hessian-done", state="visible", timeout=60_000)
        note_timing("hessian_link_to_numbers", time.monotonic() - t0)
        text = _numbers(page)
        m = CONDITION.search(text)
        assert m, text
        before, after, damp = float(m.group(1)), float(m.group(2)), float(m.group(3))
        assert before > after > 1 and damp == 0.01, text
        assert "dead inputs: 0 of 576" in text and "max/median" in text, text
        assert page.locator(".gptq-hessian svg.gptq-hessian-plot polyline").count() == 3
        assert page.locator("button.mod-active", has_text="Hessian").count() == 1  # the toggle is on
        assert_clean(page, "Hessian view")

        # more damping (the slider's handle, a quarter decade): the numbers follow
        handle = slider(page, "damp_percent").locator(".noUi-handle")
        handle.focus()
        handle.press("ArrowRight")
        m2 = wait_on_page(page, lambda: (m := CONDITION.search(_numbers(page))) and float(m.group(3)) > damp
                          and m, 60, "the Hessian view to follow the damping")
        assert float(m2.group(2)) < after and float(m2.group(1)) == before, _numbers(page)
        page.screenshot(path=str(ARTIFACTS / "explorer-hessian.png"), full_page=True)
        assert_clean(page, "after a damping change")
    finally:
        close_page(page)
