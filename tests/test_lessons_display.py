"""gptq_explorer.lessons.display: torch threads, offline plotly figures, HTML tables."""

from __future__ import annotations

import torch

from gptq_explorer.lessons import display as L


def test_setup_threads(monkeypatch):
    n = torch.get_num_threads()
    try:
        monkeypatch.setenv("GPTQ_EXPLORER_THREADS", "2")
        assert L.setup() == 2
        monkeypatch.setenv("GPTQ_EXPLORER_THREADS", "nonsense")
        assert L.setup() == 1
        assert L.setup(1) == 1
    finally:
        torch.set_num_threads(n)


def test_show_embeds_plotly_once_and_no_cdn(monkeypatch):
    import plotly.graph_objects as go

    monkeypatch.setattr(L, "_PLOTLYJS_SENT", False)
    fig = go.Figure(go.Scatter(y=[1, 3, 2]))
    first, second = L.show(fig).html(), L.show(fig)._repr_html_()
    assert len(first) > 3_000_000 and "window.Plotly = Plotly" in first  # the library, inline
    assert len(second) < 100_000 and "Plotly.newPlot" in second
    for h in (first, second):
        assert "<script src=" not in h and 'src="http' not in h  # nothing fetched: no CDN, no MathJax tag
        assert "cdnjs" not in h and "tex-svg" not in h
    assert "cdn.plot.ly" not in second  # (plotly.js itself mentions it, for geo maps we never draw)


def test_html_table_formats_and_escapes():
    t = L.html_table([{"a<b": 0.000012345, "x": 1234.5678, "s": "<i>"}], caption="c&d")._repr_html_()
    assert "a&lt;b" in t and "1.234e-05" in t and "1235" in t and "&lt;i&gt;" in t and "c&amp;d" in t
    assert L.html_table([])._repr_html_() == "<p>(empty)</p>"
