"""Lesson 1 (notebooks/01_why_rtn_fails.ipynb): why round-to-nearest fails.

rtn_error_study measures RTN on every linear of a loaded model: each layer's own output error, and how the
errors compound through the blocks (blocks 0..k quantized vs only block k); study_summary gives the numbers
the lesson quotes, also for the larger run stored in data/results/lessons/full_setting.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine import QuantConfig, rtn_quantize
from .measures import rel_error


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
    from ..models import get_weight, set_weight

    lin = adapter.linears(block)
    old = {n: get_weight(m).detach().clone() for n, m in lin.items()}
    for n, m in lin.items():
        set_weight(m, new[n])
    return old


def _restore(block, adapter, old: dict) -> None:
    from ..models import set_weight

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

    from ..models import head_logits

    losses = []
    with torch.no_grad():
        for i in range(hidden.shape[0]):
            logits = head_logits(model, hidden[i : i + 1], adapter)[0, :-1].float()
            losses.append(float(F.cross_entropy(logits, ids[i, 1:])))
    return math.exp(sum(losses) / len(losses))


def _rtn_weights(blocks, adapter, cfg: QuantConfig) -> list[dict]:
    """RTN's (out, in) weights of every linear, one dict per block keyed like adapter.linears(block)."""
    from ..models import get_weight

    qweights = []
    for block in blocks:
        lin = adapter.linears(block)
        qweights.append({n: rtn_quantize(get_weight(m).detach().float().clone(), cfg).weight
                         for n, m in lin.items()})
    return qweights


def _fp_pass(blocks, adapter, inputs, qweights: list[dict], layer_token_stride: int):
    """The FP pass: every block's output hidden state, and each linear's LayerError, its output error
    measured by a hook on its FP input X as the pass goes by."""
    from ..models import get_weight, run_block
    from ..models.capture import hooks

    diffs, linears = {}, {}
    shapes, wrel = {}, {}
    for k, block in enumerate(blocks):
        for n, m in adapter.linears(block).items():
            full = f"{adapter.block_prefix(k)}.{n}"
            W = get_weight(m).detach().float()
            Q = qweights[k][n]
            shapes[full] = tuple(W.shape)
            wrel[full] = rel_error(Q, W)
            diffs[full], linears[full] = W - Q, m

    acc: dict[str, list] = {}  # name -> [sum of squared output errors, sum of squared outputs]

    def measure(call):  # each linear's own output error on its FP input, every layer_token_stride-th token
        x = call.input.reshape(-1, call.input.shape[-1])[::layer_token_stride].float()
        e = x @ diffs[call.name].T
        y = call.output.reshape(-1, call.output.shape[-1])[::layer_token_stride].float()
        a = acc.setdefault(call.name, [0.0, 0.0])
        a[0] += float((e * e).sum())
        a[1] += float((y * y).sum())

    fp = []
    with hooks(linears, measure), torch.no_grad():
        x = inputs.hidden
        for block in blocks:
            x = run_block(block, x, inputs)
            fp.append(x)

    layers = []
    for full, (sse, ssy) in acc.items():
        k = int(full[len(adapter.blocks) + 1 :].split(".", 1)[0])
        layers.append(LayerError(full, k, full.split(".", len(adapter.blocks.split(".")) + 1)[-1],
                                 shapes[full], wrel[full], math.sqrt(sse / ssy)))
    return fp, layers


def _quantized_passes(blocks, adapter, inputs, qweights: list[dict], fp: list, top_channels: int):
    """Block by block, RTN weights swapped in and restored: the cumulative run (blocks 0..k quantized) and
    the isolated one (only block k, fed the FP hidden state), each compared with the FP pass. Returns the
    cumulative run's last hidden state and RTNStudy's fields for the comparisons."""
    from ..models import run_block

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
    return x, {"cumulative": cumulative, "isolated": isolated, "error_rms": error_rms,
               "cumulative_rest": cum_rest, "isolated_rest": iso_rest}


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
    from ..data import evaluation_ids
    from ..models import catch_block_inputs, get_adapter

    cfg = cfg or QuantConfig()
    model = lm.model
    adapter = lm.adapter or get_adapter(model)
    blocks = adapter.get_blocks(model)
    ids = evaluation_ids(lm.tokenizer, corpus, n_tokens=n_windows * seqlen).reshape(n_windows, seqlen)
    seconds = {}

    t = time.perf_counter()
    qweights = _rtn_weights(blocks, adapter, cfg)
    seconds["rtn"] = time.perf_counter() - t

    t = time.perf_counter()
    inputs = catch_block_inputs(model, ids, adapter)
    fp, layers = _fp_pass(blocks, adapter, inputs, qweights, layer_token_stride)
    seconds["fp_pass"] = time.perf_counter() - t

    t = time.perf_counter()
    x, passes = _quantized_passes(blocks, adapter, inputs, qweights, fp, top_channels)
    seconds["quantized_passes"] = time.perf_counter() - t

    return RTNStudy(
        config=cfg, corpus=corpus, n_windows=n_windows, seqlen=seqlen, layers=layers, **passes,
        hidden_rms=[float(h.double().pow(2).mean().sqrt()) for h in fp],
        top_share=[_top_share(h, top_channels) for h in fp], top_channels=top_channels,
        ppl_fp=_window_ppl(model, fp[-1], ids, adapter), ppl_rtn=_window_ppl(model, x, ids, adapter),
        seconds=seconds,
    )


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


# ---- figures


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
