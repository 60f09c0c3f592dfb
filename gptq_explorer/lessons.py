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

from .engine import QuantConfig, gptq_quantize, gptq_steps, rtn_quantize
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


def grid_facts(W, cfg: QuantConfig) -> dict:
    """What the symmetric grid is, read back from rtn_quantize on a real weight matrix: the largest relative
    gap between each scale and 2 max|w| / (2^bits - 1) of its group, the zero points and the code range."""
    W = np.asarray(W, dtype=np.float64)
    res = rtn_quantize(W, cfg)
    width = cfg.group_width(W.shape[1])
    expected = np.stack([2 * np.abs(W[:, s : s + width]).max(axis=1) / cfg.maxq
                         for s in range(0, W.shape[1], width)], axis=1)
    return {"max_scale_rel_gap": float(np.max(np.abs(res.scales - expected) / expected)),
            "zeros": sorted({int(z) for z in np.unique(res.zeros)}),
            "codes": (int(res.codes.min()), int(res.codes.max()))}


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
    top_share: list[float] = field(default_factory=list)  # share of ||h_k||^2 in the top_channels channels
    top_channels: int = 4
    cumulative_rest: list[float] = field(default_factory=list)  # as cumulative, without the top channels
    isolated_rest: list[float] = field(default_factory=list)  # as isolated, without the top channels
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

    def block_rows(self, blocks=(0, 5, 10, 11, 12, 20, 27, 28, 29)) -> list[dict]:
        """A few blocks of the propagation measurement as table rows."""
        k = self.top_channels
        return [{"block": b, "blocks 0..k quantized": self.cumulative[b], "only block k": self.isolated[b],
                 f"0..k, without top {k} channels": self.cumulative_rest[b],
                 f"only k, without top {k} channels": self.isolated_rest[b],
                 "RMS of FP hidden state": self.hidden_rms[b],
                 f"share of top {k} channels": self.top_share[b]}
                for b in blocks]

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


def _top_share(h: torch.Tensor, k: int) -> float:
    """Share of the hidden state's squared norm carried by its k largest channels (by energy)."""
    energy = h.double().pow(2).reshape(-1, h.shape[-1]).sum(dim=0)
    return float(energy.topk(k).values.sum() / energy.sum())


def _rest_rel_error(a: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    """rel_error over all channels except ref's k largest (by energy)."""
    energy = ref.double().pow(2).reshape(-1, ref.shape[-1]).sum(dim=0)
    keep = torch.ones(ref.shape[-1], dtype=torch.bool)
    keep[energy.topk(k).indices] = False
    return rel_error(a[..., keep], ref[..., keep])


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
                    corpus: str = "prose", layer_token_stride: int = 4, top_channels: int = 4) -> RTNStudy:
    """Round-to-nearest on every linear of every block of a loaded model, measured on held-out windows.

    Three passes over the blocks, all on the same `n_windows` windows of `seqlen` tokens from the start of
    the corpus' evaluation part:
      FP          the original model; hooks measure each linear's own output error ||X (W - Q)^T|| / ||X W^T||
                  with its FP input X (the per-layer error, no upstream error), on every
                  `layer_token_stride`-th token (to save time);
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
            x = args[0].reshape(-1, args[0].shape[-1])[::layer_token_stride].float()
            e = x @ D.T
            y = output.reshape(-1, output.shape[-1])[::layer_token_stride].float()
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
    cumulative, isolated, error_rms, cum_rest, iso_rest = [], [], [], [], []
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
            cum_rest.append(_rest_rel_error(x, fp[k], top_channels))
            iso_rest.append(_rest_rel_error(y, fp[k], top_channels))
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
        top_share=[_top_share(h, top_channels) for h in fp], top_channels=top_channels,
        cumulative_rest=cum_rest, isolated_rest=iso_rest,
        ppl_fp=_window_ppl(model, fp[-1], ids, adapter), ppl_rtn=_window_ppl(model, x, ids, adapter),
        seconds=seconds,
    )


# The lessons at larger settings than a notebook can afford in 3 minutes on 2 cores, computed once with this
# module (4 significant digits). Reproduce lesson 1's with
#   study_summary(rtn_error_study(load_model("smollm2-135m"), QuantConfig(), n_windows=32, seqlen=512))
# (about 15 minutes on one busy core); lessons 2 and 3's with lesson2_summary / lesson3_summary on
#   ModelSource(block=5, sublayer="self_attn.q_proj", nsamples=128, seqlen=512, heldout_tokens=1024).load()
# (about 2 minutes).
FULL_SETTING_RESULTS: dict = {
    "lesson1": {  # 32 windows x 512 tokens of held-out prose, 4-bit g128 sym
        "ppl_fp": 14.06, "ppl_rtn": 22.06, "ppl_increase": 0.5694, "final_cumulative": 0.4069,
        "final_isolated": 0.1294, "final_amplification": 3.145, "median_amplification": 6.209,
        "largest_rms_jump": 7.863, "largest_rms_jump_block": 11,
    },
    # lesson2_summary on ModelSource(block=5, sublayer="self_attn.q_proj", nsamples=128, seqlen=512,
    # heldout_tokens=1024).load()
    "lesson2": {
        "tokens": 65536,
        "correction_ratio": 23.61,
        "rtn_over_gptq123": 2.981,
        "gptq123_over_best": 10.02,
        "some_order_finds_best": True,
    },
    "lesson3": {  # lesson3_summary on the same layer data (128 x 512 calibration, 1024 held-out tokens)
        "order_heldout": {
            "round to nearest (no order)": 0.103,
            "left to right (GPTQ)": 0.06103,
            "right to left": 0.05702,
            "random #1": 0.05838,
            "random #2": 0.05826,
            "random #3": 0.05858,
            "largest diag(H) first (desc_act)": 0.05253,
        },
        "downdate_heldout": {
            "GPTQ's / round to nearest": 0.088,
            "GPTQ's / H^-1 not downdated": 0.08059,
            "GPTQ's / H^-1 downdated (GPTQ)": 0.0512,
            "seed / round to nearest": 0.1516,
            "seed / H^-1 not downdated": 0.1404,
            "seed / H^-1 downdated (GPTQ)": 0.088,
        },
        "greedy_heldout": {
            "round to nearest": 0.1009,
            "GPTQ, left to right": 0.0913,
            "GPTQ, random order #1": 0.08419,
            "GPTQ, random order #2": 0.08268,
            "GPTQ, random order #3": 0.08304,
            "OBQ greedy, own order per row": 0.08985,
            "greedy without OBQ's outlier rule": 0.0935,
        },
    },
}


def study_summary(s: RTNStudy) -> dict:
    """The handful of numbers lesson 1 quotes for a run (and for the larger, precomputed one)."""
    amp = s.amplification()
    jumps = [b / a for a, b in zip(s.hidden_rms, s.hidden_rms[1:])]
    j = int(np.argmax(jumps))
    return {
        "ppl_fp": s.ppl_fp,
        "ppl_rtn": s.ppl_rtn,
        "ppl_increase": s.ppl_rtn / s.ppl_fp - 1,
        "final_cumulative": s.cumulative[-1],
        "final_isolated": s.isolated[-1],
        "final_amplification": amp[-1],
        "median_amplification": float(np.median(amp)),
        "largest_rms_jump": jumps[j],
        "largest_rms_jump_block": j + 1,
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


# ---------------------------------------------------------------------------------------------------------
# lesson 2: the OBS update on three real weights


@dataclass
class Triplet:
    """Three weights of one row of a real layer, with the activations of their three inputs.

    If only these three weights move (every other weight of the row stays as it is), the change of the
    row's output on token t is x_t . delta, so the layer loss is exactly
        L(delta) = mean_t (x_t . delta)^2 = 1/2 delta^T H delta,     H = 2/n X^T X   (3x3)
    a quadratic with its minimum (zero) at delta = 0.
    """

    layer: str
    row: int
    cols: tuple[int, int, int]
    w: np.ndarray  # (3,) the original weights
    X: np.ndarray  # (n, 3) calibration activations of the three inputs, float64
    scale: np.ndarray  # (3,) the row's grid for each weight's group
    zero: np.ndarray  # (3,)
    bits: int

    @property
    def H(self) -> np.ndarray:
        return 2.0 / self.X.shape[0] * (self.X.T @ self.X)

    @property
    def n_tokens(self) -> int:
        return self.X.shape[0]

    def cosine(self) -> np.ndarray:
        """Cosine similarity of the three inputs' activation vectors (over the calibration tokens)."""
        H = self.H
        d = np.sqrt(np.diag(H))
        return H / np.outer(d, d)

    def quantize(self, i: int, value: float) -> float:
        """value rounded to weight i's grid."""
        maxq = 2**self.bits - 1
        c = quantize_codes(np.array([value]), self.scale[i : i + 1], self.zero[i : i + 1], maxq)
        return float(dequantize(c, self.scale[i : i + 1], self.zero[i : i + 1])[0])

    def grid_values(self, i: int) -> np.ndarray:
        """Every value weight i can take: scale * (code - zero), code = 0 .. 2^bits - 1."""
        return self.scale[i] * (np.arange(2**self.bits) - self.zero[i])

    def loss(self, w_new) -> np.ndarray:
        """The layer loss measured directly on the activations: mean over tokens of (x . (w_new - w))^2.
        w_new: (3,) or (m, 3); evaluated in chunks, so m can be large."""
        w_new = np.atleast_2d(np.asarray(w_new, dtype=np.float64))
        out = np.empty(w_new.shape[0])
        D = w_new - self.w
        for s in range(0, D.shape[0], 2048):
            E = D[s : s + 2048] @ self.X.T
            out[s : s + 2048] = np.mean(E * E, axis=1)
        return out


def pick_triplet(data, bits: int = 4, group_size: int = 128, cols=None, row: int | None = None) -> Triplet:
    """Three strongly correlated inputs of a real layer and the row where rounding the first one costs most.

    The pair of inputs with the largest |cosine similarity| of their activations, plus the input most similar
    to both (largest min(|cos|)); the first is the pair member with the smaller index (or pass `cols`).
    The row is the one whose weight at that input, rounded to the row's grid, raises the loss most (or pass
    `row`).
    Correlated inputs are chosen on purpose: with uncorrelated inputs H is diagonal and there is nothing
    for the OBS correction to do.
    """
    H = np.asarray(data.H, dtype=np.float64)
    d = np.sqrt(np.diag(H))
    C = np.abs(H / np.outer(d, d))
    np.fill_diagonal(C, 0.0)
    i, j = np.unravel_index(int(np.argmax(C)), C.shape)
    i, j = int(min(i, j)), int(max(i, j))
    score = np.minimum(C[i], C[j])
    score[[i, j]] = -1.0
    k = int(np.argmax(score))
    cols = (i, j, k) if cols is None else tuple(int(c) for c in cols)
    W = np.asarray(data.W, dtype=np.float64)
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=True)
    width = cfg.group_width(W.shape[1])
    scales, zeros = [], []
    for c in cols:
        s0 = (c // width) * width
        scale, zero = grid_params(W[:, s0 : s0 + width], bits, True)
        scales.append(scale)
        zeros.append(zero)
    scales, zeros = np.stack(scales, axis=1), np.stack(zeros, axis=1)  # (rows, 3)
    q0 = cols[0]
    col = W[:, q0]
    qcol = dequantize(quantize_codes(col, scales[:, 0], zeros[:, 0], cfg.maxq), scales[:, 0], zeros[:, 0])
    if row is None:
        row = int(np.argmax((col - qcol) ** 2 * H[q0, q0]))
    X = np.asarray(data.X_calib, dtype=np.float64)[:, list(cols)]
    return Triplet(layer=data.name, row=row, cols=cols, w=W[row, list(cols)].copy(), X=X,
                   scale=scales[row].copy(), zero=zeros[row].copy(), bits=bits)


def quadratic_check(t: Triplet, n_random: int = 1000, seed: int = 0) -> dict:
    """The second-order expansion is exact: L(delta) measured on the activations vs 1/2 delta^T H delta, at
    random delta of the size of a quantization step; plus the gradient at delta = 0 (it is exactly 0)."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_random, 3)) * t.scale
    measured = t.loss(t.w + D)
    quadratic = 0.5 * np.einsum("mi,ij,mj->m", D, t.H, D)
    # numerical gradient of the measured loss at delta = 0 (central differences), relative to the curvature
    h = 1e-3 * t.scale
    e = np.eye(3)
    grad = np.array([(t.loss(t.w + h[i] * e[i])[0] - t.loss(t.w - h[i] * e[i])[0]) / (2 * h[i])
                     for i in range(3)])
    return {"max_rel_diff": float(np.max(np.abs(measured - quadratic) / quadratic)),
            "max_abs_gradient": float(np.max(np.abs(grad))),
            "gradient_scale": float(np.max(np.diag(t.H) * t.scale))}


@dataclass
class OBSSolution:
    w_new: np.ndarray  # (3,) weights after fixing weight q to the target and correcting the others
    loss: float


def obs_closed_form(w: np.ndarray, H: np.ndarray, q: int, target: float) -> OBSSolution:
    """Fix weight q at `target`, move the others to minimize 1/2 d^T H d (paper, Eq. 2-3):
        delta = (target - w_q) / [H^-1]_qq * H^-1[:, q],     loss = (w_q - target)^2 / (2 [H^-1]_qq)."""
    Hinv = np.linalg.inv(H)
    c = target - w[q]
    delta = c / Hinv[q, q] * Hinv[:, q]
    return OBSSolution(w + delta, float(c * c / (2 * Hinv[q, q])))


def obs_lstsq(t: Triplet, q: int, target: float) -> OBSSolution:
    """The same problem solved by least squares on the activations: min over the other two weights of
    mean_t (x_tq c + x_t,rest . delta_rest)^2. No H, no inverse: a check of the closed form."""
    rest = [i for i in range(3) if i != q]
    c = target - t.w[q]
    sol, *_ = np.linalg.lstsq(t.X[:, rest], -c * t.X[:, q], rcond=None)
    w_new = t.w.copy()
    w_new[q] = target
    w_new[rest] += sol
    return OBSSolution(w_new, float(t.loss(w_new)[0]))


@dataclass
class GridSearch:
    w_new: np.ndarray
    loss: float
    cell: np.ndarray  # (2,) final grid spacing of the two free weights
    evaluations: int
    box: np.ndarray  # (2,) half-width of the first, coarse box


def obs_grid_search(t: Triplet, q: int, target: float, points: int = 81, rounds: int = 6,
                    box_factor: float = 50.0) -> GridSearch:
    """Brute force: fix weight q at target, evaluate the measured loss on a points x points grid of the other
    two weights, then zoom in around the best point (the box shrinks to +-2 cells each round).

    The first box is centred on the original weights with half-width box_factor * |c| * sqrt(H_qq / H_jj)
    per free weight j (c = target - w_q): it uses nothing from the closed form."""
    rest = [i for i in range(3) if i != q]
    H = t.H
    c = target - t.w[q]
    half = box_factor * abs(c) * np.sqrt(H[q, q] / np.diag(H)[rest])
    first_box = half.copy()
    center = t.w[rest].copy()
    evals = 0
    for _ in range(rounds):
        a = np.linspace(center[0] - half[0], center[0] + half[0], points)
        b = np.linspace(center[1] - half[1], center[1] + half[1], points)
        A, B = np.meshgrid(a, b, indexing="ij")
        cand = np.empty((A.size, 3))
        cand[:, q] = target
        cand[:, rest[0]] = A.ravel()
        cand[:, rest[1]] = B.ravel()
        losses = t.loss(cand)
        evals += losses.size
        best = int(np.argmin(losses))
        ia, ib = np.unravel_index(best, A.shape)
        if _ == 0 and (ia in (0, points - 1) or ib in (0, points - 1)):
            raise RuntimeError("grid search: the minimum is on the edge of the first box; widen box_factor")
        cell = np.array([a[1] - a[0], b[1] - b[0]])
        center = np.array([a[ia], b[ib]])
        half = 2 * cell
    w_new = cand[best].copy()
    return GridSearch(w_new, float(losses[best]), cell, evals, first_box)


@dataclass
class Rounding:
    name: str
    w_q: np.ndarray  # (3,) values on the grid
    loss: float


def sequential_obs(t: Triplet, order=(0, 1, 2), H: np.ndarray | None = None) -> Rounding:
    """GPTQ on the three weights: quantize them one by one in `order`; after each, the OBS correction moves
    the ones not yet quantized (inverse Hessian of the remaining weights only)."""
    H = t.H if H is None else H
    w = t.w.copy()
    todo = list(order)
    while todo:
        q = todo.pop(0)
        target = t.quantize(q, w[q])
        if todo:
            sub = [q, *todo]
            sol = obs_closed_form(w[sub], H[np.ix_(sub, sub)], 0, target)
            w[sub] = sol.w_new
        w[q] = target
    return Rounding("GPTQ order " + "".join(str(i + 1) for i in order), w, float(t.loss(w)[0]))


def rtn_triplet(t: Triplet) -> Rounding:
    w = np.array([t.quantize(i, t.w[i]) for i in range(3)])
    return Rounding("round to nearest", w, float(t.loss(w)[0]))


def exhaustive_triplet(t: Triplet) -> tuple[Rounding, np.ndarray]:
    """Brute force over the integer grid: every (2^bits)^3 combination of grid values, loss measured on the
    activations. Returns the best and all losses (sorted)."""
    vals = [t.grid_values(i) for i in range(3)]
    cand = np.array(list(itertools.product(*vals)))
    losses = t.loss(cand)
    best = int(np.argmin(losses))
    return Rounding("best of all grid points", cand[best], float(losses[best])), np.sort(losses)


def obs_rows(t: Triplet, q: int, **solutions) -> list[dict]:
    """Table rows: the three weights and the measured loss for each named solution."""
    rows = [{"solution": "original weights", **{f"w{i + 1}": float(t.w[i]) for i in range(3)}, "loss": 0.0}]
    for name, sol in solutions.items():
        rows.append({"solution": name.replace("_", " "),
                     **{f"w{i + 1}": float(sol.w_new[i]) for i in range(3)}, "loss": float(sol.loss)})
    return rows


def engine_first_step(t: Triplet) -> dict:
    """The engine's first GPTQ step on the three weights (as a 1x3 layer) vs obs_closed_form with the same
    damped H and the same rounded value: the engine's update is the OBS correction."""
    W = t.w[None, :]
    stepper = gptq_steps(W, t.H, QuantConfig(group_size=-1))
    first = next(iter(stepper))
    Hd = stepper.prepared.H  # damped as the engine does (1% of mean diag)
    closed = obs_closed_form(t.w, Hd, 0, float(first.quantized[0]))
    engine = t.w.copy()
    engine[0] = first.quantized[0]
    engine[1:] += first.update[0]
    return {"engine": engine, "closed_form": closed.w_new, "rel_diff": rel_error(engine, closed.w_new)}


# ---- figures for lesson 2


def fig_obs_landscape(t: Triplet, q: int, target: float, closed: OBSSolution, search: GridSearch,
                      n: int = 121):
    """Contour of the measured loss over the two free weights, weight q fixed at target."""
    import plotly.graph_objects as go

    rest = [i for i in range(3) if i != q]
    span = np.abs(closed.w_new[rest] - t.w[rest]) * 1.6 + 1e-12
    lo = np.minimum(t.w[rest], closed.w_new[rest]) - 0.3 * span
    hi = np.maximum(t.w[rest], closed.w_new[rest]) + 0.3 * span
    a, b = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    A, B = np.meshgrid(a, b, indexing="ij")
    cand = np.empty((A.size, 3))
    cand[:, q] = target
    cand[:, rest[0]], cand[:, rest[1]] = A.ravel(), B.ravel()
    L = t.loss(cand).reshape(A.shape)
    names = [f"w{i + 1} (input {c})" for i, c in enumerate(t.cols)]
    fig = go.Figure(go.Contour(x=a, y=b, z=L.T, colorscale="Viridis", ncontours=30,
                               colorbar=dict(title="loss"), hovertemplate="%{x:.5f}, %{y:.5f}: %{z:.3e}"))
    pts = [("original weights (no correction)", t.w[rest], "x", "white"),
           ("closed-form OBS correction", closed.w_new[rest], "star", "red"),
           ("grid-search minimum", search.w_new[rest], "circle-open", "orange")]
    for label, p, sym, color in pts:
        marker = dict(symbol=sym, size=14, color=color, line=dict(width=2, color=color))
        fig.add_trace(go.Scatter(x=[p[0]], y=[p[1]], mode="markers", name=label, marker=marker))
    fig.update_layout(title=f"layer loss with {names[q]} fixed at its grid value", xaxis_title=names[rest[0]],
                      yaxis_title=names[rest[1]], height=480, legend=dict(orientation="h", y=-0.2))
    return fig


def fig_forced_change(t: Triplet, q: int, steps: int = 41):
    """Loss vs the forced change c of weight q: no correction (c^2 H_qq / 2), OBS correction
    (c^2 / (2 [H^-1]_qq)), and least squares on the activations at a few points."""
    import plotly.graph_objects as go

    H = t.H
    Hinv = np.linalg.inv(H)
    c = np.linspace(-1, 1, steps) * t.scale[q]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=c / t.scale[q], y=c * c * H[q, q] / 2, name="no correction: c² H_qq / 2"))
    fig.add_trace(go.Scatter(x=c / t.scale[q], y=c * c / (2 * Hinv[q, q]), name="OBS: c² / (2 [H⁻¹]_qq)"))
    cs = c[:: max(1, steps // 8)]
    ls = [obs_lstsq(t, q, t.w[q] + ci).loss for ci in cs]
    fig.add_trace(go.Scatter(x=cs / t.scale[q], y=ls, mode="markers", name="least squares on activations",
                             marker=dict(size=10, symbol="circle-open")))
    fig.update_layout(title=f"cost of moving w{q + 1} by c, with and without correcting the other two",
                      xaxis_title="c (in grid steps of this weight)", yaxis_title="layer loss", height=420,
                      legend=dict(orientation="h", y=-0.25))
    return fig


def order_table(t: Triplet) -> list[Rounding]:
    """sequential_obs in all six orders of the three weights."""
    return [sequential_obs(t, order) for order in itertools.permutations(range(3))]


# ---------------------------------------------------------------------------------------------------------
# lesson 3: GPTQ step by step


def _blas1():
    from .ui._blas import single_blas_thread

    return single_blas_thread()


@dataclass
class StepperFrames:
    """GPTQ on a crop of a real layer, one state per step (for the animation)."""

    name: str
    rows: np.ndarray  # row indices of the crop in the layer
    cols: np.ndarray  # column indices of the crop
    W0: np.ndarray  # (r, c) the crop's original weights
    states: np.ndarray  # (c + 1, r, c): weights after 0, 1, ..., c steps (state c = the quantized crop)
    losses: np.ndarray  # (c,) OBS loss of each column
    result: object  # the engine's QuantResult for the crop

    @property
    def running_loss(self) -> np.ndarray:
        return np.cumsum(self.losses)


def stepper_frames(data, rows: slice, cols: slice, cfg: QuantConfig | None = None) -> StepperFrames:
    """Run the engine's stepper (gptq_steps) on W[rows, cols] with H[cols, cols] and rebuild the weight matrix
    after every step: column p becomes its quantized value, the columns after it receive the step's update.
    The crop is a GPTQ problem of its own: only its weights move, the rest of the layer stays FP."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(data.W, dtype=np.float64)[rows, cols]
    H = np.asarray(data.H, dtype=np.float64)[cols, cols]
    stepper = gptq_steps(W, H, cfg)
    perm = stepper.prepared.perm
    state = W.copy()
    states = [state.copy()]
    losses = np.zeros(W.shape[1])
    for step in stepper:
        state[:, step.column] = step.quantized
        state[:, perm[step.position + 1 :]] += step.update
        states.append(state.copy())
        losses[step.position] = step.loss
    r0, c0 = np.arange(data.W.shape[0])[rows], np.arange(data.W.shape[1])[cols]
    return StepperFrames(data.name, r0, c0, W, np.array(states), losses, stepper.result)


def fig_stepper(sf: StepperFrames, duration_ms: int = 600, zmax: float = 1.0):
    """A plotly animation (frames + play button + slider) of GPTQ on the crop; it plays without a kernel.

    Left: the change of every weight since the start, in steps of its row's grid: in the columns already
    done, the corrections they received before their turn plus their own rounding; in the columns still to
    do, the corrections so far. Colours saturate at +-zmax steps.
    Right: the running OBS loss."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = sf.W0.shape[1]
    step = np.asarray(sf.result.scales)[:, np.asarray(sf.result.g_idx)]  # (rows, cols) grid step per weight
    deltas = (sf.states - sf.W0[None]) / step[None]
    x = [str(c) for c in sf.cols]
    y = [str(r) for r in sf.rows]
    run = np.concatenate([[0.0], sf.running_loss])
    rows = len(sf.rows)

    def traces(p):
        cur = x[p - 1] if p > 0 else x[0]
        return [
            go.Heatmap(z=deltas[p], x=x, y=y, zmin=-zmax, zmax=zmax, colorscale="RdBu", zmid=0,
                       colorbar=dict(title="change<br>(grid steps)", x=0.55),
                       hovertemplate="row %{y}, input %{x}: %{z:.3f} steps<extra></extra>"),
            go.Scatter(x=[cur, cur], y=[y[0], y[-1]], mode="lines", line=dict(color="black", width=3),
                       showlegend=False, hoverinfo="skip", visible=p > 0),
            go.Scatter(x=list(range(p + 1)), y=run[: p + 1], mode="lines+markers", showlegend=False,
                       hovertemplate="after %{x} columns: %{y:.3e}<extra></extra>"),
        ]

    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.14,
                        subplot_titles=("change of each weight so far (in grid steps)", "running OBS loss"))
    for i, tr in enumerate(traces(0)):
        fig.add_trace(tr, row=1, col=1 if i < 2 else 2)
    frames = [go.Frame(data=traces(p), name=str(p), traces=[0, 1, 2],
                       layout=go.Layout(title_text=_step_title(sf, p))) for p in range(n + 1)]
    fig.frames = frames
    fig.update_xaxes(title_text="input column", type="category", row=1, col=1)
    fig.update_yaxes(title_text="output row", type="category", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="columns quantized", range=[-0.5, n + 0.5], row=1, col=2)
    fig.update_yaxes(range=[0, float(run[-1]) * 1.05], row=1, col=2)
    play = dict(label="▶ play", method="animate",
                args=[None, dict(frame=dict(duration=duration_ms, redraw=True), fromcurrent=True,
                                 transition=dict(duration=0))])
    pause = dict(label="❚❚ pause", method="animate",
                 args=[[None], dict(frame=dict(duration=0, redraw=False), mode="immediate")])
    steps = [dict(method="animate", label=str(p),
                  args=[[str(p)], dict(mode="immediate", frame=dict(duration=0, redraw=True),
                                       transition=dict(duration=0))]) for p in range(n + 1)]
    fig.update_layout(
        title_text=_step_title(sf, 0), height=360 + 12 * rows,
        updatemenus=[dict(type="buttons", buttons=[play, pause], direction="left", x=0.0, y=-0.18,
                          xanchor="left", yanchor="top")],
        sliders=[dict(steps=steps, active=0, x=0.16, y=-0.12, len=0.84,
                      currentvalue=dict(prefix="columns quantized: "))],
        margin=dict(t=70, b=110),
    )
    return fig


def _step_title(sf: StepperFrames, p: int) -> str:
    if p == 0:
        return f"{sf.name}: rows {sf.rows[0]}-{sf.rows[-1]}, inputs {sf.cols[0]}-{sf.cols[-1]}, before GPTQ"
    return (f"step {p}: input {sf.cols[p - 1]} rounded; the {len(sf.cols) - p} inputs to its right "
            "corrected")


# ---- column order


def gptq_in_order(W, H, order, cfg: QuantConfig) -> np.ndarray:
    """GPTQ with the columns processed in `order` (a permutation); returns Q in the original column order."""
    order = np.asarray(order)
    res = gptq_quantize(np.asarray(W)[:, order], np.asarray(H)[np.ix_(order, order)], cfg)
    Q = np.empty_like(res.weight)
    Q[:, order] = res.weight
    return Q


def order_study(data, n_random: int = 3, seed: int = 0, cfg: QuantConfig | None = None) -> list[dict]:
    """Output error of GPTQ with different column orders (one order shared by all rows, as GPTQ does).

    Default grid: 4-bit symmetric, one grid per row (group_size=-1): the grid then does not depend on the
    order, so only the order changes. Errors are relative output errors from the calibration H and the
    held-out H (lesson 1's measure)."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(data.W, dtype=np.float64)
    H = np.asarray(data.H, dtype=np.float64)
    n = W.shape[1]
    rng = np.random.default_rng(seed)
    orders = [("left to right (GPTQ)", np.arange(n)), ("right to left", np.arange(n)[::-1])]
    orders += [(f"random #{i + 1}", rng.permutation(n)) for i in range(n_random)]
    orders.append(("largest diag(H) first (desc_act)", np.argsort(-np.diag(H), kind="stable")))
    rows = []
    with _blas1():
        rtn = rtn_quantize(W, cfg).weight
        rows.append({"order": "round to nearest (no order)", "calibration error": output_rel_error(W, rtn, H),
                     "held-out error": output_rel_error(W, rtn, data.H_heldout)})
        for name, order in orders:
            Q = gptq_in_order(W, H, order, cfg)
            rows.append({"order": name, "calibration error": output_rel_error(W, Q, H),
                         "held-out error": output_rel_error(W, Q, data.H_heldout)})
    return rows


def obq_greedy(W, H, cfg: QuantConfig | None = None, order=None, outlier_rule: bool = True) -> np.ndarray:
    """Optimal Brain Quantization's greedy order (OBC paper; GPTQ paper, Section 3): each row picks, at every
    step, the weight whose rounding costs least, (w_q - quant(w_q))^2 / [H_F^-1]_qq, and downdates its own
    H^-1. outlier_rule: as in OBQ's code (IST-DASLab/OBC, trueobs.py, TrueOBS.quantize), a row that has a
    weight more than half a grid step from its grid value (pushed past the grid's ends by earlier updates)
    quantizes its worst such weight next instead.
    Per-row grid (group_size=-1) from the original row; H damped like the engine (damp_percent).
    order: a fixed column order for every row instead of the greedy choice (then this is GPTQ, computed
    the slow way: a check of the downdate formula)."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    n = W.shape[1]
    Hd = H + cfg.damp_percent * np.mean(np.diag(H)) * np.eye(n)
    Hinv0 = np.linalg.inv(Hd)
    scale, zero = grid_params(W, cfg.bits, cfg.sym)
    Q = np.empty_like(W)
    with _blas1():
        for r in range(W.shape[0]):
            w = W[r].copy()
            Hinv = Hinv0.copy()
            left = np.ones(n, dtype=bool)
            s, z = scale[r], zero[r]
            for step in range(n):
                qv = dequantize(quantize_codes(w, s, z, cfg.maxq), s, z)
                if order is not None:
                    q = int(order[step])
                else:
                    err2 = np.where(left, (w - qv) ** 2, 0.0)
                    if outlier_rule and np.any(err2 > 0.25 * s * s):
                        q = int(np.argmax(err2))
                    else:
                        cost = np.where(left, err2 / np.where(left, np.diag(Hinv), 1.0), np.inf)
                        q = int(np.argmin(cost))
                err = (w[q] - qv[q]) / Hinv[q, q]
                w -= err * Hinv[:, q]
                w[q] = qv[q]
                Hinv -= np.outer(Hinv[:, q], Hinv[q, :]) / Hinv[q, q]
                left[q] = False
            Q[r] = w
    return Q


def greedy_vs_fixed(data, rows: slice, cols: slice, n_random: int = 3, seed: int = 0,
                    cfg: QuantConfig | None = None) -> list[dict]:
    """On a crop: RTN, GPTQ's one shared order (and random shared orders), and OBQ's per-row greedy order."""
    cfg = cfg or QuantConfig(group_size=-1)
    W = np.asarray(data.W, dtype=np.float64)[rows, cols]
    H = np.asarray(data.H, dtype=np.float64)[cols, cols]
    Hh = np.asarray(data.H_heldout, dtype=np.float64)[cols, cols]
    n = W.shape[1]
    rng = np.random.default_rng(seed)
    out = []

    def add(name, Q, seconds):
        out.append({"method": name, "calibration error": output_rel_error(W, Q, H),
                    "held-out error": output_rel_error(W, Q, Hh), "seconds": seconds})

    with _blas1():
        t = time.perf_counter()
        add("round to nearest", rtn_quantize(W, cfg).weight, time.perf_counter() - t)
        t = time.perf_counter()
        add("GPTQ, left to right", gptq_in_order(W, H, np.arange(n), cfg), time.perf_counter() - t)
        for i in range(n_random):
            order = rng.permutation(n)
            t = time.perf_counter()
            add(f"GPTQ, random order #{i + 1}", gptq_in_order(W, H, order, cfg), time.perf_counter() - t)
        t = time.perf_counter()
        add("OBQ greedy, own order per row", obq_greedy(W, H, cfg), time.perf_counter() - t)
        t = time.perf_counter()
        add("greedy without OBQ's outlier rule", obq_greedy(W, H, cfg, outlier_rule=False),
            time.perf_counter() - t)
    return out


def downdate_counts(d_out: int, d_in: int) -> dict:
    """How many (d_in x d_in) inverse-Hessian downdates each scheme needs for a whole layer."""
    return {"shared order (GPTQ)": d_in, "own order per row (OBQ)": d_out * d_in}


# ---- lazy batch updates


def block_size_study(W, H, sizes=(1, 128), repeats: int = 2, cfg: QuantConfig | None = None) -> dict:
    """Same result for every block size; the time of each (best of `repeats`, one BLAS thread)."""
    cfg = cfg or QuantConfig()
    results, seconds = {}, {}
    with _blas1():
        for b in sizes:
            best = math.inf
            for _ in range(repeats):
                t = time.perf_counter()
                res = gptq_quantize(W, H, cfg.replace(block_size=b))
                best = min(best, time.perf_counter() - t)
            results[b], seconds[b] = res, best
    ref = results[sizes[0]]
    return {
        "seconds": seconds,
        "max_abs_diff": max(float(np.max(np.abs(results[b].weight - ref.weight))) for b in sizes),
        "codes_differ": max(int(np.sum(results[b].codes != ref.codes)) for b in sizes),
        "speedup": seconds[sizes[0]] / seconds[sizes[-1]],
    }


# ---- the Cholesky trick


def cholesky_rows_check(H, damp_percent: float = 0.01, every: int = 8) -> dict:
    """Row q of U (H^-1 = U^T U, U upper) vs the first row of (H[q:, q:])^-1 divided by the square root of
    its first entry: (a) by inverting H[q:, q:] directly at every `every`-th q; (b) at every q, by
    downdating H^-1 one column at a time (H_F^-1 <- H_F^-1 - H_F^-1[:, 0] H_F^-1[0, :] / H_F^-1[0, 0])."""
    H = np.asarray(H, dtype=np.float64)
    n = H.shape[0]
    Hd = H + damp_percent * np.mean(np.diag(H)) * np.eye(n)
    with _blas1():
        U = hinv_cholesky_upper(Hd)
        direct = []
        for q in range(0, n, every):
            inv = np.linalg.inv(Hd[q:, q:])
            direct.append(rel_error(U[q, q:], inv[0] / np.sqrt(inv[0, 0])))
        down = []
        Finv = np.linalg.inv(Hd)
        for q in range(n):
            down.append(rel_error(U[q, q:], Finv[0] / np.sqrt(Finv[0, 0])))
            Finv = Finv[1:, 1:] - np.outer(Finv[1:, 0], Finv[0, 1:]) / Finv[0, 0]
    return {"n": n, "checked_direct": len(direct), "max_rel_direct": float(max(direct)),
            "max_rel_downdate": float(max(down)), "condition": float(np.linalg.cond(Hd))}


# ---- what if H^-1 is not downdated


def column_loop(W, H, grid: str = "row-group", downdate: bool = True, bits: int = 4, group_size: int = 128,
                damp_percent: float = 0.01) -> np.ndarray:
    """The GPTQ column loop, one column at a time, with two switches.

    grid="row-group": the engine's grid (symmetric, one scale per row and group of `group_size` columns,
                      taken from the updated weights when the group starts);
    grid="seed-column": the seed lesson's grid (one scale per column shared by all rows, max|column| / 7,
                      from the column's current values, np.round).
    downdate=True:  update with row q of U, i.e. the inverse Hessian of the columns not yet quantized (OBS);
    downdate=False: update with row q of the full H^-1, computed once (the seed lesson's loop).
    With ("row-group", True) this is the engine's gptq_quantize (QuantConfig(bits, group_size)); with
    ("seed-column", False) it is experiments.lesson_simplified_gptq."""
    W = np.array(W, dtype=np.float64, copy=True)
    H = np.asarray(H, dtype=np.float64)
    rows, n = W.shape
    Hd = H + damp_percent * np.mean(np.diag(H)) * np.eye(n)
    maxq = 2**bits - 1
    max_int = 2 ** (bits - 1) - 1
    if downdate:
        M = hinv_cholesky_upper(Hd)  # row q: (H_F^-1)_{q,:} / sqrt([H_F^-1]_qq)
    else:
        M = np.linalg.inv(Hd)
    Q = np.empty_like(W)
    scale = zero = None
    with _blas1():
        for q in range(n):
            w = W[:, q]
            if grid == "row-group":
                if q % group_size == 0:
                    scale, zero = grid_params(W[:, q : q + group_size], bits, True)
                qv = dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)
            elif grid == "seed-column":
                peak = np.max(np.abs(w))
                s = peak / max_int if peak > 0 else 1.0
                qv = np.clip(np.round(w / s), -max_int, max_int) * s
            else:
                raise ValueError(f"grid must be 'row-group' or 'seed-column', got {grid!r}")
            err = (w - qv) / M[q, q]
            Q[:, q] = qv
            W[:, q + 1 :] -= np.outer(err, M[q, q + 1 :])
    return Q


def column_rtn(W, grid: str = "row-group", bits: int = 4, group_size: int = 128) -> np.ndarray:
    """Round to nearest on column_loop's grids (no updates)."""
    W = np.asarray(W, dtype=np.float64)
    if grid == "row-group":
        return rtn_quantize(W, QuantConfig(bits=bits, group_size=group_size, sym=True)).weight
    max_int = 2 ** (bits - 1) - 1
    peak = np.max(np.abs(W), axis=0)
    s = np.where(peak > 0, peak / max_int, 1.0)
    return np.clip(np.round(W / s), -max_int, max_int) * s


def downdate_study(data, bits: int = 4, group_size: int = 128) -> list[dict]:
    """Held-out and calibration output errors of RTN, the loop without downdate and with it, on both grids."""
    W = np.asarray(data.W, dtype=np.float64)
    H = np.asarray(data.H, dtype=np.float64)
    rows = []
    for grid, label in (("row-group", f"GPTQ's grid (per row, groups of {group_size})"),
                        ("seed-column", "seed lesson's grid (one scale per column)")):
        for method, Q in (("round to nearest", column_rtn(W, grid, bits, group_size)),
                          ("H^-1 not downdated", column_loop(W, H, grid, False, bits, group_size)),
                          ("H^-1 downdated (GPTQ)", column_loop(W, H, grid, True, bits, group_size))):
            rows.append({"grid": label, "method": method, "calibration error": output_rel_error(W, Q, H),
                         "held-out error": output_rel_error(W, Q, data.H_heldout)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# the numbers lessons 2 and 3 compare with their larger setting (FULL_SETTING_RESULTS)


def lesson2_summary(data, cols=(247, 260, 100), row: int = 437) -> dict:
    """Lesson 2's headline numbers for a layer's data, on fixed weights (the notebook's three by default)."""
    t = pick_triplet(data, cols=cols, row=row)
    H = t.H
    rtn, orders = rtn_triplet(t), order_table(t)
    best, _ = exhaustive_triplet(t)
    return {"tokens": t.n_tokens, "correction_ratio": float(H[0, 0] * np.linalg.inv(H)[0, 0]),
            "rtn_over_gptq123": rtn.loss / orders[0].loss, "gptq123_over_best": orders[0].loss / best.loss,
            "some_order_finds_best": any(np.allclose(o.w_q, best.w_q) for o in orders)}


def lesson3_summary(data=None, *, orders=None, greedy=None, downdate=None) -> dict:
    """Lesson 3's held-out errors: column orders, greedy vs shared order on the crop, the downdate table.
    Pass the layer data to compute them, or the rows the notebook already has (orders=order_study(...),
    greedy=greedy_vs_fixed(...), downdate=downdate_study(...))."""
    if orders is None:
        orders = order_study(data)
    if greedy is None:
        greedy = greedy_vs_fixed(data, slice(0, 64), slice(0, 128))
    if downdate is None:
        downdate = downdate_study(data)
    return {
        "order_heldout": {r["order"]: r["held-out error"] for r in orders},
        "downdate_heldout": {f"{r['grid'].split()[0]} / {r['method']}": r["held-out error"]
                             for r in downdate},
        "greedy_heldout": {r["method"]: r["held-out error"] for r in greedy},
    }


def lesson3_claims(summary: dict) -> dict:
    """The relations lesson 3 states, evaluated on a lesson3_summary (this run's or the larger one)."""
    o = summary["order_heldout"]
    rtn, orders = o["round to nearest (no order)"], [v for k, v in o.items() if not k.startswith("round")]
    g = summary["greedy_heldout"]
    shared = [v for k, v in g.items() if k.startswith("GPTQ")]
    d = summary["downdate_heldout"]

    def kept(grid):
        methods = ("round to nearest", "H^-1 not downdated", "H^-1 downdated (GPTQ)")
        r, f, q = (d[f"{grid} / {m}"] for m in methods)
        return (r - f) / (r - q)

    return {
        "orders_vs_rtn": max(orders) / rtn,
        "order_spread_vs_gap": (max(orders) - min(orders)) / (rtn - max(orders)),
        "left_to_right_worst": o["left to right (GPTQ)"] == max(orders),
        "desc_act_best": o["largest diag(H) first (desc_act)"] == min(orders),
        "greedy_not_better_than_best_shared": g["OBQ greedy, own order per row"] > min(shared),
        "pure_greedy_worse_than_all_shared": g["greedy without OBQ's outlier rule"] > max(shared),
        "kept_without_downdate_gptq_grid": kept("GPTQ's"),
        "kept_without_downdate_seed_grid": kept("seed"),
    }
