"""Whole-model results, shipped and computed: one place that finds, matches, stores and tabulates reports.

Shipped runs are the perplexity table of `benchmarks/bench_models.py`, read back. Where they live:
``data/results/<model>/<run-id>.json`` in the repository, found relative to this package
(``<repo>/gptq_explorer/services/results.py`` -> ``<repo>/data/results``). That works for the editable
install (``pip install -e .``, what ``./run.sh`` does) and for a checkout on ``sys.path``; a wheel does not
carry them. ``$GPTQ_EXPLORER_RESULTS`` points elsewhere (a folder holding ``<model>/<run-id>.json``).

One file per run, named by :func:`run_id` (``fp``, ``rtn-w4-g128-sym``, ``gptq-w3-grow-asym``,
``gptq-w4-g128-sym-act``), holding the report of ``gptq-explorer quantize --json``
(``services.reports.build_report``):

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
    samples       {prompt: greedy continuation} of metrics.SAMPLE_PROMPTS (absent when not asked for)
    layers        list of per-linear rows (models.quantize.LayerReport as a dict: name, block, group,
                  shape, bits, group_size, sym, method, h_trace, h_mean_diag, dead_columns, h_condition,
                  damp_percent_used, loss, output_mse, output_rel_error, weight_rel_error, seconds);
                  empty for "fp". RTN without calibration has no Hessian statistics (None).
    timings       {"load", "quantize", "quantize_catch", "quantize_forward", "quantize_hessian",
                  "quantize_quantize", "eval_<corpus>", "samples", "total"}: seconds (absent keys: step
                  not run); GPTAQ adds "quantize_forward_fp", the full-precision stream's share of
                  quantize_forward
    memory        {"peak_rss_bytes", "activation_buffers_bytes", "hessian_bytes_max_group",
                  "single_pass"} for quantized runs; {} for "fp". Runs on calibration data also have
                  "gptaq_streams" (2 for GPTAQ), GPTAQ runs "gptaq_fp_inputs_bytes" (the most the FP
                  linears' inputs kept for dXXT took at once: a block's in the single pass, a batch of
                  one group's in the paper's loop)
    export        None, or {"folder", "summary"} when the run saved a checkpoint
    environment   {"torch", "transformers", "python", "gptq_explorer", "git" (commit, "+dirty" when the
                  package differed from it), "platform", "cpu_count", "load_average", "device" (where
                  the blocks ran: "cpu", "cuda"; absent in runs made before it was recorded, which ran on
                  the CPU), and for CUDA runs "gpu" (the card's name) and "cuda" (the toolkit version)}
    created       ISO-8601 UTC time the run finished

Numbers are as measured on the machine named in ``environment`` (times depend on its load).

The method table (``benchmarks/bench_methods.py``: RTN, GPTQ and the methods after it, docs/methods.md) is
kept apart, in ``data/results/methods/<model>/<name>.json``: the same schema, but its own, REDUCED protocol
(32 x 512 calibration windows, 16,384 evaluation tokens per corpus in windows of 512), so its numbers are
never mixed with the main table's. :func:`method_runs` reads it, :func:`find_shipped` matches in it by the
whole config (``runs=method_runs(model)``), and :func:`method_label` names a run's method.

Computed reports (the Model Lab's Compute button: the same schema plus "samples" and "settings") are kept
by ReportCache under ``cache_root()/model_lab/reports/<model>/<method>-<key>.json``; known_reports lists a
model's shipped and computed reports together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from ..engine.rtn import RTN_KEYS
from ..models.catalog import DEFAULT_MODEL
from ..settings import BEYOND_PAPER_KEYS, defaults

REPORT_FORMAT = 1  # bump when a computed (cached) report's meaning changes


def results_dir() -> Path:
    """The folder holding ``<model>/<run-id>.json``: ``$GPTQ_EXPLORER_RESULTS`` or ``<repo>/data/results``."""
    env = os.environ.get("GPTQ_EXPLORER_RESULTS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data" / "results"


def model_slug(model: str) -> str:
    """A model name as one folder name: a Hugging Face id's '/' becomes '--' (as in the hub cache), any
    other character but letters, digits and '-_.' becomes '-', and long names (folders) keep their end."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model.replace("/", "--"))[-80:]


def model_dir(model: str = DEFAULT_MODEL) -> Path:
    """Results folder of one model (named by model_slug)."""
    return results_dir() / model_slug(model)


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
            if not isinstance(report, dict):
                raise ValueError(f"a JSON {type(report).__name__}, not an object")
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
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


METHOD_TABLE = "methods"  # results_dir()/methods/<model>/: the method table (benchmarks/bench_methods.py)


def method_dir(model: str = DEFAULT_MODEL) -> Path:
    """The method table's folder of one model: results_dir()/methods/<model_slug>."""
    return results_dir() / METHOD_TABLE / model_slug(model)


def method_runs(model: str = DEFAULT_MODEL) -> list[dict]:
    """Every stored run of the method table of a model (the JSON reports, plus 'run_id' and 'path'), sorted
    by name; its protocol is its own (reduced), so it is never mixed with shipped_runs. An empty list when
    nothing has been measured."""
    return read_reports(method_dir(model), script="benchmarks/bench_methods.py")


def method_label(method: str, config: dict | None = None) -> str:
    """A run's method in words, from its method ("fp", "rtn", "gptq") and config (a report's "config" or
    QuantConfig.to_dict()): 'FP', 'RTN', 'GPTQ', 'GPTAQ', 'GPTQ + MSE grid', 'RTN + rotation',
    'GPTAQ + MSE grid + GAR', 'GPTQ + act-order', 'GPTQ ternary'. Missing fields read as defaults."""
    if method == "fp":
        return "FP"
    c = {**defaults(), **(config or {})}
    name = "GPTAQ" if method == "gptq" and c["gptaq_alpha"] else method.upper()
    parts = [name]
    if c["mse_norm"]:
        parts.append("MSE grid")
    if method == "gptq" and c["group_aware"]:
        parts.append("GAR")
    if method == "gptq" and c["desc_act"]:
        parts.append("act-order")
    if c["rotation"]:
        parts.append("rotation")
    text = " + ".join(parts)
    return text + " ternary" if c["ternary"] else text


def method_config(cfg, method: str) -> dict | None:
    """The part of a QuantConfig a method's result depends on: RTN the grid only, GPTQ everything, FP
    nothing (None)."""
    if method == "fp":
        return None
    d = cfg.to_dict()
    if method == "rtn":
        return {k: d[k] for k in RTN_KEYS}
    return d


def _config_matches(report: dict, want: dict) -> bool:
    """The report's config has every value of `want`; a field missing from an older report reads as its
    default, and numbers that are not integers compare to 1e-6."""
    have, fallback = report.get("config") or {}, defaults()
    for key, value in want.items():
        got = have.get(key, fallback.get(key))
        if value is None or got is None:
            if value is not got:
                return False
            continue
        if isinstance(value, float) or isinstance(got, float):
            if got is None or not math.isclose(float(got), float(value), rel_tol=1e-6):
                return False
        elif got != value:
            return False
    return True


def _matches(report: dict, method: str, want: dict, extra: dict) -> bool:
    if report.get("method") != method:
        return False
    if method != "fp":
        if report.get("overrides"):
            return False  # the shipped table is uniform; mixed precision is never a match
        if not _config_matches(report, want):
            return False
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
    unknown = set(extra) - {"damp_percent", "static_groups", "block_size", "calib_nsamples", "calib_seqlen",
                            *BEYOND_PAPER_KEYS}
    if unknown:
        raise TypeError(f"find_run got unknown keyword(s) {sorted(unknown)}")
    named = {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act}
    # None matches anything for the named fields; the methods after GPTQ must be off (their defaults)
    want = {**defaults(BEYOND_PAPER_KEYS),
            **{k: v for k, v in named.items() if v is not None},
            **{k: v for k, v in extra.items() if not k.startswith("calib_")}}
    hits = [r for r in shipped_runs(model) if _matches(r, method, want, extra)]
    if not hits:
        return None
    return max(hits, key=lambda r: r.get("created", ""))


def find_shipped(model: str, method: str, cfg, runs: list[dict] | None = None) -> dict | None:
    """The shipped report of `model` for (method, QuantConfig), matched by the whole config (a field missing
    from an older report reads as its default): RTN ignores desc_act, damping, GAR and GPTAQ (it uses none
    of them), no method depends on block_size, and the rotation seed counts only with a rotation.
    runs: the reports to search (default: shipped_runs; method_runs(model) for the method table).
    With several matches, the one with the largest calibration, then evaluation, then the most recent."""
    runs = shipped_runs(model) if runs is None else runs
    want = {k: v for k, v in (method_config(cfg, method) or {}).items() if k != "block_size"}
    if want.get("rotation") is None:  # without a rotation its seed changes nothing
        want.pop("rotation_seed", None)
    hits = [r for r in runs if not r.get("overrides") and _matches(r, method, want, {})]
    if not hits:
        return None
    return max(hits, key=lambda r: ((r.get("calibration") or {}).get("nsamples", 0),
                                    (r.get("evaluation") or {}).get("tokens", 0), r.get("created", "")))


def same_evaluation(a: dict, b: dict) -> bool:
    """Whether two reports measured perplexity the same way (tokens per corpus, window length)."""
    ea, eb = a.get("evaluation") or {}, b.get("evaluation") or {}
    return ea.get("tokens") == eb.get("tokens") and ea.get("seqlen") == eb.get("seqlen")


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


# ---------------------------------------------------------------------------------------------------------
# writing reports, and the computed ones kept on disk


def _strict(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_json(path, report: dict, indent: int | None = 2) -> None:
    """Write a report as strict JSON (a non-finite number becomes null; other objects their str),
    atomically: a temporary file in the same folder replaces the target, so a half-written report is never
    read back, and the temporary file is removed whatever happens."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    text = json.dumps(_strict(report), indent=indent, default=str, allow_nan=False)
    try:
        tmp.write_text(text + "\n" if indent is not None else text)
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def report_key(model: str, method: str, cfg, settings) -> str:
    """The cache key of a computed report: model, method, the config fields the method depends on, and the
    settings (a dataclass, e.g. services.reports.ComputeSettings)."""
    blob = json.dumps({"format": REPORT_FORMAT, "model": model, "method": method,
                       "cfg": method_config(cfg, method), "settings": dataclasses.asdict(settings)},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    """Where the Model Lab keeps what it computes: cache_root()/model_lab."""
    from ..models.cache_folders import cache_root

    return cache_root() / "model_lab"


class ReportCache:
    """Computed reports on disk: <dir>/reports/<model>/<method>-<key>.json, written atomically. A report the
    disk refuses (full, read-only) is kept in memory for this session instead of being lost."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._unsaved: dict[Path, dict] = {}  # reports the disk refused, by the path they belong at

    def path(self, model: str, method: str, cfg, settings) -> Path:
        key = report_key(model, method, cfg, settings)
        return self.folder / "reports" / model_slug(model) / f"{method}-{key}.json"

    def get(self, model, method, cfg, settings) -> dict | None:
        p = self.path(model, method, cfg, settings)
        if p in self._unsaved:
            return self._unsaved[p]
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, model, method, cfg, settings, report: dict) -> str | None:
        """Store a report; returns None, or (when the disk refused it) a message saying it is kept for
        this session only and what to do. Never leaves a partial file behind."""
        p = self.path(model, method, cfg, settings)
        try:
            write_json(p, report, indent=None)
        except OSError as exc:
            self._unsaved[p] = report
            return (f"The {method.upper()} result could not be saved in {p.parent} "
                    f"({exc.strerror or exc}); it is shown, and kept until this page's kernel stops. "
                    "Free some disk space there to keep results across sessions.")
        self._unsaved.pop(p, None)
        return None

    def all(self, model: str) -> list[dict]:
        out = []
        folder = self.folder / "reports" / model_slug(model)
        for p in sorted(folder.glob("*.json")):
            if p in self._unsaved:
                continue
            with contextlib.suppress(OSError, json.JSONDecodeError):
                out.append(json.loads(p.read_text()))
        out += [r for p, r in self._unsaved.items() if p.parent == folder]
        return out


def known_reports(model: str, cache_dir: Path | None = None) -> list[dict]:
    """Every report of a model the explorer has: shipped ones (origin 'precomputed') and computed ones."""
    out = [{**r, "origin": "precomputed"} for r in shipped_runs(model)]
    cache = ReportCache(cache_dir or default_cache_dir())
    out += [{**r, "origin": "computed"} for r in cache.all(model)]
    return out
