"""One call to see a quantized layer's grid: ``grid_view(layer)`` -> a plotly figure.

``layer`` is one entry of ``QuantizedCheckpoint.layers`` (an ``UnpackedLinear``, read from any GPTQ
checkpoint) or an engine ``QuantResult``. Both hold the nn.Linear layout: codes ``[out, in]``, scales and
zeros ``[out, n_groups]``, g_idx ``[in]``, with ``w = scale[g] * (code - zero[g])``, ``g = g_idx[column]``.

Panels:

* scales per group: for every group (x), a histogram of its ``out`` scales (y: scale bins, colour: number
  of output rows), so groups with a wider or shifted range of scales stand out;
* zero-point usage: how many (row, group) pairs use each zero value ``0 .. 2**bits - 1`` (symmetric
  grids use only ``2**(bits-1)``; an asymmetric grid that needs a zero of 0 cannot be stored as v1 gptq);
* code histogram: how often each integer code ``0 .. 2**bits - 1`` occurs in the layer;
* g_idx order (only with act-order, desc_act): the group of every input column. Without act-order it is
  ``column // group_size``, a staircase, and the panel is left out.

The figure object is returned; render it with the explorer's offline display (no CDN) or ``fig.show()``.
"""

from __future__ import annotations

import numpy as np

from ..checkpoint.format import to_numpy, whole_numbers

SCALE_BINS = 40


def layer_arrays(layer) -> dict:
    """codes, scales, zeros, g_idx (numpy), bits and desc_act (None when the layer does not say) of an
    ``UnpackedLinear`` or a ``QuantResult``."""
    config = getattr(layer, "config", None)
    bits = getattr(layer, "bits", None) or getattr(config, "bits", None)
    if bits is None:
        raise TypeError(
            "grid_view needs a checkpoint layer (UnpackedLinear) or a QuantResult, "
            f"got {type(layer).__name__}"
        )
    codes = whole_numbers(layer.codes, "codes")
    scales = to_numpy(layer.scales).astype(np.float64)
    zeros = whole_numbers(layer.zeros, "zeros")
    g_idx = whole_numbers(layer.g_idx, "g_idx")
    if codes.ndim != 2 or scales.ndim != 2 or scales.shape != zeros.shape:
        raise ValueError(
            f"expected codes [out, in] and scales/zeros [out, n_groups], got codes {codes.shape}, "
            f"scales {scales.shape}, zeros {zeros.shape}"
        )
    if scales.shape[0] != codes.shape[0] or g_idx.shape != (codes.shape[1],):
        raise ValueError(f"shapes disagree: codes {codes.shape}, scales {scales.shape}, g_idx {g_idx.shape}")
    top = 2**bits
    for what, a in (("codes", codes), ("zeros", zeros)):
        if a.size and (a.min() < 0 or a.max() >= top):
            raise ValueError(f"{what} must lie in [0, {top - 1}] for {bits}-bit, got [{a.min()}, {a.max()}]")
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= scales.shape[1]):
        raise ValueError(f"g_idx must lie in [0, {scales.shape[1] - 1}], got [{g_idx.min()}, {g_idx.max()}]")
    desc_act = getattr(config, "desc_act", None)
    return {
        "codes": codes,
        "scales": scales,
        "zeros": zeros,
        "g_idx": g_idx,
        "bits": int(bits),
        "desc_act": None if desc_act is None else bool(desc_act),
    }


def scale_histograms(scales: np.ndarray, bins: int = SCALE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Per-group histograms of the scales on shared bin edges: counts ``[bins, n_groups]`` and the
    ``bins + 1`` edges. Column g counts the output rows whose scale of group g falls in each bin."""
    edges = np.histogram_bin_edges(scales, bins=bins)
    counts = np.stack([np.histogram(scales[:, g], bins=edges)[0] for g in range(scales.shape[1])], axis=1)
    return counts, edges


def _colorbar_beside(fig) -> dict:
    """A slim colour bar just right of the first subplot (not at the far right, over other panels)."""
    x0, x1 = fig.layout.xaxis.domain
    y0, y1 = fig.layout.yaxis.domain
    return dict(
        title=dict(text="rows", side="top"),
        x=x1 + 0.005,
        xanchor="left",
        y=(y0 + y1) / 2,
        len=y1 - y0,
        thickness=10,
    )


def _axis_titles(fig, cell, x: str, y: str) -> None:
    fig.update_xaxes(title_text=x, row=cell[0], col=cell[1])
    fig.update_yaxes(title_text=y, row=cell[0], col=cell[1])


def _count_bars(fig, cell, name: str, levels, counts, color: str, hover: str, x_title: str, y_title: str):
    """A bar chart of how often each level 0 .. 2**bits - 1 occurs, in one panel."""
    import plotly.graph_objects as go

    fig.add_trace(
        go.Bar(name=name, x=levels, y=counts, marker_color=color, hovertemplate=hover + "<extra></extra>"),
        *cell,
    )
    _axis_titles(fig, cell, x_title, y_title)


def _panels(desc_act: bool):
    """The empty figure and its panel cells: three in a row, or a 2x2 grid with the g_idx order."""
    from plotly.subplots import make_subplots

    titles = ["scales per group", "zero-point usage", "code histogram"]
    if desc_act:
        titles.append("g_idx order (act-order)")
        fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.14,
                            vertical_spacing=0.16)  # fmt: skip
        return fig, [(1, 1), (1, 2), (2, 1), (2, 2)]
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.15)
    return fig, [(1, 1), (1, 2), (1, 3)]


def _scale_heatmap(fig, cell, scales: np.ndarray, sizes: np.ndarray, bins: int) -> None:
    """Scales per group: a histogram of each group's scales as one column of a heatmap."""
    import plotly.graph_objects as go

    counts, edges = scale_histograms(scales, bins)
    centers = (edges[:-1] + edges[1:]) / 2
    fig.add_trace(
        go.Heatmap(
            name="scales per group",
            x=np.arange(scales.shape[1]),
            y=centers,
            z=counts,
            colorscale="Viridis",
            colorbar=_colorbar_beside(fig),
            customdata=np.tile(sizes, (counts.shape[0], 1)),
            hovertemplate="group %{x} (%{customdata} columns)<br>scale ≈ %{y:.4g}<br>%{z} rows"
            "<extra></extra>",
        ),
        *cell,
    )
    _axis_titles(fig, cell, "group", "scale")


def _g_idx_order(fig, cell, g_idx: np.ndarray) -> None:
    """The group of every input column (shown with act-order only: without it, a staircase)."""
    import plotly.graph_objects as go

    fig.add_trace(
        go.Scatter(
            name="g_idx",
            x=np.arange(g_idx.size),
            y=g_idx,
            mode="markers",
            marker=dict(size=3, color=g_idx, colorscale="Turbo"),
            hovertemplate="input column %{x} -> group %{y}<extra></extra>",
        ),
        *cell,
    )
    _axis_titles(fig, cell, "input column", "group (g_idx)")


def grid_view(layer, name: str | None = None, *, desc_act: bool | None = None, bins: int = SCALE_BINS):
    """A plotly ``go.Figure`` with the layer's grid: scales per group, zero-point usage, code histogram,
    and the g_idx order when act-order (desc_act) is on.

    desc_act: None takes it from a QuantResult's config, or, for a checkpoint layer (which does not
    carry it), from g_idx itself: act-order is on when g_idx is not sorted.
    """
    a = layer_arrays(layer)
    codes, scales, zeros, g_idx, bits = a["codes"], a["scales"], a["zeros"], a["g_idx"], a["bits"]
    if desc_act is None:
        desc_act = a["desc_act"] if a["desc_act"] is not None else bool(np.any(np.diff(g_idx) < 0))
    n_groups = scales.shape[1]
    levels = np.arange(2**bits)
    sizes = np.bincount(g_idx, minlength=n_groups)

    fig, cells = _panels(desc_act)
    _scale_heatmap(fig, cells[0], scales, sizes, bins)
    zero_counts = np.bincount(zeros.ravel(), minlength=levels.size)
    _count_bars(fig, cells[1], "zero points", levels, zero_counts, "#d62728",
                "zero %{x}: %{y} (row, group) pairs", "zero point", "(row, group) pairs")
    code_counts = np.bincount(codes.ravel(), minlength=levels.size)
    _count_bars(fig, cells[2], "codes", levels, code_counts, "#1f77b4", "code %{x}: %{y} weights",
                "integer code", "weights")
    if desc_act:
        _g_idx_order(fig, cells[3], g_idx)

    out_f, in_f = codes.shape
    distinct = np.unique(sizes)
    width = (
        f"{distinct[0]} columns each" if distinct.size == 1 else f"{distinct.min()}-{distinct.max()} columns"
    )
    used = np.flatnonzero(zero_counts)
    zero_note = f"zero {used[0]} only" if used.size == 1 else f"{used.size} zero values in use"
    head = f"{name}: " if name else ""
    fig.update_layout(
        title=dict(
            text=f"{head}{bits}-bit grid, {out_f}x{in_f}, {n_groups} group(s) of {width}, {zero_note}, "
            f"act-order {'on' if desc_act else 'off'}",
            font=dict(size=14),
        ),
        showlegend=False,
        height=640 if desc_act else 360,
        margin=dict(l=60, r=30, t=80, b=50),
        bargap=0.1,
    )
    return fig
