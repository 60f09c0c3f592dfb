"""The Model Lab's charts and tables: pure functions of a ResultSet (what the page shows for one config).

ppl_figure and layer_error_figure are plotly figures (shown with common.StaticPlot); summary_html and
samples_html the perplexity table and the generations side by side.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from ..services.reports import METHODS

METHOD_LABEL = {"fp": "FP (no quantization)", "rtn": "RTN", "gptq": "GPTQ"}
COLORS = {"fp": "#1f77b4", "rtn": "#7f7f7f", "gptq": "#2ca02c"}


@dataclass
class ResultSet:
    """What the page shows for one config: a report per method (or None), and where they come from."""

    origin: str  # "precomputed" | "computed" | "none"
    reports: dict  # method -> report | None
    label: str

    @property
    def complete(self) -> bool:
        return all(self.reports.get(m) is not None for m in METHODS)


def summary_html(res: ResultSet) -> str:
    """The perplexity table, FP / RTN / GPTQ per corpus, and how much of RTN's gap GPTQ closes."""
    fp = res.reports.get("fp")
    names = corpora(res)
    if not names:
        return ""
    rows = []
    for m in METHODS:
        r = res.reports.get(m)
        cells = []
        for corpus in names:
            p = (r or {}).get("perplexity", {}).get(corpus)
            base = (fp or {}).get("perplexity", {}).get(corpus)
            if p is None:
                cells.append("—")
            elif m != "fp" and base:
                cells.append(f"{p:.2f} <small>({100 * (p / base - 1):+.1f}%)</small>")
            else:
                cells.append(f"{p:.2f}")
        td = "<td style='text-align:right;padding-left:10px'>"
        rows.append(f"<tr><td style='color:{COLORS[m]}'><b>{METHOD_LABEL[m]}</b></td>"
                    + "".join(f"{td}{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th style='text-align:right;padding-left:10px'>{c}</th>" for c in names)
    note = ""
    g, r = res.reports.get("gptq"), res.reports.get("rtn")
    if g and r and fp:
        gp, rp, fpp = g.get("perplexity", {}), r.get("perplexity", {}), fp.get("perplexity", {})
        gaps = [(gp[c] - fpp[c], rp[c] - fpp[c]) for c in names if c in gp and c in rp and c in fpp]
        if gaps and all(rg > 0 for _, rg in gaps):
            kept = [1 - gg / rg for gg, rg in gaps]
            note = ("<br>GPTQ closes " + ", ".join(f"{100 * k:.0f}%" for k in kept)
                    + " of RTN's perplexity gap to FP (" + ", ".join(names) + ").")
    return (f"<div style='font-size:13px;padding:30px 6px 4px 6px'><b>Perplexity</b> "
            f"(lower is better)<table style='border-collapse:collapse;margin:6px 0'>"
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table>{note}</div>")


def samples_html(res: ResultSet, prompt: str) -> str:
    """The three models' generations from `prompt`, side by side."""
    cells = []
    for m in METHODS:
        r = res.reports.get(m)
        text = ((r or {}).get("samples") or {}).get(prompt)
        body = (f"<b>{html.escape(prompt)}</b>{html.escape(text)}" if text is not None else
                "<i style='color:#777'>no sample in this report (shipped reports carry none: press "
                "Compute to generate them here)</i>")
        cells.append(f"<td style='vertical-align:top;width:33%;padding:6px;border:1px solid #ddd'>"
                     f"<div style='color:{COLORS[m]};font-weight:600'>{METHOD_LABEL[m]}</div>"
                     "<div style='white-space:pre-wrap;font-family:monospace;font-size:12px'>"
                     f"{body}</div></td>")
    return f"<table style='border-collapse:collapse;width:900px'><tr>{''.join(cells)}</tr></table>"


def corpora(res: ResultSet) -> list[str]:
    """The evaluation corpora of a result set's reports, in order of appearance."""
    out: list[str] = []
    for m in METHODS:
        for c in ((res.reports.get(m) or {}).get("perplexity") or {}):
            if c not in out:
                out.append(c)
    return out


def ppl_figure(res: ResultSet) -> go.Figure:
    """Perplexity bars, FP / RTN / GPTQ per evaluation corpus."""
    names = corpora(res) or ["prose", "code"]
    fig = go.Figure()
    values = []
    for m in METHODS:
        r = res.reports.get(m) or {}
        y = [r.get("perplexity", {}).get(c) for c in names]
        values += [v for v in y if v is not None]
        fig.add_trace(go.Bar(
            x=names, y=[np.nan if v is None else v for v in y], name=METHOD_LABEL[m].split(" ")[0],
            marker_color=COLORS[m], text=["" if v is None else f"{v:.2f}" for v in y],
            textposition="outside", cliponaxis=False,
            hovertemplate="%{x}: perplexity %{y:.3f}<extra>" + METHOD_LABEL[m] + "</extra>"))
    log_y = bool(values) and max(values) / max(min(values), 1e-9) > 20
    title = "Perplexity (lower is better)" if values else "Perplexity: no result yet (press Compute)"
    fig.update_layout(
        barmode="group", width=470, height=330, template="plotly_white",
        title=dict(text=title, font=dict(size=14)), margin=dict(l=60, r=10, t=50, b=40),
        legend=dict(orientation="h", y=-0.15, x=0.5, xanchor="center"),
        yaxis=dict(title=dict(text="perplexity" + (" (log scale)" if log_y else ""), standoff=8),
                   type="log" if log_y else "linear", rangemode="tozero"),
        xaxis=dict(title=dict(text="evaluation corpus", standoff=4)))
    if values and not log_y:
        fig.update_yaxes(range=[0, max(values) * 1.18])
    return fig


def layer_error_figure(res: ResultSet) -> go.Figure:
    """Each quantized linear's relative output error, RTN and GPTQ, in quantization order."""
    fig = go.Figure()
    ticks: dict[int, str] = {}
    missing = []
    for m in ("rtn", "gptq"):
        r = res.reports.get(m) or {}
        layers = r.get("layers") or []
        ys = [row.get("output_rel_error") for row in layers]
        if not layers or all(y is None for y in ys):
            if r:
                missing.append(METHOD_LABEL[m])
            fig.add_trace(go.Scatter(x=[], y=[], name=METHOD_LABEL[m], mode="lines+markers",
                                     line=dict(color=COLORS[m])))
            continue
        names = [row["name"] for row in layers]
        for i, row in enumerate(layers):
            if i == 0 or row.get("block") != layers[i - 1].get("block"):
                ticks[i] = str(row.get("block"))
        fig.add_trace(go.Scatter(
            x=list(range(len(layers))), y=[np.nan if y is None else y for y in ys], customdata=names,
            name=METHOD_LABEL[m], mode="lines+markers", line=dict(color=COLORS[m], width=1.2),
            marker=dict(size=4), hovertemplate="%{customdata}<br>relative output error %{y:.3g}"
            "<extra>" + METHOD_LABEL[m] + "</extra>"))
    every = max(1, len(ticks) // 15)
    tick_items = list(ticks.items())[::every]
    title = "Per-layer output error on calibration inputs, ‖XWᵀ − XQᵀ‖² / ‖XWᵀ‖²"
    if not ticks:
        fig.add_annotation(text="no per-layer errors in this view yet", x=0.5, y=0.5, xref="paper",
                           yref="paper", showarrow=False, font=dict(size=14, color="#888"))
        fig.update_yaxes(showticklabels=False)
    if missing:
        title += f" (not in the report: {', '.join(missing)})"
    fig.update_layout(
        width=900, height=320, template="plotly_white", title=dict(text=title, font=dict(size=14)),
        margin=dict(l=70, r=10, t=50, b=50), legend=dict(x=1.0, xanchor="right", y=1.0),
        yaxis=dict(type="log", exponentformat="power",
                   title=dict(text="relative error (log)", standoff=8)),
        xaxis=dict(title=dict(text="decoder block (its linears in quantization order)", standoff=4),
                   tickvals=[i for i, _ in tick_items], ticktext=[t for _, t in tick_items]))
    return fig
