"""Lesson 4 (notebooks/04_bits_and_group_size.ipynb): bits and group size.

The exact storage of a GPTQ checkpoint (checkpoint.storage: bits per weight with scales, zeros and g_idx)
for the real model's shapes, against the usual rule of thumb; and the accuracy each (bits, group size)
buys on real layers (real_layers.load_real_layers), RTN and GPTQ.
"""

from __future__ import annotations

import time

from ..checkpoint.storage import Storage, linear_storage
from ..engine import QuantConfig, gptq_quantize, rtn_quantize
from ..services.threads import single_blas_thread
from .measures import errors, mean_error
from .real_layers import RealLayers

# ---- storage


def rule_of_thumb_bits(bits: int, group_size: int) -> float:
    """The usual estimate: bits + (16-bit scale + bits-wide zero) / group_size (no g_idx, no short groups)."""
    return float(bits) if group_size == -1 else bits + (16 + bits) / group_size


def model_linear_shapes(lm) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of every linear GPTQ quantizes in a loaded model."""
    from ..models import get_weight, quantizable_modules

    return [(n, *get_weight(m).shape) for n, m in quantizable_modules(lm.model, lm.adapter).items()]


def model_storage(lm, bits: int, group_size: int) -> dict:
    """Storage of the whole model quantized at (bits, group_size): the 210 linears exactly,
    everything else (embedding, norms) as a checkpoint keeps it, counted once when tied. Unquantized tensors
    are counted at 16 bits (the usual fp16 checkpoint) and at their dtype in this model (our export keeps
    them as they are: float32 for the offline SmolLM2)."""
    from ..models import quantizable_modules

    linears = Storage()
    for _, o, i in model_linear_shapes(lm):
        linears.add(o, i, bits, group_size)
    q_weights, q_bits = linears.weights, linears.total_bits
    quantized = {f"{n}.weight" for n in quantizable_modules(lm.model, lm.adapter)}
    seen, other_params, other_bits_native = set(), 0, 0
    for k, t in lm.model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if k in quantized or ptr in seen:
            continue
        seen.add(ptr)
        other_params += t.numel()
        other_bits_native += t.numel() * t.element_size() * 8
    return {
        "bits": bits, "group_size": group_size, "linears": linears.layers, "quantized weights": q_weights,
        "other params": other_params, "linear bits per weight": q_bits / q_weights,
        "parts": linears.per_weight(),
        "model bits per param (others fp16)": (q_bits + 16 * other_params) / (q_weights + other_params),
        "MB (others fp16)": (q_bits + 16 * other_params) / 8e6,
        "MB (others as stored)": (q_bits + other_bits_native) / 8e6,
    }


def storage_table(lm, configs=((2, 32), (2, 64), (2, 128), (3, 32), (3, 64), (3, 128), (3, -1), (4, 32),
                               (4, 64), (4, 128), (4, -1), (8, 128), (8, -1))) -> list[dict]:
    """One row per (bits, group size): the rule of thumb, the exact bits per weight of a 576-wide layer and
    of all the model's linears, what each part costs, and the whole model's size."""
    rows = []
    for bits, g in configs:
        m = model_storage(lm, bits, g)
        s576 = linear_storage(576, 576, bits, g)
        rows.append({
            "bits": bits, "group": "per row" if g == -1 else g,
            "rule of thumb": rule_of_thumb_bits(bits, g),
            "576x576 layer": s576.bits_per_weight,
            "all linears": m["linear bits per weight"],
            "of which scales": m["parts"]["scales"], "zeros": m["parts"]["qzeros"],
            "g_idx": m["parts"]["g_idx"],
            "model MB (rest fp16)": m["MB (others fp16)"],
        })
    return rows


def fp16_model_mb(lm) -> float:
    """The model with every parameter in fp16 (tied tensors once), in MB."""
    seen, n = set(), 0
    for t in lm.model.state_dict().values():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr not in seen:
            seen.add(ptr)
            n += t.numel()
    return 16 * n / 8e6


def packed_bits(codes, scales, zeros, g_idx, bits: int) -> int:
    """Bits of the tensors the real packer writes for one layer (a check of linear_storage)."""
    from ..checkpoint.format import pack_linear

    t = pack_linear(codes, scales, zeros, g_idx, bits)
    return sum(v.nbytes * 8 for v in t.values())


# ---- accuracy


def tradeoff_study(layers: RealLayers, bits=(2, 3, 4), groups=(32, 64, 128, -1), corpus: str | None = None,
                   sym: bool = True) -> list[dict]:
    """RTN and GPTQ on each real layer for every (bits, group size): held-out and calibration errors, and the
    exact bits per weight of that layer."""
    rows = []
    with single_blas_thread():
        for name in layers.names:
            W, H, Hh = layers.W[name], layers.H(name, corpus), layers.H_heldout(name, corpus)
            for b in bits:
                for g in groups:
                    cfg = QuantConfig(bits=b, group_size=g, sym=sym)
                    bpw = linear_storage(*W.shape, b, g).bits_per_weight
                    for method in ("RTN", "GPTQ"):
                        t = time.perf_counter()
                        Q = (rtn_quantize(W, cfg) if method == "RTN" else gptq_quantize(W, H, cfg)).weight
                        rows.append({"layer": layers.short(name), "bits": b, "group": g, "method": method,
                                     "bits per weight": bpw, **errors(W, Q, H, Hh),
                                     "seconds": time.perf_counter() - t})
    return rows


def pareto(rows: list[dict], key: str = "held-out error") -> list[dict]:
    """Rows no other row beats on both bits per weight and `key` (per layer and method)."""
    out = []
    for r in rows:
        same = [s for s in rows if s["layer"] == r["layer"] and s["method"] == r["method"]]
        if not any(s["bits per weight"] <= r["bits per weight"] and s[key] < r[key] and s is not r
                   for s in same):
            out.append(r)
    return out


def tradeoff_summary(rows: list[dict]) -> list[dict]:
    """Per (bits, group, method): bits per weight of a 576-wide layer and the geometric mean error over
    the layers, sorted by bits per weight."""
    keys = sorted({(r["bits"], r["group"], r["method"]) for r in rows})
    out = []
    for b, g, m in keys:
        out.append({"bits": b, "group": "per row" if g == -1 else g, "method": m,
                    "bits per weight (576 wide)": linear_storage(576, 576, b, g).bits_per_weight,
                    "held-out error": mean_error(rows, bits=b, group=g, method=m),
                    "calibration error": mean_error(rows, "calibration error", bits=b, group=g, method=m)})
    return sorted(out, key=lambda r: (r["method"], r["bits per weight (576 wide)"]))


def fig_tradeoff(summary: list[dict]):
    """Error vs bits per weight: one marker per (bits, group), RTN and GPTQ."""
    import plotly.graph_objects as go

    fig = go.Figure()
    colors = {"RTN": "#d62728", "GPTQ": "#1f77b4"}
    for m in ("RTN", "GPTQ"):
        pts = [r for r in summary if r["method"] == m]
        labels = [f"{r['bits']}b {'g' + str(r['group']) if r['group'] != 'per row' else 'row'}" for r in pts]
        fig.add_trace(go.Scatter(
            x=[r["bits per weight (576 wide)"] for r in pts], y=[r["held-out error"] for r in pts],
            mode="markers+text", text=labels, textposition="top center", name=m,
            marker=dict(size=9, color=colors[m]),
            hovertemplate="%{text}: %{x:.3f} bits/weight, error %{y:.4f}<extra>" + m + "</extra>"))
    fig.update_yaxes(type="log", title_text="held-out ||X(W-Q)^T|| / ||XW^T|| (geometric mean)")
    fig.update_xaxes(title_text="bits per weight of a 576-wide layer (scales, zeros, g_idx included)")
    fig.update_layout(height=460, legend=dict(orientation="h", y=-0.2), margin=dict(t=40, b=40),
                      title="accuracy vs storage on three real layers")
    return fig
