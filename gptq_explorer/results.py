"""Shipped whole-model results: the perplexity table of `benchmarks/bench_models.py`, read back.

Where they live: ``data/results/<model>/<run-id>.json`` in the repository, found relative to this package
(``<repo>/gptq_explorer/results.py`` -> ``<repo>/data/results``). That works for the editable install
(``pip install -e .``, what ``./run.sh`` does) and for a checkout on ``sys.path``; a wheel does not carry
them. ``$GPTQ_EXPLORER_RESULTS`` points elsewhere (a folder holding ``<model>/<run-id>.json``).

One file per run, named by :func:`run_id` (``fp``, ``rtn-w4-g128-sym``, ``gptq-w3-grow-asym``,
``gptq-w4-g128-sym-act``), holding the report of ``gptq-explorer quantize --json`` (``cli.run_quantize``):

    run_id        str: the file's stem
    model         str: "smollm2-135m" (a registry name, Hugging Face id or folder)
    source        str: where the weights came from (for SmolLM2: de-quantized Q4_1 GGUF)
    method        "fp" | "rtn" | "gptq"
    config        QuantConfig.to_dict(): bits, group_size (-1 = per row), sym, damp_percent, desc_act,
                  static_groups, block_size. Meaningless for "fp" (no quantization): ignore it there.
    true_sequential bool
    overrides     {glob pattern: {field: value}} (empty for the shipped table)
    threads       torch threads used
    calibration   None (fp, and rtn which needs no data) or {"corpus", "nsamples", "seqlen", "seed",
                  "corpus_info": {...}}
    evaluation    {"corpora": [...], "tokens": tokens per corpus, "seqlen": window length,
                  "corpus_info": {corpus: {"source", "sha256", "python_version", ...}}}
    perplexity    {corpus: float}: the paper's protocol (non-overlapping windows, tail dropped)
    perplexity_windows {corpus: number of windows}
    layers        list of per-linear rows (models.quantize.LayerReport as a dict: name, block, group,
                  shape, bits, group_size, sym, method, h_trace, h_mean_diag, dead_columns, h_condition,
                  damp_percent_used, loss, output_mse, output_rel_error, weight_rel_error, seconds);
                  empty for "fp". RTN without calibration has no Hessian statistics (None).
    timings       {"load", "quantize", "quantize_catch", "quantize_forward", "quantize_hessian",
                  "quantize_quantize", "eval_<corpus>", "total"}: seconds (absent keys: step not run)
    memory        {"peak_rss_bytes", "activation_buffers_bytes", "hessian_bytes_max_group",
                  "single_pass"} for quantized runs; {} for "fp"
    export        None, or {"folder", "summary"} when the run saved a checkpoint
    environment   {"torch", "transformers", "python", "gptq_explorer", "git" (commit, "+dirty" when the
                  package differed from it), "platform", "cpu_count", "load_average", "device" (where
                  the blocks ran: "cpu", "cuda"; absent in runs made before it was recorded, which ran on
                  the CPU), and for CUDA runs "gpu" (the card's name) and "cuda" (the toolkit version)}
    created       ISO-8601 UTC time the run finished

Numbers are as measured on the machine named in ``environment`` (times depend on its load).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


def results_dir() -> Path:
    """The folder holding ``<model>/<run-id>.json``: ``$GPTQ_EXPLORER_RESULTS`` or ``<repo>/data/results``."""
    env = os.environ.get("GPTQ_EXPLORER_RESULTS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "data" / "results"


def model_dir(model: str = DEFAULT_MODEL) -> Path:
    """Results folder of one model (a Hugging Face id's '/' becomes '--', as in the hub cache)."""
    return results_dir() / model.replace("/", "--")


def run_id(
    method: str, bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False
) -> str:
    """The file stem of one run: 'fp', 'rtn-w4-g128-sym', 'gptq-w3-grow-asym' (grow = per row, -1)."""
    if method == "fp":
        return "fp"
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'fp', 'rtn' or 'gptq', got {method!r}")
    group = "row" if group_size == -1 else str(group_size)
    return f"{method}-w{bits}-g{group}-{'sym' if sym else 'asym'}" + ("-act" if desc_act else "")


def read_reports(folder: Path, script: str = "benchmarks/bench_models.py") -> list[dict]:
    """The JSON reports in a folder (plus 'run_id' and 'path'), sorted by file name; a file that does not
    parse raises ValueError naming it and the script that rewrites it."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a readable run report ({exc}); delete it and re-run "
                             f"{script}") from None
        report.setdefault("run_id", path.stem)
        report["path"] = str(path)
        runs.append(report)
    return runs


def shipped_runs(model: str = DEFAULT_MODEL) -> list[dict]:
    """Every stored run of a model (the JSON reports, plus 'run_id' and 'path'), sorted by run id.
    An empty list when nothing has been measured for it."""
    return read_reports(model_dir(model))


def _matches(report: dict, method: str, bits, group_size, sym, desc_act, extra: dict) -> bool:
    if report.get("method") != method:
        return False
    if method != "fp":
        cfg = report.get("config", {})
        want = {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act}
        want.update({k: v for k, v in extra.items() if k in cfg})
        if any(v is not None and cfg.get(k) != v for k, v in want.items()):
            return False
        if report.get("overrides"):
            return False  # the shipped table is uniform; mixed precision is never a match
    calib = report.get("calibration") or {}
    for key in ("nsamples", "seqlen"):
        if extra.get(f"calib_{key}") is not None and calib.get(key) != extra[f"calib_{key}"]:
            return False
    return True


def find_run(
    model: str = DEFAULT_MODEL,
    method: str = "gptq",
    *,
    bits: int | None = 4,
    group_size: int | None = 128,
    sym: bool | None = True,
    desc_act: bool | None = False,
    **extra,
) -> dict | None:
    """The stored run of `model` quantized with `method` ('fp', 'rtn', 'gptq') and this config, or None.

    bits/group_size/sym/desc_act: None matches anything; they are ignored for 'fp'. extra: other
    QuantConfig fields (damp_percent=0.01, ...) and calib_nsamples / calib_seqlen. Runs with per-layer
    overrides never match. With several matches, the most recent ('created') is returned.
    """
    unknown = set(extra) - {"damp_percent", "static_groups", "block_size", "calib_nsamples", "calib_seqlen"}
    if unknown:
        raise TypeError(f"find_run got unknown keyword(s) {sorted(unknown)}")
    hits = [r for r in shipped_runs(model) if _matches(r, method, bits, group_size, sym, desc_act, extra)]
    if not hits:
        return None
    return max(hits, key=lambda r: r.get("created", ""))


def _fmt_group(g: int) -> str:
    return "per row" if g == -1 else f"g{g}"


def run_device(report: dict) -> str:
    """Where a run's blocks ran: "cpu" or "cuda" (reports from before this was recorded ran on the CPU)."""
    device = str(report.get("environment", {}).get("device", "cpu"))
    return "cuda" if device.startswith("cuda") else device


def results_table(runs: list[dict], corpora: tuple[str, ...] = ("prose", "code")) -> str:
    """A markdown table of runs (as from shipped_runs): FP first, then by bits (high first), group size,
    sym before asym, RTN before GPTQ; perplexity per corpus with the change against FP, and times."""
    fp = next((r for r in runs if r["method"] == "fp"), None)

    def order(r):
        if r["method"] == "fp":
            return (0,)
        c = r["config"]
        g = c["group_size"] if c["group_size"] != -1 else 1 << 30
        return (1, -c["bits"], g, not c["sym"], c.get("desc_act", False), r["method"] != "rtn")

    head = ["method", "bits", "group", "grid"]
    head += [f"{c} ppl" for c in corpora]
    head += ["quantize s", "eval tokens/corpus"]
    devices = [run_device(r) for r in runs]
    if any(d != "cpu" for d in devices):  # times on a GPU are not times on the CPU: say where
        head.append("device")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|"]
    for r in sorted(runs, key=order):
        if r["method"] == "fp":
            row = ["FP32", "32", "", ""]
        else:
            c = r["config"]
            grid = ("sym" if c["sym"] else "asym") + (" act" if c.get("desc_act") else "")
            row = [r["method"].upper(), str(c["bits"]), _fmt_group(c["group_size"]), grid]
        for corpus in corpora:
            p = r.get("perplexity", {}).get(corpus)
            if p is None:
                row.append("")
                continue
            base = (fp or {}).get("perplexity", {}).get(corpus)
            delta = f" ({100 * (p / base - 1):+.1f}%)" if base and r is not fp else ""
            row.append(f"{p:.3f}{delta}")
        q = r.get("timings", {}).get("quantize")
        row.append("" if q is None else f"{q:.0f}")
        e = r.get("evaluation", {})
        row.append(f"{e.get('tokens', '')} (windows of {e.get('seqlen', '')})")
        if "device" in head:
            gpu = r.get("environment", {}).get("gpu", "GPU")
            row.append(gpu if run_device(r) != "cpu" else f"CPU ({r.get('threads')} threads)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
