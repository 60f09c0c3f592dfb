"""The logic behind lessons 4-6 (notebooks/04-06): the design choices of a GPTQ run.

  lesson 4    bits and group size: the exact storage of a GPTQ checkpoint (bits per weight with scales,
              zeros and g_idx, for the real model's shapes) and the accuracy each setting buys
  lesson 5    desc_act and static groups: accuracy, the g_idx layout they produce, and what reordering
              costs a dequantize-and-multiply at inference (measured in torch)
  lesson 6    damping and calibration data: damping sweeps, dead and near-singular inputs, and
              calibration on one domain evaluated on another

Every number a lesson states is computed here; the notebooks show the tables and figures and assert the
claims; tests/test_lessons_design.py checks the functions. Figures, tables and `setup` come from
gptq_explorer.lessons (lessons 1-3), so all lessons look and behave the same.

Errors are relative output errors ||X (W - Q)^T|| / ||X W^T|| (lessons.output_rel_error) from the inputs'
Hessian: "held-out" uses text that calibration never saw (the evaluation part of a corpus).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .engine import QuantConfig, gptq_quantize, rtn_quantize
from .engine.hessian import Hessian
from .lessons import _blas1, output_rel_error

# ---------------------------------------------------------------------------------------------------------
# common: the inputs of several real layers, captured in one pass per token set


class _Stop(Exception):
    """Raised by a capture hook once every wanted layer has seen its input (the rest is skipped)."""


def capture_inputs(lm, names: list[str], ids: torch.Tensor, batch_size: int = 8) -> dict[str, np.ndarray]:
    """What each named linear (full module path) receives when the model runs on `ids` (windows, seqlen):
    {name: (tokens, d_in) float32}. One forward pass per batch, stopped as soon as all of them fired."""
    from .models import quantizable_modules

    mods = quantizable_modules(lm.model, lm.adapter)
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; names look like 'model.layers.5.self_attn.q_proj'")
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    fired: set[str] = set()

    def hook(name):
        def f(module, args, output):
            x = args[0].detach()
            out[name].append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32).numpy())
            fired.add(name)
            if len(fired) == len(names):
                raise _Stop

        return f

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch_size):
                fired.clear()
                try:
                    lm.model(input_ids=ids[s : s + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) for n, v in out.items()}


def weight_of(lm, name: str) -> np.ndarray:
    """A linear's weight (out, in) as float64 NumPy."""
    from .models import get_weight, quantizable_modules

    return get_weight(quantizable_modules(lm.model, lm.adapter)[name]).detach().double().numpy().copy()


@dataclass
class RealLayers:
    """Weights of a few real linears and their inputs on calibration and held-out text of one or more
    corpora. H[(name, corpus)] = 2/n X^T X on calibration text; H_heldout[(name, corpus)] likewise on the
    evaluation part (text calibration never sees)."""

    names: list[str]
    W: dict[str, np.ndarray]
    X_calib: dict[tuple[str, str], np.ndarray]
    X_heldout: dict[tuple[str, str], np.ndarray]
    corpora: tuple[str, ...]
    nsamples: int
    seqlen: int
    heldout_tokens: int
    seconds: float = 0.0
    _H: dict = field(default_factory=dict, repr=False)

    def H(self, name: str, corpus: str | None = None) -> np.ndarray:
        return self._hessian("calib", name, corpus or self.corpora[0], self.X_calib)

    def H_heldout(self, name: str, corpus: str | None = None) -> np.ndarray:
        return self._hessian("heldout", name, corpus or self.corpora[0], self.X_heldout)

    def _hessian(self, kind, name, corpus, xs) -> np.ndarray:
        key = (kind, name, corpus)
        if key not in self._H:
            X = xs[(name, corpus)]
            self._H[key] = Hessian(X.shape[1]).add_batch(X).H
        return self._H[key]

    def short(self, name: str) -> str:
        """'model.layers.5.self_attn.q_proj' -> 'block 5 q_proj'."""
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.isdigit())
        return f"block {parts[i]} {parts[-1]}"

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self.W[name].shape)


def load_real_layers(lm, layers: list[tuple[int, str]], corpora=("prose",), nsamples: int = 16,
                     seqlen: int = 256, heldout_tokens: int = 1024, seed: int = 0) -> RealLayers:
    """Capture the inputs of `layers` ([(block, sublayer)], e.g. (5, "self_attn.q_proj")) on `nsamples`
    calibration windows of `seqlen` tokens and on the first `heldout_tokens` of the evaluation part, for
    each corpus. The forward passes stop at the deepest wanted layer, so early blocks are cheap."""
    from .data import calibration_windows, evaluation_ids

    t = time.perf_counter()
    names = [f"{lm.adapter.block_prefix(b)}.{s}" for b, s in layers]
    X_calib, X_held = {}, {}
    n_eval = max(heldout_tokens // seqlen, 1) * seqlen
    for corpus in corpora:
        cal = calibration_windows(lm.tokenizer, corpus, nsamples, seqlen, seed)
        held = evaluation_ids(lm.tokenizer, corpus, n_tokens=n_eval).reshape(-1, seqlen)
        for ids, dest in ((cal, X_calib), (held, X_held)):
            for n, X in capture_inputs(lm, names, ids).items():
                dest[(n, corpus)] = X
    W = {n: weight_of(lm, n) for n in names}
    return RealLayers(names, W, X_calib, X_held, tuple(corpora), nsamples, seqlen, n_eval,
                      seconds=time.perf_counter() - t)


def errors(W, Q, H_calib, H_heldout) -> dict:
    return {"calibration error": output_rel_error(W, Q, H_calib),
            "held-out error": output_rel_error(W, Q, H_heldout)}


# ---------------------------------------------------------------------------------------------------------
# lesson 4: bits and group size


@dataclass
class LinearStorage:
    """Bits a GPTQ checkpoint stores for one linear (gptq-anchors.md §3.1): qweight and qzeros are int32
    words of packed codes, scales fp16 (one per output row and group), g_idx int32 (one per input)."""

    d_out: int
    d_in: int
    bits: int
    group_size: int
    n_groups: int
    qweight_bits: int
    qzeros_bits: int
    scales_bits: int
    g_idx_bits: int

    @property
    def total_bits(self) -> int:
        return self.qweight_bits + self.qzeros_bits + self.scales_bits + self.g_idx_bits

    @property
    def weights(self) -> int:
        return self.d_out * self.d_in

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights

    def parts_per_weight(self) -> dict:
        parts = ("qweight", "qzeros", "scales", "g_idx")
        return {k: getattr(self, f"{k}_bits") / self.weights for k in parts}


def linear_storage(d_out: int, d_in: int, bits: int, group_size: int) -> LinearStorage:
    """Exact storage of one (d_out x d_in) linear in the GPTQ format, counted from the tensor shapes the
    packer writes (checkpoint.format.pack_linear); groups are ceil(d_in / group_size), so a short last
    group (576 = 4 x 128 + 64) costs a full set of scales and zeros."""
    from .checkpoint.format import n_groups
    from .checkpoint.packing import packed_length

    G = n_groups(d_in, group_size)
    return LinearStorage(
        d_out, d_in, bits, group_size, G,
        qweight_bits=32 * packed_length(d_in, bits) * d_out,
        qzeros_bits=32 * G * packed_length(d_out, bits),
        scales_bits=16 * G * d_out,
        g_idx_bits=32 * d_in,
    )


def rule_of_thumb_bits(bits: int, group_size: int) -> float:
    """The usual estimate: bits + (16-bit scale + bits-wide zero) / group_size (no g_idx, no short groups)."""
    return float(bits) if group_size == -1 else bits + (16 + bits) / group_size


def model_linear_shapes(lm) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of every linear GPTQ quantizes in a loaded model."""
    from .models import get_weight, quantizable_modules

    return [(n, *get_weight(m).shape) for n, m in quantizable_modules(lm.model, lm.adapter).items()]


def model_storage(lm, bits: int, group_size: int) -> dict:
    """Storage of the whole model quantized at (bits, group_size): the 210 linears exactly (linear_storage),
    everything else (embedding, norms) as a checkpoint keeps it, counted once when tied. Unquantized tensors
    are counted at 16 bits (the usual fp16 checkpoint) and at their dtype in this model (our export keeps
    them as they are: float32 for the offline SmolLM2)."""
    from .models import quantizable_modules

    shapes = model_linear_shapes(lm)
    per = [linear_storage(o, i, bits, group_size) for _, o, i in shapes]
    q_weights = sum(s.weights for s in per)
    q_bits = sum(s.total_bits for s in per)
    quantized = {f"{n}.weight" for n in quantizable_modules(lm.model, lm.adapter)}
    seen, other_params, other_bits_native = set(), 0, 0
    for k, t in lm.model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if k in quantized or ptr in seen:
            continue
        seen.add(ptr)
        other_params += t.numel()
        other_bits_native += t.numel() * t.element_size() * 8
    parts = {k: sum(s.parts_per_weight()[k] * s.weights for s in per) / q_weights
             for k in ("qweight", "qzeros", "scales", "g_idx")}
    return {
        "bits": bits, "group_size": group_size, "linears": len(per), "quantized weights": q_weights,
        "other params": other_params, "linear bits per weight": q_bits / q_weights, "parts": parts,
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
    from .checkpoint.format import pack_linear

    t = pack_linear(codes, scales, zeros, g_idx, bits)
    return sum(v.nbytes * 8 for v in t.values())


def tradeoff_study(layers: RealLayers, bits=(2, 3, 4), groups=(32, 64, 128, -1), corpus: str | None = None,
                   sym: bool = True) -> list[dict]:
    """RTN and GPTQ on each real layer for every (bits, group size): held-out and calibration errors, and the
    exact bits per weight of that layer."""
    rows = []
    with _blas1():
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


def mean_error(rows: list[dict], key: str = "held-out error", **match) -> float:
    """Geometric mean of `key` over the rows (layers) that match, e.g. method="GPTQ", bits=3, group=128."""
    vals = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    if not vals:
        raise KeyError(f"no rows match {match}")
    return float(np.exp(np.mean(np.log(vals))))


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


# ---------------------------------------------------------------------------------------------------------
# lesson 5: desc_act and static groups

ACTORDER_VARIANTS = ("columns in order", "desc_act", "static_groups", "desc_act + static_groups",
                     "act-order inside each group")


def group_local_order(H, width: int) -> np.ndarray:
    """Columns by decreasing diag(H) inside each group of `width`, the groups left in place: every group is
    still processed as one contiguous run, so its columns keep g_idx = j // width (a simplified form of
    GPTQModel's act_group_aware, which also reorders the groups)."""
    d = np.diag(np.asarray(H))
    n = d.size
    return np.concatenate([s + np.argsort(-d[s : s + width], kind="stable") for s in range(0, n, width)])


def actorder_quantize(W, H, cfg: QuantConfig, variant: str):
    """(Q, g_idx) of GPTQ with one of ACTORDER_VARIANTS (the config's desc_act/static_groups are replaced)."""
    base = cfg.replace(desc_act=False, static_groups=False)
    if variant == "act-order inside each group":
        from .lessons import gptq_in_order

        width = base.group_width(W.shape[1])
        Q = gptq_in_order(W, H, group_local_order(H, width), base)
        return Q, (np.arange(W.shape[1]) // width).astype(np.int32)
    flags = {"columns in order": {}, "desc_act": {"desc_act": True}, "static_groups": {"static_groups": True},
             "desc_act + static_groups": {"desc_act": True, "static_groups": True}}
    if variant not in flags:
        raise ValueError(f"variant must be one of {ACTORDER_VARIANTS}, got {variant!r}")
    res = gptq_quantize(W, H, base.replace(**flags[variant]))
    return res.weight, np.asarray(res.g_idx)


def g_idx_layout(g_idx) -> dict:
    """Is g_idx sorted (groups are contiguous runs of inputs)? How many runs of equal group index along the
    inputs (contiguous: one per group)?"""
    g = np.asarray(g_idx)
    runs = 1 + int(np.sum(g[1:] != g[:-1]))
    return {"sorted": bool(np.all(g[1:] >= g[:-1])), "runs": runs, "groups": int(g.max()) + 1}


def actorder_study(layers: RealLayers, configs=None, variants=ACTORDER_VARIANTS) -> list[dict]:
    """Every variant on every layer and config (default: 4 and 3 bits, g128): errors, and the layout of the
    g_idx it produces."""
    configs = configs or (QuantConfig(bits=4), QuantConfig(bits=3))
    rows = []
    with _blas1():
        for name in layers.names:
            W, H, Hh = layers.W[name], layers.H(name), layers.H_heldout(name)
            for cfg in configs:
                rtn = rtn_quantize(W, cfg).weight
                rows.append({"layer": layers.short(name), "config": cfg.label(),
                             "variant": "round to nearest",
                             **errors(W, rtn, H, Hh), "g_idx sorted": True,
                             "g_idx runs": cfg.n_groups(W.shape[1])})
                for v in variants:
                    Q, g = actorder_quantize(W, H, cfg, v)
                    lay = g_idx_layout(g)
                    rows.append({"layer": layers.short(name), "config": cfg.label(), "variant": v,
                                 **errors(W, Q, H, Hh), "g_idx sorted": lay["sorted"],
                                 "g_idx runs": lay["runs"]})
    return rows


def actorder_summary(rows: list[dict], key: str = "held-out error") -> list[dict]:
    """Per config and variant: geometric mean error over the layers, and its ratio to "columns in order"."""
    out = []
    for cfg in dict.fromkeys(r["config"] for r in rows):
        base = mean_error(rows, key, config=cfg, variant="columns in order")
        for v in dict.fromkeys(r["variant"] for r in rows if r["config"] == cfg):
            e = mean_error(rows, key, config=cfg, variant=v)
            wins = sum(r[key] < s[key] for r in rows if r["config"] == cfg and r["variant"] == v
                       for s in rows if s["config"] == cfg and s["variant"] == "columns in order"
                       and s["layer"] == r["layer"])
            n = sum(1 for r in rows if r["config"] == cfg and r["variant"] == v)
            sorted_all = all(r["g_idx sorted"] for r in rows if r["config"] == cfg and r["variant"] == v)
            out.append({"config": cfg, "variant": v, key: e, "vs columns in order": e / base,
                        "layers better than in order": f"{wins}/{n}", "g_idx sorted": sorted_all})
    return out


def fig_g_idx(g_idx_by_variant: dict):
    """g_idx[j] against the input index j, one panel per variant: contiguous groups are a staircase."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(g_idx_by_variant)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for i, n in enumerate(names, 1):
        g = np.asarray(g_idx_by_variant[n])
        fig.add_trace(go.Scatter(x=np.arange(g.size), y=g, mode="markers", marker=dict(size=3),
                                 showlegend=False,
                                 hovertemplate="input %{x}: group %{y}<extra></extra>"), row=1, col=i)
        fig.update_xaxes(title_text="input j", row=1, col=i)
    fig.update_yaxes(title_text="g_idx[j] (group of input j)", row=1, col=1)
    fig.update_layout(height=320, margin=dict(t=50, b=40))
    return fig


@dataclass
class DequantBench:
    """Dequantize-and-multiply y = x W^T with W = s[g] * (codes - z[g]), four ways (see dequant_matmul)."""

    d_out: int
    d_in: int
    group_size: int
    tokens: int
    seconds: dict  # way -> best time of `repeats` calls
    max_rel_diff: float  # largest relative difference of y between the ways
    scale_reads: dict  # way -> scale/zero pairs read to build W

    def rows(self) -> list[dict]:
        base = self.seconds["contiguous groups"]
        return [{"shape (out x in)": f"{self.d_out}x{self.d_in}", "tokens": self.tokens, "way": k,
                 "ms": 1e3 * v, "vs contiguous": v / base, "scale/zero reads": self.scale_reads[k]}
                for k, v in self.seconds.items()]

    @property
    def sorting_removes(self) -> float:
        """Share of the act-order gather's extra time (over contiguous groups) that sorting at load removes:
        1 = as fast as contiguous groups, 0 = no faster than the gather. A ratio of differences, so a machine
        that is uniformly slower (another job running) leaves it unchanged, unlike a bound on one ratio."""
        t = self.seconds
        gather = t["g_idx gather, act-order g_idx"]
        extra = gather - t["contiguous groups"]
        return (gather - t["sorted at load, x permuted"]) / extra if extra > 0 else 0.0


DEQUANT_WAYS = ("contiguous groups", "g_idx gather, sorted g_idx", "g_idx gather, act-order g_idx",
                "sorted at load, x permuted")


def act_order_g_idx(d_in: int, group_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(perm, g_idx) as desc_act produces them: perm = processing order (here a random permutation, as the
    order of diag(H) is), g_idx[j] = position of column j in perm // group_size."""
    perm = np.random.default_rng(seed).permutation(d_in)
    invperm = np.argsort(perm)
    return perm, (invperm // group_size).astype(np.int64)


def dequant_matmul(way: str, x, codes, s, z, g_idx=None, order=None):
    """One way to compute x @ W^T from 4-bit codes (out, in) uint8, scales and zeros (out, G) float32.

    contiguous groups            groups are runs of group_size inputs: reshape and broadcast, no index
    g_idx gather ...             W[:, j] = s[:, g_idx[j]] * (codes[:, j] - z[:, g_idx[j]]): a lookup per input
    sorted at load, x permuted   `codes`, `g_idx` were permuted once (order = argsort(g_idx)) so the groups
                                 are contiguous again; each call permutes x instead: x[:, order]
    """
    out, n = codes.shape
    G = s.shape[1]
    if way == "contiguous groups" or way == "sorted at load, x permuted":
        if way == "sorted at load, x permuted":
            x = x[:, order]
        c = codes.view(out, G, n // G).float()
        W = ((c - z[:, :, None]) * s[:, :, None]).view(out, n)
    elif way.startswith("g_idx gather"):
        W = (codes.float() - z[:, g_idx]) * s[:, g_idx]
    else:
        raise ValueError(f"way must be one of {DEQUANT_WAYS}, got {way!r}")
    return x @ W.T


def dequant_bench(d_out: int = 4096, d_in: int = 4096, group_size: int = 128, tokens: int = 1,
                  repeats: int = 5, seed: int = 0) -> DequantBench:
    """Time dequant_matmul's four ways (CPU time of the calling thread, best of `repeats`; run it with one
    torch thread) and check that they agree. d_in must be a multiple of group_size (the contiguous way
    reshapes)."""
    if d_in % group_size:
        raise ValueError(f"d_in={d_in} must be a multiple of group_size={group_size} for this benchmark")
    gen = torch.Generator().manual_seed(seed)
    G = d_in // group_size
    codes = torch.randint(0, 16, (d_out, d_in), dtype=torch.uint8, generator=gen)
    s = torch.rand(d_out, G, generator=gen) * 0.01 + 0.001
    z = torch.full((d_out, G), 8.0)
    x = torch.randn(tokens, d_in, generator=gen)
    perm, g_act = act_order_g_idx(d_in, group_size, seed)
    g_sorted = torch.arange(d_in) // group_size
    g_act = torch.as_tensor(g_act)
    # the act-order layer: column j of the checkpoint belongs to group g_act[j]. Build its codes so that the
    # same weights, sorted by group, are `codes` (then every way computes the same y).
    order = torch.argsort(g_act, stable=True)  # sorted position p holds checkpoint column order[p]
    codes_act = torch.empty_like(codes)
    codes_act[:, order] = codes
    x_act = torch.empty_like(x)
    x_act[:, order] = x
    inputs = {"x": x, "codes": codes, "x_act": x_act, "codes_act": codes_act}
    calls = {
        "contiguous groups": lambda a: dequant_matmul("contiguous groups", a["x"], a["codes"], s, z),
        "g_idx gather, sorted g_idx": lambda a: dequant_matmul("g_idx gather", a["x"], a["codes"], s, z,
                                                               g_idx=g_sorted),
        "g_idx gather, act-order g_idx": lambda a: dequant_matmul("g_idx gather", a["x_act"], a["codes_act"],
                                                                  s, z, g_idx=g_act),
        "sorted at load, x permuted": lambda a: dequant_matmul("sorted at load, x permuted", a["x_act"],
                                                                a["codes"], s, z, order=order),
    }
    seconds = dict.fromkeys(calls, math.inf)
    with torch.no_grad():
        ys = {k: f(inputs) for k, f in calls.items()}  # also a warm-up
        for _ in range(repeats):  # round robin, so a busy moment of the machine hits every way alike
            # fresh copies each round: where the allocator happened to place a tensor changed one way's time
            # by up to 1.6x for a whole run (measured); the best of `repeats` placements is what we compare
            a = {k: v.clone() for k, v in inputs.items()}
            for k, f in calls.items():
                t = time.thread_time()  # CPU time of this thread: robust to other processes
                f(a)
                seconds[k] = min(seconds[k], time.thread_time() - t)
    ref = ys["contiguous groups"]
    diff = max(float((y - ref).norm() / ref.norm()) for y in ys.values())
    reads = {"contiguous groups": d_out * G, "g_idx gather, sorted g_idx": d_out * d_in,
             "g_idx gather, act-order g_idx": d_out * d_in, "sorted at load, x permuted": d_out * G}
    return DequantBench(d_out, d_in, group_size, tokens, seconds, diff, reads)


# ---------------------------------------------------------------------------------------------------------
# lesson 6: damping and calibration data

DAMPS = (1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.99)  # 0.01 reference/AutoGPTQ, 0.05 GPTQModel, 0.1 optimum


def hessian_from(X) -> np.ndarray:
    X = np.asarray(X)
    return Hessian(X.shape[1]).add_batch(X).H


def damping_sweep(layers: RealLayers, name: str, token_counts=(256, 1024, 4096), damps=DAMPS,
                  cfg: QuantConfig | None = None) -> list[dict]:
    """GPTQ with every damping on the first `n` calibration tokens of one layer, for each n; held-out error on
    the layer's held-out tokens. Also RTN (no H at all) for reference."""
    import warnings

    cfg = cfg or QuantConfig()
    W, Hh = layers.W[name], layers.H_heldout(name)
    X = layers.X_calib[(name, layers.corpora[0])]
    rows = []
    with _blas1():
        rtn = rtn_quantize(W, cfg).weight
        for n in token_counts:
            if n > X.shape[0]:
                raise ValueError(f"only {X.shape[0]} calibration tokens captured, asked for {n}")
            H = hessian_from(X[:n])
            rows.append({"tokens": n, "damp_percent": 0.0, "method": "RTN", **errors(W, rtn, H, Hh),
                         "damp used": None})
            for d in damps:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a raised damping is reported in the row
                    res = gptq_quantize(W, H, cfg.replace(damp_percent=d))
                rows.append({"tokens": n, "damp_percent": d, "method": "GPTQ", **errors(W, res.weight, H, Hh),
                             "damp used": res.damp_percent_used})
    return rows


def best_damp(rows: list[dict], tokens: int, key: str = "held-out error") -> dict:
    gptq = [r for r in rows if r["tokens"] == tokens and r["method"] == "GPTQ"]
    return min(gptq, key=lambda r: r[key])


def row_at(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0]


def fig_damping(rows: list[dict]):
    """Held-out (solid) and calibration (dotted) error vs damp_percent, one colour per calibration size;
    RTN as horizontal lines."""
    import plotly.graph_objects as go

    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for i, n in enumerate(dict.fromkeys(r["tokens"] for r in rows)):
        g = [r for r in rows if r["tokens"] == n and r["method"] == "GPTQ"]
        c = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=[r["damp_percent"] for r in g], y=[r["held-out error"] for r in g],
                                 mode="lines+markers", name=f"{n} tokens: held-out", line=dict(color=c)))
        fig.add_trace(go.Scatter(x=[r["damp_percent"] for r in g], y=[r["calibration error"] for r in g],
                                 mode="lines+markers", name=f"{n} tokens: calibration",
                                 line=dict(color=c, dash="dot")))
    rtn = next(r for r in rows if r["method"] == "RTN")
    fig.add_hline(y=rtn["held-out error"], line_dash="dash", line_color="#d62728",
                  annotation_text="RTN, held-out", annotation_position="top left")
    fig.update_xaxes(type="log", title_text="damp_percent (lambda = damp_percent x mean diag H)")
    fig.update_yaxes(type="log", title_text="||X(W-Q)^T|| / ||XW^T||")
    fig.update_layout(height=460, legend=dict(orientation="h", y=-0.2), margin=dict(t=40, b=40),
                      title="GPTQ vs damping, for three calibration sizes")
    return fig


def spectrum(H, damps=DAMPS) -> dict:
    """Eigenvalues of H (ascending), its rank and condition number, and for each damping the condition
    number of H + lambda I and how many eigenvalues lie below lambda (the directions damping dominates)."""
    H = np.asarray(H, dtype=np.float64)
    ev = np.linalg.eigvalsh(H)
    mean_diag = float(np.mean(np.diag(H)))
    tol = ev[-1] * H.shape[0] * np.finfo(np.float64).eps
    out = {"n": H.shape[0], "eigenvalues": ev, "rank": int(np.sum(ev > tol)), "mean_diag": mean_diag,
           "condition": float(ev[-1] / ev[0]) if ev[0] > tol else math.inf, "damped": []}
    for d in damps:
        lam = d * mean_diag
        out["damped"].append({"damp_percent": d, "lambda": lam,
                              "condition": float((ev[-1] + lam) / (ev[0] + lam)),
                              "eigenvalues below lambda": int(np.sum(ev < lam))})
    return out


def diag_profile(H) -> dict:
    """How unequal the inputs are: diag(H) relative to its mean (what damping is measured against)."""
    d = np.diag(np.asarray(H, dtype=np.float64))
    m = d.mean()
    top = np.sort(d)[::-1]
    return {"mean": float(m), "median/mean": float(np.median(d) / m), "max/mean": float(d.max() / m),
            "min/mean": float(d.min() / m), "share of top 4": float(top[:4].sum() / d.sum()),
            "dead": int(np.sum(d == 0)), "below 1% of mean": int(np.sum(d < 0.01 * m))}


def dead_input_demo(W, X_calib, X_heldout, channel: int, cfg: QuantConfig | None = None,
                    factors=(1.0, 1e-2, 1e-4, 0.0)) -> list[dict]:
    """One input channel made quiet in the calibration data only (its activations multiplied by `factor`;
    0 = dead), while held-out text uses it normally. GPTQ's held-out error and what became of that channel's
    weights: the reference (and this engine) set a dead input's weights to exactly 0."""
    cfg = cfg or QuantConfig()
    W = np.asarray(W, dtype=np.float64)
    Hh = hessian_from(X_heldout)
    rows = []
    with _blas1():
        rtn = rtn_quantize(W, cfg).weight
        for f in factors:
            X = np.array(X_calib, dtype=np.float64, copy=True)
            X[:, channel] *= f
            H = hessian_from(X)
            res = gptq_quantize(W, H, cfg)
            col = res.weight[:, channel]
            rows.append({"calibration activations of the channel": "dead (x0)" if f == 0 else f"x{f:g}",
                         "dead inputs found": int(np.sum(res.dead_columns)),
                         "channel weights: rel. change": float(np.linalg.norm(col - W[:, channel])
                                                                / np.linalg.norm(W[:, channel])),
                         "held-out error": output_rel_error(W, res.weight, Hh),
                         "held-out error, RTN": output_rel_error(W, rtn, Hh)})
    return rows


def domain_study(layers: RealLayers, cfg: QuantConfig | None = None, corpora=("prose", "code")) -> list[dict]:
    """GPTQ calibrated on each corpus, and on a mix of both (the same number of tokens: the first half of
    each), evaluated on held-out tokens of every corpus. RTN needs no calibration: one row."""
    cfg = cfg or QuantConfig()
    rows = []
    with _blas1():
        for name in layers.names:
            W = layers.W[name]
            Hh = {c: layers.H_heldout(name, c) for c in corpora}
            Xs = [layers.X_calib[(name, c)] for c in corpora]
            n = min(x.shape[0] for x in Xs)
            mixed = np.concatenate([x[: n // len(Xs)] for x in Xs])
            calibs = {c: layers.H(name, c) for c in corpora}
            calibs[" + ".join(corpora)] = hessian_from(mixed)
            rtn = rtn_quantize(W, cfg).weight
            rows.append({"layer": layers.short(name), "calibrated on": "- (RTN)",
                         **{f"error on {c}": output_rel_error(W, rtn, Hh[c]) for c in corpora}})
            for cal, H in calibs.items():
                Q = gptq_quantize(W, H, cfg).weight
                rows.append({"layer": layers.short(name), "calibrated on": cal,
                             **{f"error on {c}": output_rel_error(W, Q, Hh[c]) for c in corpora}})
    return rows


def domain_summary(rows: list[dict], corpora=("prose", "code")) -> list[dict]:
    """Geometric mean over the layers, per calibration set and evaluation corpus."""
    out = []
    for cal in dict.fromkeys(r["calibrated on"] for r in rows):
        out.append({"calibrated on": cal, **{f"error on {c}": mean_error(rows, f"error on {c}", **{
            "calibrated on": cal}) for c in corpora}})
    return out


def input_similarity(layers: RealLayers, name: str, a: str = "prose", b: str = "code") -> dict:
    """How different two corpora look to one layer: the relative difference of their held-out Hessians, and
    of their calibration Hessians to each other."""
    Ha, Hb = layers.H_heldout(name, a), layers.H_heldout(name, b)
    Ca, Cb = layers.H(name, a), layers.H(name, b)
    rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))  # noqa: E731
    return {"held-out a vs b": rel(Ha, Hb), "calibration a vs held-out a": rel(Ca, Ha),
            "calibration b vs held-out b": rel(Cb, Hb)}


# ---------------------------------------------------------------------------------------------------------
# whole-model runs (too slow for a notebook on 2 cores: computed once, stored in WHOLE_MODEL_RESULTS)


def calibration_set(tokenizer, calib: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """nsamples windows from one corpus, or 'prose + code': half from each (the same number of tokens)."""
    from .data import calibration_windows

    parts = [c.strip() for c in calib.split("+")]
    if len(parts) == 1:
        return calibration_windows(tokenizer, parts[0], nsamples, seqlen, seed)
    k = nsamples // len(parts)
    return torch.cat([calibration_windows(tokenizer, c, k, seqlen, seed) for c in parts])


def whole_model_run(lm, cfg: QuantConfig | None, method: str = "gptq", calib: str = "prose",
                    nsamples: int = 16, seqlen: int = 512, eval_corpora=("prose", "code"),
                    eval_windows: int = 8, seed: int = 0) -> dict:
    """Quantize a copy of the model (models.quantize.quantize_model, the paper's sequential method) and
    measure its perplexity on the first eval_windows x seqlen evaluation tokens of each corpus (the same
    tokens for every seed). `seed` draws the calibration windows. cfg=None (method "fp") evaluates the
    unquantized model."""
    from .data import evaluation_ids
    from .metrics import perplexity
    from .models.quantize import quantize_model

    t = time.perf_counter()
    model = lm.model
    out = {"method": method, "calib": calib if method == "gptq" else "-", "nsamples": nsamples,
           "seqlen": seqlen, "eval_windows": eval_windows, "seed": seed if method == "gptq" else None}
    if cfg is not None:
        ids = calibration_set(lm.tokenizer, calib, nsamples, seqlen, seed) if method == "gptq" else None
        qm = quantize_model(lm, ids, cfg, method=method, progress=False, inplace=False,
                            hessian_condition=False)
        model = qm.model
        out["config"] = cfg.label()
        out["bits per weight"] = model_storage(lm, cfg.bits, cfg.group_size)["linear bits per weight"]
        out["dead inputs"] = sum(r.dead_columns or 0 for r in qm.layers)
    for c in eval_corpora:
        ids = evaluation_ids(lm.tokenizer, c, n_tokens=eval_windows * seqlen)
        out[f"ppl {c}"] = perplexity(model, ids, seqlen=seqlen, progress=False).ppl
    out["seconds"] = time.perf_counter() - t
    return out


def calibration_seed_runs(folder: str | Path | None = None) -> list[dict]:
    """Lesson 6's whole-model runs repeated over calibration seeds (benchmarks/lesson6_seeds.py writes one
    JSON per run into <results>/lesson6/), sorted by calibration set and seed."""
    from .results import read_reports, results_dir

    folder = Path(folder) if folder is not None else results_dir() / "lesson6"
    runs = read_reports(folder, "benchmarks/lesson6_seeds.py")
    return sorted(runs, key=lambda r: (r["calib"], r["seed"]))


def seed_summary(runs: list[dict], corpora=("prose", "code")) -> list[dict]:
    """Per calibration set: how many seeds, and the mean, lowest and highest perplexity on each corpus."""
    out = []
    for calib in dict.fromkeys(r["calib"] for r in runs):
        rs = [r for r in runs if r["calib"] == calib]
        row = {"calibrated on": calib, "seeds": len(rs)}
        for c in corpora:
            v = [r[f"ppl {c}"] for r in rs]
            row.update({f"{c}: mean": float(np.mean(v)), f"{c}: lowest": min(v), f"{c}: highest": max(v)})
        out.append(row)
    return out


def seed_winners(runs: list[dict], corpora=("prose", "code")) -> list[dict]:
    """For each seed that has every calibration set: the perplexity of each on each corpus, and which
    calibration set scored best on each corpus."""
    calibs = list(dict.fromkeys(r["calib"] for r in runs))
    by = {(r["calib"], r["seed"]): r for r in runs}
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        if not all((c, seed) in by for c in calibs):
            continue
        row: dict = {"seed": seed}
        for corpus in corpora:
            vals = {c: by[(c, seed)][f"ppl {corpus}"] for c in calibs}
            row.update({f"{corpus}, calibrated on {c}": v for c, v in vals.items()})
            row[f"best on {corpus}"] = min(vals, key=vals.get)
        out.append(row)
    return out


def fig_spectrum(spectra: dict, damps=(0.01, 0.1)):
    """Eigenvalues of H (descending, log scale) for each calibration size, with lambda for a few dampings."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, sp in spectra.items():
        ev = np.clip(sp["eigenvalues"][::-1], 1e-12, None)  # exact zeros cannot be drawn on a log axis
        fig.add_trace(go.Scatter(x=np.arange(1, ev.size + 1), y=ev, mode="lines", name=label))
    first = next(iter(spectra.values()))
    for d in damps:
        lam = d * first["mean_diag"]
        fig.add_hline(y=lam, line_dash="dot", annotation_text=f"lambda at damp_percent={d:g}",
                      annotation_position="top right")
    fig.update_xaxes(title_text="eigenvalue rank")
    fig.update_yaxes(type="log", title_text="eigenvalue of H (zeros drawn at 1e-12)")
    fig.update_layout(height=420, legend=dict(orientation="h", y=-0.2), margin=dict(t=40, b=40),
                      title="the spectrum of H, and what damping adds")
    return fig


# Whole-model runs for lesson 6, made once with whole_model_run on the offline smollm2-135m: GPTQ (and RTN)
# 4-bit g128 sym, damp 0.01, true-sequential; calibration 16 windows x 512 tokens, seed 0; perplexity with the
# paper's protocol on the first 8 x 512 tokens of each corpus' evaluation part; 4 significant digits. E.g.:
#   whole_model_run(load_model("smollm2-135m"), QuantConfig(bits=4), "gptq", calib="code")
# (about 2-3 CPU minutes for the quantization and 1 for the two evaluations, on one core).
WHOLE_MODEL_RESULTS: dict = {
    "fp": {"method": "fp", "calib": "-", "ppl prose": 14.46, "ppl code": 10.47},
    "gptq 4b g128": {
        "method": "gptq", "calib": "prose", "config": "4-bit g128 sym", "bits per weight": 4.2144,
        "dead inputs": 0, "ppl prose": 19.76, "ppl code": 16.80,
    },
    "gptq 4b g128 calib code": {
        "method": "gptq", "calib": "code", "config": "4-bit g128 sym", "bits per weight": 4.2144,
        "dead inputs": 0, "ppl prose": 18.83, "ppl code": 14.87,
    },
    "gptq 4b g128 calib prose + code": {  # 8 windows of each corpus (calibration_set)
        "method": "gptq", "calib": "prose + code", "config": "4-bit g128 sym", "bits per weight": 4.2144,
        "dead inputs": 0, "ppl prose": 20.01, "ppl code": 14.30,
    },
    "rtn 4b g128": {  # no calibration data
        "method": "rtn", "calib": "-", "config": "4-bit g128 sym", "bits per weight": 4.2144,
        "dead inputs": 0, "ppl prose": 23.34, "ppl code": 16.13,
    },
}
