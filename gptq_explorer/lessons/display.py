"""How the lessons look: `setup` (torch threads), `show` (plotly figures offline) and `html_table`.

Plots: `show(fig)` renders a plotly figure as self-contained HTML (no CDN, no MathJax script tag). The
first figure shown in a kernel carries plotly.js itself (about 4.8 MB, once); later ones reuse it. That
output works the same in JupyterLab, in an nbconvert HTML export and in Voila, offline. Animations and
sliders are plotly's own (frames, `updatemenus`, `sliders`): they play in the browser without a kernel.
"""

from __future__ import annotations

import html

from ..services.threads import env_threads


def setup(threads: int | None = None) -> int:
    """Torch threads for a lesson: `threads`, else what the environment names (services.threads.env_threads:
    $GPTQ_EXPLORER_THREADS, else $OMP_NUM_THREADS), else 1.

    One thread is the default because the lessons run on busy 2-core machines, where a second torch
    thread mostly waits for a core. Returns the number in use."""
    import torch

    if threads is None:
        threads = env_threads() or 1
    torch.set_num_threads(int(threads))
    return torch.get_num_threads()


_PLOTLYJS_SENT = False


class PlotlyHTML:
    """A plotly figure as offline HTML for Jupyter, nbconvert and Voila (see the module doc)."""

    def __init__(self, fig, include_plotlyjs: bool):
        self.fig = fig
        self.include_plotlyjs = include_plotlyjs

    def html(self) -> str:
        import plotly.io as pio

        return pio.to_html(
            self.fig,
            full_html=False,
            include_plotlyjs=self.include_plotlyjs,
            include_mathjax=False,
            auto_play=False,
            config={"displaylogo": False, "responsive": True},
            default_width="100%",
        )

    def _repr_html_(self) -> str:
        return self.html()


def show(fig) -> PlotlyHTML:
    """Display object for a plotly figure: offline, no CDN. The first one in a kernel embeds plotly.js."""
    global _PLOTLYJS_SENT
    out = PlotlyHTML(fig, include_plotlyjs=not _PLOTLYJS_SENT)
    _PLOTLYJS_SENT = True
    return out


class HTMLTable:
    def __init__(self, text: str):
        self.text = text

    def _repr_html_(self) -> str:
        return self.text


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def html_table(rows: list[dict], caption: str = "") -> HTMLTable:
    """A small HTML table from a list of dicts (same keys), floats with 4 significant digits."""
    if not rows:
        return HTMLTable("<p>(empty)</p>")
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[k]))}</td>" for k in keys) + "</tr>" for r in rows
    )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return HTMLTable(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
