"""The logic behind the lesson notebooks (notebooks/01-03): every number a lesson states is computed here.

The notebooks stay short: they call these functions, show the figures and tables they return, and assert
the claims their text makes. tests/test_lessons.py checks the same functions with numeric assertions.

Plots: `show(fig)` renders a plotly figure as self-contained HTML (no CDN, no MathJax script tag). The
first figure shown in a kernel carries plotly.js itself (about 4.8 MB, once); later ones reuse it. That
output works the same in JupyterLab, in an nbconvert HTML export and in Voila, offline. Animations and
sliders are plotly's own (frames, `updatemenus`, `sliders`): they play in the browser without a kernel.

Contents
  common      setup, show, html_table, relative errors
  lesson 1    rtn_error_study: per-layer RTN error and how it compounds through SmolLM2's blocks
  lesson 2    the OBS update on three real weights, checked by brute force
  lesson 3    GPTQ step by step: stepper frames, column order, lazy batches, the Cholesky rows,
              and what happens without the H^-1 downdate
"""

from __future__ import annotations

import html
import itertools
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .engine import Hessian, QuantConfig, gptq_quantize, gptq_steps, rtn_quantize
from .engine.gptq import hinv_cholesky_upper
from .engine.grid import dequantize, grid_params, quantize_codes

# ---------------------------------------------------------------------------------------------------------
# common


def setup(threads: int | None = None) -> int:
    """Torch threads for a lesson: `threads`, else $GPTQ_EXPLORER_THREADS, else 1.

    One thread is the default because the lessons run on busy 2-core machines, where a second torch
    thread mostly waits for a core (measured while writing lesson 1: a SmolLM2 block took 0.27 s on
    1 thread and 0.7-0.8 s on 2). Returns the number in use."""
    if threads is None:
        value = os.environ.get("GPTQ_EXPLORER_THREADS", "")
        threads = int(value) if value.strip().isdigit() and int(value) >= 1 else 1
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


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius), for NumPy arrays or torch tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return float((a - b).norm() / b.norm())
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def output_rel_error(W, Q, H) -> float:
    """Relative output error ||X (W - Q)^T|| / ||X W^T|| from the inputs' Hessian H = 2/n X^T X."""
    W, Q, H = (np.asarray(a, dtype=np.float64) for a in (W, Q, H))
    D = W - Q
    return float(math.sqrt(np.sum((D @ H) * D) / np.sum((W @ H) * W)))


# ---------------------------------------------------------------------------------------------------------
# lesson 1: why round-to-nearest fails


@dataclass
class LayerError:
    name: str  # e.g. "model.layers.3.mlp.down_proj"
    block: int
    sublayer: str  # e.g. "mlp.down_proj"
    shape: tuple[int, int]  # (out, in)
    weight_rel: float  # ||W - Q|| / ||W||
    output_rel: float  # ||X (W - Q)^T|| / ||X W^T|| on the lesson's tokens (FP inputs)


@dataclass
class RTNStudy:
    """Everything lesson 1 measures, for one RTN config on a few held-out windows."""

    config: QuantConfig
    corpus: str
    n_windows: int
    seqlen: int
    layers: list[LayerError]
    cumulative: list[float]  # rel. error of block k's output, blocks 0..k quantized
    isolated: list[float]  # rel. error of block k's output, only block k quantized (FP inputs)
    hidden_rms: list[float]  # RMS of the FP hidden state after block k
    error_rms: list[float]  # RMS of the cumulative error after block k
    ppl_fp: float
    ppl_rtn: float
    seconds: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return len(self.cumulative)

    def amplification(self) -> list[float]:
        """cumulative / isolated per block: > 1 means the upstream blocks' errors add to this block's own."""
        return [c / i for c, i in zip(self.cumulative, self.isolated)]

    def by_sublayer(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for e in self.layers:
            out.setdefault(e.sublayer, []).append(e.output_rel)
        return out

    def layer_rows(self) -> list[dict]:
        """Per sublayer type: median and range over the blocks of the relative weight and output errors."""
        rows = []
        groups: dict[str, list[LayerError]] = {}
        for e in self.layers:
            groups.setdefault(e.sublayer, []).append(e)
        for sub, es in groups.items():
            w = np.array([e.weight_rel for e in es])
            o = np.array([e.output_rel for e in es])
            rows.append({"sublayer": sub, "shape (out, in)": f"{es[0].shape[0]}x{es[0].shape[1]}",
                         "weight error (median)": float(np.median(w)),
                         "output error (median)": float(np.median(o)),
                         "output error (min)": float(o.min()), "output error (max)": float(o.max())})
        return rows


def _swap_weights(block, adapter, new: dict):
    """Write new (out, in) weights into a block's linears; returns the originals (to restore)."""
    from .models import get_weight, set_weight

    lin = adapter.linears(block)
    old = {n: get_weight(m).detach().clone() for n, m in lin.items()}
    for n, m in lin.items():
        set_weight(m, new[n])
    return old


def _restore(block, adapter, old: dict) -> None:
    from .models import set_weight

    for n, m in adapter.linears(block).items():
        set_weight(m, old[n])


def _window_ppl(model, hidden: torch.Tensor, ids: torch.Tensor, adapter) -> float:
    """exp(mean over windows of the mean next-token CE) from the last block's outputs (the paper's protocol,
    gptq_explorer.metrics.perplexity)."""
    import torch.nn.functional as F

    from .models import head_logits

    losses = []
    with torch.no_grad():
        for i in range(hidden.shape[0]):
            logits = head_logits(model, hidden[i : i + 1], adapter)[0, :-1].float()
            losses.append(float(F.cross_entropy(logits, ids[i, 1:])))
    return math.exp(sum(losses) / len(losses))


def rtn_error_study(lm, cfg: QuantConfig | None = None, n_windows: int = 8, seqlen: int = 256,
                    corpus: str = "prose") -> RTNStudy:
    """Round-to-nearest on every linear of every block of a loaded model, measured on held-out windows.

    Three passes over the blocks, all on the same `n_windows` windows of `seqlen` tokens from the start of
    the corpus' evaluation part:
      FP          the original model; hooks measure each linear's own output error ||X (W - Q)^T|| / ||X W^T||
                  with its FP input X (the per-layer error, no upstream error);
      cumulative  blocks 0..k RTN-quantized: the hidden state after block k vs FP (errors compound);
      isolated    only block k quantized, fed the FP hidden state: its own error, nothing upstream.
    The model is restored afterwards. Perplexity: FP and all blocks quantized, on these windows.
    """
    from .data import evaluation_ids
    from .models import catch_block_inputs, get_adapter, get_weight, run_block

    cfg = cfg or QuantConfig()
    model = lm.model
    adapter = lm.adapter or get_adapter(model)
    blocks = adapter.get_blocks(model)
    ids = evaluation_ids(lm.tokenizer, corpus, n_tokens=n_windows * seqlen).reshape(n_windows, seqlen)
    seconds = {}

    t = time.perf_counter()
    qweights = []
    for block in blocks:
        lin = adapter.linears(block)
        qweights.append({n: rtn_quantize(get_weight(m).detach().float().clone(), cfg).weight
                         for n, m in lin.items()})
    seconds["rtn"] = time.perf_counter() - t

    t = time.perf_counter()
    inputs = catch_block_inputs(model, ids, adapter)
    acc: dict[str, list] = {}

    def hook(name, W, Q):
        D = W - Q

        def f(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            e = x @ D.T
            y = output.reshape(-1, output.shape[-1]).float()
            a = acc.setdefault(name, [0.0, 0.0])
            a[0] += float((e * e).sum())
            a[1] += float((y * y).sum())

        return f

    handles = []
    shapes, wrel = {}, {}
    for k, block in enumerate(blocks):
        for n, m in adapter.linears(block).items():
            full = f"{adapter.block_prefix(k)}.{n}"
            W = get_weight(m).detach().float()
            Q = qweights[k][n]
            shapes[full] = tuple(W.shape)
            wrel[full] = rel_error(Q, W)
            handles.append(m.register_forward_hook(hook(full, W, Q)))
    fp = []
    try:
        with torch.no_grad():
            x = inputs.hidden
            for block in blocks:
                x = run_block(block, x, inputs)
                fp.append(x)
    finally:
        for h in handles:
            h.remove()
    seconds["fp_pass"] = time.perf_counter() - t

    t = time.perf_counter()
    cumulative, isolated, error_rms = [], [], []
    x = inputs.hidden
    with torch.no_grad():
        for k, block in enumerate(blocks):
            old = _swap_weights(block, adapter, qweights[k])
            try:
                x = run_block(block, x, inputs)
                y = run_block(block, inputs.hidden if k == 0 else fp[k - 1], inputs)
            finally:
                _restore(block, adapter, old)
            cumulative.append(rel_error(x, fp[k]))
            isolated.append(rel_error(y, fp[k]))
            error_rms.append(float((x - fp[k]).double().pow(2).mean().sqrt()))
    seconds["quantized_passes"] = time.perf_counter() - t

    layers = []
    for full, (sse, ssy) in acc.items():
        k = int(full[len(adapter.blocks) + 1 :].split(".", 1)[0])
        layers.append(LayerError(full, k, full.split(".", len(adapter.blocks.split(".")) + 1)[-1],
                                 shapes[full], wrel[full], math.sqrt(sse / ssy)))
    return RTNStudy(
        config=cfg, corpus=corpus, n_windows=n_windows, seqlen=seqlen, layers=layers,
        cumulative=cumulative, isolated=isolated,
        hidden_rms=[float(h.double().pow(2).mean().sqrt()) for h in fp], error_rms=error_rms,
        ppl_fp=_window_ppl(model, fp[-1], ids, adapter), ppl_rtn=_window_ppl(model, x, ids, adapter),
        seconds=seconds,
    )


# Lesson 1 at a larger setting than the notebook can afford in 3 minutes on 2 cores. Reproduce with
#   rtn_error_study(load_model("smollm2-135m"), QuantConfig(), n_windows=32, seqlen=512)
# (about 7 minutes on one busy core). Values rounded as printed by full_setting_summary().
FULL_SETTING = {"n_windows": 32, "seqlen": 512}
FULL_SETTING_RESULTS: dict = {}


def study_summary(s: RTNStudy) -> dict:
    """The handful of numbers lesson 1 quotes."""
    amp = s.amplification()
    return {
        "ppl_fp": s.ppl_fp,
        "ppl_rtn": s.ppl_rtn,
        "ppl_increase": s.ppl_rtn / s.ppl_fp - 1,
        "final_cumulative": s.cumulative[-1],
        "final_isolated": s.isolated[-1],
        "final_amplification": amp[-1],
        "median_amplification": float(np.median(amp)),
        "min_amplification": float(min(amp)),
    }


# ---- figures for lesson 1


def fig_layer_errors(s: RTNStudy):
    """Per-layer relative output error of RTN, one line per sublayer type, across the blocks."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for sub, errs in s.by_sublayer().items():
        fig.add_trace(go.Scatter(x=list(range(len(errs))), y=errs, mode="lines+markers", name=sub,
                                 hovertemplate="block %{x}<br>%{y:.4f}<extra>" + sub + "</extra>"))
    fig.update_layout(
        title=f"RTN ({s.config.label()}): each layer's own output error, FP inputs",
        xaxis_title="block", yaxis_title="||X(W-Q)^T|| / ||XW^T||", height=420,
        legend=dict(orientation="h", y=-0.2), margin=dict(t=50, b=40),
    )
    return fig


def fig_propagation(s: RTNStudy):
    """Cumulative vs isolated relative error per block, and the hidden state's size (second panel)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    k = list(range(s.n_blocks))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.62, 0.38],
                        subplot_titles=("relative error of the hidden state after block k",
                                        "size of the FP hidden state and of the cumulative error (RMS)"))
    fig.add_trace(go.Scatter(x=k, y=s.cumulative, mode="lines+markers", name="blocks 0..k quantized"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=k, y=s.isolated, mode="lines+markers", name="only block k quantized"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=k, y=s.hidden_rms, mode="lines", name="RMS of FP hidden state"), row=2, col=1)
    fig.add_trace(go.Scatter(x=k, y=s.error_rms, mode="lines", name="RMS of cumulative error"), row=2, col=1)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_xaxes(title_text="block k", row=2, col=1)
    fig.update_layout(height=620, legend=dict(orientation="h", y=-0.12), margin=dict(t=60, b=40))
    return fig
