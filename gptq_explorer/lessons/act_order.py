"""Lesson 5 (notebooks/05_desc_act_and_static_groups.ipynb): desc_act and static groups.

The accuracy of each act-order variant on real layers, the g_idx layout it produces, and what a reordered
g_idx costs a dequantize-and-multiply at inference (measured in torch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..engine import QuantConfig, gptq_quantize, rtn_quantize
from ..services.threads import single_blas_thread
from .measures import errors, mean_error
from .real_layers import RealLayers
from .step_by_step import gptq_in_order

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
    with single_blas_thread():
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


# ---- dequantize and multiply


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
            # fresh copies each round: where the allocator places a tensor can change one way's time for a
            # whole run; the best of `repeats` placements is what we compare
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
