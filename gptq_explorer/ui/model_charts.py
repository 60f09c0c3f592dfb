"""The Model Lab's charts and tables: pure functions of a ResultSet (what the page shows for one config),
and the table of the shipped method runs (MethodTable, one click selects a run).

ppl_figure and layer_error_figure are plotly figures (shown with common.StaticPlot); summary_html and
samples_html the perplexity table and the generations side by side; method_rows / MethodTable the method
table's runs at the current bits and group size (services.results.method_runs).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from ..services.reports import METHODS, describe_report
from ..services.results import method_label

METHOD_LABEL = {"fp": "FP (no quantization)", "rtn": "RTN", "gptq": "GPTQ"}
SHORT_LABEL = {"fp": "FP", "rtn": "RTN", "gptq": "GPTQ"}
COLORS = {"fp": "#1f77b4", "rtn": "#7f7f7f", "gptq": "#2ca02c"}
TEXT_COLORS = {**COLORS, "rtn": "#666666", "gptq": "#237f23"}  # as text on white: contrast 4.5:1 at least


@dataclass
class ResultSet:
    """What the page shows for one config: a report per method (or None), and where they come from.
    names: what the page calls a method's series when the method knobs are on ("GPTAQ", "RTN + rotation");
    a method not named there is called by METHOD_LABEL."""

    origin: str  # "precomputed" | "computed" | "none"
    reports: dict  # method -> report | None
    label: str
    names: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(self.reports.get(m) is not None for m in METHODS)

    def name(self, method: str, short: bool = False) -> str:
        """A method's series name: its method label when the knobs name one, else FP / RTN / GPTQ."""
        return self.names.get(method) or (SHORT_LABEL if short else METHOD_LABEL)[method]


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
        rows.append(f"<tr><td style='color:{TEXT_COLORS[m]}'><b>{html.escape(res.name(m))}</b></td>"
                    + "".join(f"{td}{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th style='text-align:right;padding-left:10px'>{c}</th>" for c in names)
    note = ""
    g, r = res.reports.get("gptq"), res.reports.get("rtn")
    if g and r and fp:
        gp, rp, fpp = g.get("perplexity", {}), r.get("perplexity", {}), fp.get("perplexity", {})
        gaps = [(gp[c] - fpp[c], rp[c] - fpp[c]) for c in names if c in gp and c in rp and c in fpp]
        if gaps and all(rg > 0 for _, rg in gaps):
            kept = [1 - gg / rg for gg, rg in gaps]
            g_name, r_name = html.escape(res.name("gptq")), html.escape(res.name("rtn"))
            note = (f"<br>{g_name} closes " + ", ".join(f"{100 * k:.0f}%" for k in kept)
                    + f" of {r_name}'s perplexity gap to FP (" + ", ".join(names) + ").")
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
                     f"<div style='color:{TEXT_COLORS[m]};font-weight:600'>{html.escape(res.name(m))}</div>"
                     "<div style='white-space:pre-wrap;font-family:monospace;font-size:12px'>"
                     f"{body}</div></td>")
    return f"<table style='border-collapse:collapse;width:100%'><tr>{''.join(cells)}</tr></table>"


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
            x=names, y=[np.nan if v is None else v for v in y], name=res.name(m, short=True),
            marker_color=COLORS[m], text=["" if v is None else f"{v:.2f}" for v in y],
            textposition="outside", cliponaxis=False,
            hovertemplate="%{x}: perplexity %{y:.3f}<extra>" + html.escape(res.name(m)) + "</extra>"))
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
                missing.append(res.name(m))
            fig.add_trace(go.Scatter(x=[], y=[], name=res.name(m), mode="lines+markers",
                                     line=dict(color=COLORS[m])))
            continue
        names = [row["name"] for row in layers]
        for i, row in enumerate(layers):
            if i == 0 or row.get("block") != layers[i - 1].get("block"):
                ticks[i] = str(row.get("block"))
        fig.add_trace(go.Scatter(
            x=list(range(len(layers))), y=[np.nan if y is None else y for y in ys], customdata=names,
            name=res.name(m), mode="lines+markers", line=dict(color=COLORS[m], width=1.2),
            marker=dict(size=4), hovertemplate="%{customdata}<br>relative output error %{y:.3g}"
            "<extra>" + html.escape(res.name(m)) + "</extra>"))
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


# ---------------------------------------------------------------------------------------------------------
# the method table's runs at the current bits and group size


def _group_text(group_size: int) -> str:
    return "per row" if group_size == -1 else f"g{group_size}"


def method_rows(runs: list[dict], bits: int, group_size: int, sym: bool, shown=()) -> list[dict]:
    """The runs of the method table (services.results.method_runs) at this bits, group size and grid, one
    row each, RTN first, then GPTQ and its methods (fewest changes first): {"label", "report", "prose",
    "code" (perplexity or None), "quantize_s", "shown" (the page shows this report: its path is one of
    `shown`'s)}."""
    shown_paths = {r.get("path") for r in shown if r}
    rows = []
    for r in runs:
        c = r.get("config") or {}
        if r.get("method") not in ("rtn", "gptq") or r.get("overrides"):
            continue
        if (c.get("bits"), c.get("group_size"), c.get("sym", True)) != (bits, group_size, sym):
            continue
        ppl = r.get("perplexity") or {}
        label = method_label(r["method"], c)
        rows.append({"label": label, "report": r, "prose": ppl.get("prose"), "code": ppl.get("code"),
                     "quantize_s": (r.get("timings") or {}).get("quantize"),
                     "shown": r.get("path") is not None and r.get("path") in shown_paths})
    rows.sort(key=lambda row: (row["report"]["method"] != "rtn", row["label"].count("+"),
                               not row["label"].startswith("GPTQ"), row["label"]))
    return rows


def _cell(value: float | None, lo: float, hi: float, color: str) -> str:
    """A number with a bar under it (its length on a log scale between lo and hi)."""
    if value is None:
        return "<span style='color:#666'>—</span>"
    frac = 1.0 if hi <= lo else 0.15 + 0.85 * (np.log(value) - np.log(lo)) / (np.log(hi) - np.log(lo))
    return (f"<div style='text-align:right'>{value:.2f}</div><div style='height:4px;background:{color};"
            f"width:{100 * frac:.0f}%;margin-left:auto'></div>")


class MethodTable:
    """The shipped method runs at the current bits and group size: one row per run (perplexity on prose and
    code, quantize time), the rows the page shows highlighted; the method's button selects the run
    (on_select(report)). `rows` holds what is shown (method_rows)."""

    BUTTON = "220px"  # the longest label, "GPTAQ + MSE grid + rotation", needs 210 px
    WIDTHS = f"{BUTTON} 80px 80px 80px"

    def __init__(self, on_select: Callable[[dict], None]):
        self.on_select = on_select
        self.rows: list[dict] = []
        self.buttons: list[widgets.Button] = []
        self.title = widgets.HTML(value="")
        self.grid = widgets.GridBox(layout=widgets.Layout(grid_template_columns=self.WIDTHS,
                                                          grid_gap="2px 8px", align_items="center"))
        self.widget = widgets.VBox([self.title, self.grid], layout=widgets.Layout(margin="4px 0 8px 0"))
        self.widget.add_class("gptq-method-table")

    def show(self, runs: list[dict], bits: int, group_size: int, sym: bool, shown=()) -> None:
        rows = method_rows(runs, bits, group_size, sym, shown)
        self.rows = rows
        setting = f"{bits}-bit {_group_text(group_size)} {'sym' if sym else 'asym'}"
        if not rows:
            have = sorted({(c["bits"], c["group_size"], c.get("sym", True)) for r in runs
                           if (c := r.get("config") or {}) and r.get("method") in ("rtn", "gptq")},
                          key=lambda t: (-t[0], t[1] == -1, t[1]))
            where = ", ".join(f"{b}-bit {_group_text(g)} {'sym' if s else 'asym'}" for b, g, s in have)
            self.title.value = (f"<div style='font-size:13px;color:#555'><b>Methods after GPTQ</b>: no "
                                f"shipped method run at {setting}"
                                + (f"; the method table has {where}." if where else ".") + "</div>")
            self.grid.children, self.buttons = (), []
            return
        ref = next((r["report"] for r in rows if r["report"].get("calibration")), rows[0]["report"])
        self.title.value = (
            f"<div style='font-size:13px'><b>Methods after GPTQ, shipped runs at {setting}</b> "
            f"({len(rows)}; click one to show it)<br><small>Reduced protocol: "
            f"{html.escape(describe_report(ref))} (benchmarks/bench_methods.py), not the main table's "
            "128x512 protocol.</small></div>")
        head = [widgets.HTML(f"<b>{t}</b>") for t in ("method", "prose ppl", "code ppl", "quantize")]
        values = [v for row in rows for v in (row["prose"], row["code"]) if v is not None]
        lo, hi = (min(values), max(values)) if values else (1.0, 1.0)
        cells, self.buttons = list(head), []
        for row in rows:
            color = COLORS[row["report"]["method"]]
            b = widgets.Button(description=row["label"], tooltip=f"show {row['label']} at {setting}",
                               button_style="info" if row["shown"] else "",
                               layout=widgets.Layout(width=self.BUTTON))
            b.on_click(lambda _b, report=row["report"]: self.on_select(report))
            self.buttons.append(b)
            q = row["quantize_s"]
            cells += [b, widgets.HTML(_cell(row["prose"], lo, hi, color)),
                      widgets.HTML(_cell(row["code"], lo, hi, color)),
                      widgets.HTML("<div style='text-align:right'>" + ("—" if q is None else f"{q:.0f} s")
                                   + "</div>")]
        self.grid.children = cells
