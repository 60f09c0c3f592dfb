"""Lesson 7 (notebooks/07_whole_model.ipynb): the whole model.

Perplexity of FP / RTN / GPTQ (this run, and the shipped full-setting runs of services.results),
sensitive layers from the per-layer report, and mixed precision with overrides: what it buys and what it
costs in the checkpoint (checkpoint.storage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..checkpoint.storage import storage_of

# ---- the per-layer report


def _get(row, key):
    """A field of a per-layer report row (LayerReport or dict). "output_rel_norm" is derived: the relative
    output error as a norm ratio, ||X(W-Q)^T|| / ||XW^T|| = sqrt(output_rel_error)."""
    if key == "output_rel_norm":
        v = _get(row, "output_rel_error")
        return None if v is None else math.sqrt(v)
    return row[key] if isinstance(row, dict) else getattr(row, key)


def sublayer(name: str) -> str:
    """'model.layers.5.self_attn.q_proj' -> 'self_attn.q_proj'."""
    parts = name.split(".")
    return ".".join(parts[3:]) if len(parts) > 3 and parts[1] == "layers" else name


def sensitive_layers(layers, k: int, key: str = "output_rel_error") -> list[str]:
    """The k layers with the largest `key` in a per-layer report (LayerReport objects, or the dicts of a
    JSON report), largest first."""
    rows = [r for r in layers if _get(r, key) is not None]
    if len(rows) < k:
        raise ValueError(f"the report has {len(rows)} layers with {key!r}, fewer than k={k}; RTN without "
                         "calibration data has no output errors: pass calib_ids to quantize_model")
    rows.sort(key=lambda r: -_get(r, key))
    return [_get(r, "name") for r in rows[:k]]


def overrides_for(names, **change) -> dict:
    """quantize_model overrides that give exactly these layers (full module paths) other settings."""
    if not change:
        raise ValueError("say what to change, e.g. overrides_for(names, bits=8)")
    return {n: dict(change) for n in names}


def report_rows(layers, key: str = "output_rel_norm") -> list[dict]:
    """Per sublayer type: median, min and max of `key` over the blocks, and the block of the max."""
    groups: dict[str, list] = {}
    for r in layers:
        groups.setdefault(sublayer(_get(r, "name")), []).append(r)
    out = []
    for sub, rs in groups.items():
        v = np.array([_get(r, key) for r in rs], dtype=float)
        out.append({"sublayer": sub, f"{key} (median)": float(np.median(v)), "min": float(v.min()),
                    "max": float(v.max()), "block of max": int(_get(rs[int(np.argmax(v))], "block"))})
    return out


def report_comparison(a_layers, b_layers, labels=("RTN", "GPTQ"), key: str = "output_rel_norm") -> list[dict]:
    """Per sublayer type: the median of `key` in two per-layer reports and their ratio (b / a)."""
    a = {r["sublayer"]: r[f"{key} (median)"] for r in report_rows(a_layers, key)}
    b = {r["sublayer"]: r[f"{key} (median)"] for r in report_rows(b_layers, key)}
    if set(a) != set(b):
        raise ValueError(f"the reports cover different layer types: {sorted(a)} vs {sorted(b)}")
    return [{"sublayer": s, f"{labels[0]} (median)": a[s], f"{labels[1]} (median)": b[s],
             f"{labels[1]} / {labels[0]}": b[s] / a[s]} for s in a]


def fig_layer_report(layers, highlight=(), key: str = "output_rel_norm", title: str = ""):
    """One line per sublayer type across the blocks; the highlighted layers are circled."""
    import plotly.graph_objects as go

    fig = go.Figure()
    groups: dict[str, list] = {}
    for r in layers:
        groups.setdefault(sublayer(_get(r, "name")), []).append(r)
    for sub, rs in groups.items():
        fig.add_trace(go.Scatter(x=[_get(r, "block") for r in rs], y=[_get(r, key) for r in rs],
                                 mode="lines+markers", name=sub,
                                 hovertemplate="block %{x}<br>%{y:.4f}<extra>" + sub + "</extra>"))
    marked = [r for r in layers if _get(r, "name") in set(highlight)]
    if marked:
        fig.add_trace(go.Scatter(x=[_get(r, "block") for r in marked], y=[_get(r, key) for r in marked],
                                 mode="markers", name="chosen for 8 bits",
                                 marker=dict(size=14, symbol="circle-open", line=dict(width=2),
                                             color="black"),
                                 text=[_get(r, "name") for r in marked],
                                 hovertemplate="%{text}<br>%{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="block", yaxis_title=key, height=420,
                      legend=dict(orientation="h", y=-0.2), margin=dict(t=50, b=40))
    return fig


# ---- perplexity and mixed precision


def eval_ppl(model, ids, seqlen: int) -> float:
    """Perplexity with the paper's protocol (gptq_explorer.metrics.perplexity), quietly."""
    from ..metrics import perplexity

    return perplexity(model, ids, seqlen=seqlen, progress=False).ppl


def ppl_gap_closed(fp: float, rtn: float, other: float) -> float:
    """Share of RTN's perplexity increase over FP that `other` removes: (rtn - other) / (rtn - fp)."""
    return (rtn - other) / (rtn - fp)


@dataclass
class MixedRun:
    label: str
    overrides: dict
    layers_8bit: int  # layers the overrides raised above the base config's bits
    total_bits: int  # storage of the quantized linears in a GPTQ checkpoint (Storage.total_bits)
    weights: int  # quantized weights
    ppl: float
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights


def mixed_run(label: str, qm, ppl: float, base_bits: int, seconds: float = 0.0) -> MixedRun:
    """A MixedRun for a QuantizedModel already measured (e.g. the uniform baseline)."""
    st = storage_of(qm)
    return MixedRun(label, dict(qm.overrides), sum(r.bits > base_bits for r in qm.layers), st.total_bits,
                    st.weights, ppl, seconds)


def mixed_precision_runs(lm, cfg, choices: dict, ids, seqlen: int, method: str = "rtn", calib_ids=None
                         ) -> list[MixedRun]:
    """Quantize the model once per choice {label: overrides} (on a copy; the loaded model is untouched),
    and measure each: how many layers the overrides raised to more bits, the exact bits per weight of the
    quantized linears (as a GPTQ checkpoint stores them), and the perplexity on `ids`."""
    import time

    from ..models.quantize import quantize_model

    out = []
    for label, overrides in choices.items():
        t = time.perf_counter()
        qm = quantize_model(lm, calib_ids, cfg, method=method, overrides=overrides, inplace=False,
                            progress=False, hessian_condition=False)
        ppl = eval_ppl(qm.model, ids, seqlen)
        out.append(mixed_run(label, qm, ppl, cfg.bits, time.perf_counter() - t))
        del qm
    return out


def mixed_rows(runs: list[MixedRun], fp_ppl: float, base: MixedRun) -> list[dict]:
    """Table rows: bits per weight, extra bits per weight over `base`, perplexity, and the share of the
    base's perplexity increase over FP that each choice removes (per 0.01 extra bits per weight too)."""
    rows = []
    for r in runs:
        extra = r.bits_per_weight - base.bits_per_weight
        closed = ppl_gap_closed(fp_ppl, base.ppl, r.ppl)
        rows.append({"choice": r.label, "layers at 8 bits": r.layers_8bit,
                     "bits per weight": r.bits_per_weight, "extra bits per weight": extra,
                     "perplexity": r.ppl, "share of the gap removed": closed,
                     "removed per 0.01 extra bits": closed / (extra / 0.01) if extra > 0 else float("nan")})
    return rows


# ---- the shipped runs


SHIPPED_CONFIGS = ((4, 128, True), (3, 128, True), (4, 128, False), (3, 128, False))


def shipped_comparison(model: str = "smollm2-135m", configs=SHIPPED_CONFIGS,
                       corpora=("prose", "code")) -> dict:
    """The stored full-setting runs (services.results, written by benchmarks/bench_models.py) of FP and
    of RTN and GPTQ at each (bits, group_size, sym): {"runs": run id -> report or None, "missing": [ids],
    "rows": table rows of the runs present, "message": what to do about missing ones}."""
    from ..services import results

    runs = {"fp": results.find_run(model, "fp")}
    for bits, g, sym in configs:
        for method in ("rtn", "gptq"):
            runs[results.run_id(method, bits, g, sym)] = results.find_run(model, method, bits=bits,
                                                                          group_size=g, sym=sym)
    missing = [k for k, v in runs.items() if v is None]
    rows = [run_row(rid, r, corpora) for rid, r in runs.items() if r is not None]
    message = "" if not missing else (
        f"missing shipped runs for {model}: {', '.join(missing)} (in {results.model_dir(model)}). "
        "They come from `python benchmarks/bench_models.py` (resumable; see its docstring).")
    return {"runs": runs, "missing": missing, "rows": rows, "message": message}


def run_row(rid: str, r: dict, corpora=("prose", "code")) -> dict:
    """One stored run as a table row: method, bits, group, perplexities, time, calibration, where it ran."""
    from ..services.results import run_device

    c, cal, ev = r.get("config", {}), r.get("calibration") or {}, r.get("evaluation", {})
    row = {"run": rid, "method": r["method"].upper(), "bits": 32 if r["method"] == "fp" else c["bits"]}
    row.update({f"{k} ppl": r["perplexity"][k] for k in corpora})
    row["quantize s"] = r.get("timings", {}).get("quantize", 0.0)
    row["calibration"] = f"{cal['nsamples']} x {cal['seqlen']} {cal['corpus']}" if cal else "none"
    row["eval tokens per corpus"] = ev.get("tokens")
    if run_device(r) != "cpu":
        row["device"] = r.get("environment", {}).get("gpu", run_device(r))
    return row


def stored_runs(folder: str) -> dict:
    """The run reports in data/results/<folder> (e.g. "h200-python3.12", the runs made on a GPU): run id ->
    report. Raises FileNotFoundError naming the folder when it holds none."""
    from ..services import results

    path = results.results_dir() / folder
    runs = {r["run_id"]: r for r in results.read_reports(path)}
    if not runs:
        raise FileNotFoundError(f"no run reports in {path}")
    return runs


def samples_rows(runs: dict, run_ids: dict, prompts=None) -> list[dict]:
    """Greedy samples of stored runs side by side: one row per prompt, one column per label.
    runs: run id -> report (as shipped_comparison returns); run_ids: column label -> run id."""
    from ..metrics import SAMPLE_PROMPTS

    missing = [rid for rid in run_ids.values() if not (runs.get(rid) or {}).get("samples")]
    if missing:
        raise ValueError(f"no samples in the stored run(s) {missing}; rerun them with "
                         "`gptq-explorer quantize --samples` (benchmarks/bench_models.py does)")
    return [{"prompt": p, **{label: runs[rid]["samples"][p] for label, rid in run_ids.items()}}
            for p in (prompts or SAMPLE_PROMPTS)]
