"""The Model Lab: quantize a whole model with GPTQ and with RTN, and compare them with full precision.

    from gptq_explorer.ui import ModelLab
    lab = ModelLab()              # the offline default model; shipped results show at once
    lab                           # displays (or lab.widget inside your own layout)

What it shows for the chosen config (bits, group size, sym, desc_act, damping):
  * perplexity, FP vs RTN vs GPTQ, on the prose and code corpora (bars; the paper's protocol);
  * each quantized linear's output error ||X W^T - X Q^T||^2 / ||X W^T||^2 on its calibration inputs, in
    quantization order (RTN and GPTQ);
  * greedy generations of the three models from the same short prompt, side by side.

Where the numbers come from, in this order:
  1. precomputed: the reports shipped in data/results/<model>/ (gptq_explorer.results; the paper's
     128 x 512 calibration for the default model), shown instantly and labelled with their settings;
  2. computed here: the Compute button runs the three models with reduced settings (ComputeSettings:
     16 x 256 calibration windows, 4096 evaluation tokens per corpus; minutes on 2 CPU cores) in a
     background thread with a progress bar and Cancel. Each finished model's report is cached on disk
     (cache_root()/model_lab/reports), and quantize_model's own cache keeps the quantized layers
     (cache_root()/model_lab/quantized), so a config computed once is instant afterwards.
A cancelled run shows "Cancelled" and never replaces what is on screen; the shared model is never
modified (every method works on its own copy).

Reports have the schema of `gptq-explorer quantize --json` (cli.run_quantize), plus "samples"
{prompt: generated text} for computed runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import html
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from ..engine import QuantConfig
from ..metrics.generation import SAMPLE_PROMPTS, SAMPLE_TOKENS, generate_samples
from .common import (
    InputError,
    Job,
    ProgressBar,
    StaticPlot,
    guarded,
    info_html,
    message_html,
    message_widget,
    run_job,
)
from .layer_source import Cancelled, curated_models, get_model
from .presets import CUSTOM, DAMP_EXP, PRESETS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
BITS = (2, 8)
GROUP_SIZES = (-1, 32, 64, 128, 256)
METHODS = ("fp", "rtn", "gptq")
METHOD_LABEL = {"fp": "FP (no quantization)", "rtn": "RTN", "gptq": "GPTQ"}
COLORS = {"fp": "#1f77b4", "rtn": "#7f7f7f", "gptq": "#2ca02c"}
PROMPTS = SAMPLE_PROMPTS
DEFAULTS: dict = {"model": DEFAULT_MODEL, "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
                  "damp_percent": 0.01, "prompt": 0, "view": "auto"}
STATE_KEYS = tuple(DEFAULTS)
CONFIG_KEYS = ("bits", "group_size", "sym", "desc_act", "damp_percent")
VIEWS = ("auto", "precomputed", "computed")
REPORT_FORMAT = 1  # bump when a cached report's meaning changes


@dataclass(frozen=True)
class ComputeSettings:
    """How the Compute button measures (reduced from the shipped runs so it finishes in minutes)."""

    corpus: str = "prose"
    nsamples: int = 16
    seqlen: int = 256
    eval_corpora: tuple = ("prose", "code")
    eval_tokens: int = 4096
    eval_seqlen: int = 512
    seed: int = 0
    max_new_tokens: int = SAMPLE_TOKENS
    batch_size: int = 4  # evaluation windows per forward pass

    def describe(self) -> str:
        return (f"{self.nsamples}x{self.seqlen} {self.corpus} calibration, {self.eval_tokens} evaluation "
                f"tokens per corpus (windows of {self.eval_seqlen})")


REDUCED = ComputeSettings()


def describe_report(report: dict) -> str:
    """'128x512 prose calibration, 16384 evaluation tokens per corpus (windows of 512)' from a report."""
    parts = []
    calib = report.get("calibration")
    if calib:
        parts.append(f"{calib.get('nsamples')}x{calib.get('seqlen')} {calib.get('corpus')} calibration")
    elif report.get("method") == "rtn":
        parts.append("RTN needs no calibration")
    ev = report.get("evaluation") or {}
    if ev:
        parts.append(f"{ev.get('tokens')} evaluation tokens per corpus (windows of {ev.get('seqlen')})")
    return ", ".join(parts)


def config_label(cfg: QuantConfig, method: str | None = None) -> str:
    text = cfg.label()
    if method != "rtn":
        text += f", damp {cfg.damp_percent:.3g}, desc_act {'on' if cfg.desc_act else 'off'}"
    return text


# ---------------------------------------------------------------------------------------------------------
# where reports come from


def shipped_reports(model: str) -> list[dict]:
    """The shipped runs of a model (gptq_explorer.results), [] when there are none or no results module."""
    try:
        from .. import results
    except ImportError:  # pragma: no cover - older checkouts
        return []
    return [r for r in results.shipped_runs(model) if isinstance(r, dict)]


def _same_evaluation(a: dict, b: dict) -> bool:
    ea, eb = a.get("evaluation") or {}, b.get("evaluation") or {}
    return ea.get("tokens") == eb.get("tokens") and ea.get("seqlen") == eb.get("seqlen")


def find_shipped(model: str, method: str, cfg: QuantConfig, runs: list[dict] | None = None) -> dict | None:
    """The shipped report for (method, cfg): RTN ignores desc_act and damping (it uses neither)."""
    runs = shipped_reports(model) if runs is None else runs
    hits = []
    for r in runs:
        if r.get("method") != method or r.get("overrides"):
            continue
        if method != "fp":
            c = r.get("config") or {}
            keys = ["bits", "group_size", "sym"] + (["desc_act", "static_groups"] if method == "gptq" else [])
            if any(c.get(k, QuantConfig().to_dict()[k]) != getattr(cfg, k) for k in keys):
                continue
            if method == "gptq" and not math.isclose(float(c.get("damp_percent", 0.01)), cfg.damp_percent,
                                                     rel_tol=1e-6):
                continue
        hits.append(r)
    if not hits:
        return None
    return max(hits, key=lambda r: ((r.get("calibration") or {}).get("nsamples", 0),
                                    (r.get("evaluation") or {}).get("tokens", 0), r.get("created", "")))


def _method_cfg(cfg: QuantConfig, method: str) -> dict | None:
    """The part of the config a method's result depends on (RTN: the grid only; FP: nothing)."""
    if method == "fp":
        return None
    d = cfg.to_dict()
    if method == "rtn":
        return {k: d[k] for k in ("bits", "group_size", "sym")}
    return d


def report_key(model: str, method: str, cfg: QuantConfig, settings: ComputeSettings) -> str:
    blob = json.dumps({"format": REPORT_FORMAT, "model": model, "method": method,
                       "cfg": _method_cfg(cfg, method), "settings": dataclasses.asdict(settings)},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    from ..models import cache_root

    return cache_root() / "model_lab"


def _slug(model: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model.replace("/", "--"))[-80:]


class ReportCache:
    """Computed reports on disk: <dir>/reports/<model>/<method>-<key>.json, written atomically. A report the
    disk refuses (full, read-only) is kept in memory for this session instead of being lost."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._unsaved: dict[Path, dict] = {}  # reports the disk refused, by the path they belong at

    def path(self, model: str, method: str, cfg: QuantConfig, settings: ComputeSettings) -> Path:
        key = report_key(model, method, cfg, settings)
        return self.folder / "reports" / _slug(model) / f"{method}-{key}.json"

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
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_text(json.dumps(report, default=str))
                os.replace(tmp, p)  # atomic: a half-written report is never read back
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        except OSError as exc:
            self._unsaved[p] = report
            return (f"The {method.upper()} result could not be saved in {p.parent} "
                    f"({exc.strerror or exc}); it is shown, and kept until this page's kernel stops. "
                    "Free some disk space there to keep results across sessions.")
        self._unsaved.pop(p, None)
        return None

    def all(self, model: str) -> list[dict]:
        out = []
        folder = self.folder / "reports" / _slug(model)
        for p in sorted(folder.glob("*.json")):
            if p in self._unsaved:
                continue
            with contextlib.suppress(OSError, json.JSONDecodeError):
                out.append(json.loads(p.read_text()))
        out += [r for p, r in self._unsaved.items() if p.parent == folder]
        return out


def known_reports(model: str, cache_dir: Path | None = None) -> list[dict]:
    """Every report of a model the explorer has: shipped ones (origin 'precomputed') and computed ones."""
    out = [{**r, "origin": "precomputed"} for r in shipped_reports(model)]
    cache = ReportCache(cache_dir or default_cache_dir())
    out += [{**r, "origin": "computed"} for r in cache.all(model)]
    return out


# ---------------------------------------------------------------------------------------------------------
# computing


def clean_copy(model):
    """A deep copy of a model without hooks (the Layer Lab may have a capture hook on the shared model)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        mod._forward_hooks.clear()
        mod._forward_pre_hooks.clear()
    m.eval()
    return m


def perplexity_cancellable(model, ids, seqlen: int, batch_size: int, check, progress) -> tuple[float, int]:
    """The paper's protocol (metrics.perplexity: non-overlapping windows, tail dropped, exp of the mean
    window NLL), with a cancel check and progress between batches. Returns (ppl, windows)."""
    import torch

    from ..metrics import window_losses

    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    if n < 1:
        raise ValueError(f"perplexity needs at least one window of {seqlen} tokens; got {ids.numel()}")
    windows = ids[: n * seqlen].view(n, seqlen)
    losses: list[float] = []
    for i in range(0, n, batch_size):
        check()
        losses += window_losses(model, windows[i:i + batch_size]).tolist()
        progress(len(losses) / n)
    return math.exp(sum(losses) / len(losses)), n


def compute_report(model_name: str, method: str, cfg: QuantConfig, settings: ComputeSettings, *, check,
                   progress, cache_dir: Path | None) -> dict:
    """One method's report (the CLI's schema + samples), on a private copy of the shared model.
    cache_dir: where quantize_model keeps the quantized layers (<cache_dir>/quantized); None = nowhere."""
    import torch

    from ..data import calibration_windows, evaluation_ids
    from ..models.quantize import QuantizationCancelled, quantize_model

    t_start = time.perf_counter()
    lm = get_model(model_name, lambda f, text: progress(0.0, text))
    check()
    tok = lm.tokenizer
    report: dict = {"model": model_name, "source": lm.source, "method": method, "config": cfg.to_dict(),
                    "true_sequential": True, "overrides": {}, "threads": torch.get_num_threads(),
                    "calibration": None,
                    "evaluation": {"corpora": list(settings.eval_corpora), "tokens": settings.eval_tokens,
                                   "seqlen": settings.eval_seqlen},
                    "layers": [], "timings": {}, "settings": dataclasses.asdict(settings)}
    model = clean_copy(lm.model)
    quant_share = 0.0 if method == "fp" else 0.7
    try:
        if method != "fp":
            calib = calibration_windows(tok, settings.corpus, settings.nsamples, settings.seqlen,
                                        settings.seed)
            report["calibration"] = {"corpus": settings.corpus, "nsamples": settings.nsamples,
                                     "seqlen": settings.seqlen, "seed": settings.seed}
            from ..models import get_adapter

            blocks = get_adapter(model).get_blocks(model)
            seen = {"n": 0}

            def block_started(_module, _args):
                seen["n"] += 1
                progress(quant_share * min(seen["n"], len(blocks)) / len(blocks),
                         f"quantizing block {min(seen['n'], len(blocks))}/{len(blocks)}")

            handles = [b.register_forward_pre_hook(block_started) for b in blocks]
            t0 = time.perf_counter()
            try:
                # RTN gets the calibration data too: not for its result (it uses none) but to measure its
                # per-layer output errors on the same inputs as GPTQ's
                qm = quantize_model(model, calib, cfg, method=method, progress=False,
                                    cancel=lambda: check(soft=True),
                                    cache_dir=None if cache_dir is None else Path(cache_dir) / "quantized",
                                    save_hessians=False, hessian_condition=False, tokenizer=tok)
            except QuantizationCancelled as exc:
                raise Cancelled(str(exc)) from None
            finally:
                for h in handles:
                    h.remove()
            report["timings"]["quantize"] = time.perf_counter() - t0
            report["layers"] = qm.report_rows()
            report["from_cache"] = qm.from_cache
        ppl, windows = {}, {}
        corpora = list(settings.eval_corpora)
        for i, corpus in enumerate(corpora):
            ids = evaluation_ids(tok, corpus, settings.eval_tokens)
            t0 = time.perf_counter()
            span = (1 - quant_share) * 0.85 / len(corpora)
            base = quant_share + i * span
            ppl[corpus], windows[corpus] = perplexity_cancellable(
                model, ids, settings.eval_seqlen, settings.batch_size, check,
                lambda f, base=base, span=span, corpus=corpus: progress(base + f * span,
                                                                        f"perplexity on {corpus}"))
            report["timings"][f"eval_{corpus}"] = time.perf_counter() - t0
        report["perplexity"], report["perplexity_windows"] = ppl, windows
        progress(quant_share + (1 - quant_share) * 0.85, "generating samples")
        report["samples"] = generate_samples(model, tok, PROMPTS, settings.max_new_tokens, check)
    finally:
        del model
    report["timings"]["total"] = time.perf_counter() - t_start
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return report


# ---------------------------------------------------------------------------------------------------------
# the view


def _validate(key: str, value):
    from .layer_lab import _validate_value

    if key in ("bits", "group_size", "damp_percent", "desc_act", "sym"):
        v = _validate_value(key, value)
        if key == "group_size" and v not in GROUP_SIZES:
            raise InputError(f"group_size must be one of {list(GROUP_SIZES)}, got {v}")
        return v
    if key == "prompt":
        from .common import as_int

        v = as_int(value)
        if not 0 <= v < len(PROMPTS):
            raise InputError(f"prompt must be between 0 and {len(PROMPTS) - 1}, got {v}")
        return v
    if key == "view":
        if value not in VIEWS:
            raise InputError(f"view must be one of {list(VIEWS)}, got {value!r}")
        return value
    if key == "model":
        return value  # checked against the offered list by the lab
    raise InputError(f"unknown setting {key!r}; allowed: {list(STATE_KEYS)}")


@dataclass
class ResultSet:
    """What the page shows for one config: a report per method (or None), and where they come from."""

    origin: str  # "precomputed" | "computed" | "none"
    reports: dict  # method -> report | None
    label: str

    @property
    def complete(self) -> bool:
        return all(self.reports.get(m) is not None for m in METHODS)


class ModelLab:
    """The Model Lab (see the module doc). Public API:

    ModelLab(model="smollm2-135m", *, models=None, settings=REDUCED, cache_dir=None, threaded=True,
             state=None, shipped=None, keep_quantized=True)
    lab.widget / display(lab)          the view
    lab.set(**values)                  change controls (validated; bad values raise InputError)
    lab.state() / lab.state_query()    the state; lab.apply_preset(name); lab.compute(); lab.cancel()
    lab.wait(timeout)                  join the background job
    lab.results                        the ResultSet on screen; lab.ppl_plot / lab.layer_plot (StaticPlot)
    shipped: a list of reports to use instead of gptq_explorer.results (tests); None = the shipped ones.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, models=None, settings: ComputeSettings = REDUCED,
                 cache_dir=None, threaded: bool = True, state: dict | None = None, shipped=None,
                 keep_quantized: bool = True):
        self.settings = settings
        # quantize_model's cache holds every quantized layer (~0.1 GB per method and config for SmolLM2);
        # a shared workshop server may prefer keep_quantized=False (the small reports are cached anyway)
        self.keep_quantized = bool(keep_quantized)
        self.threaded = bool(threaded)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = ReportCache(self.cache_dir)
        self._shipped_override = shipped
        self._shipped: dict[str, list[dict]] = {}
        self.errors: list[str] = []
        self.last_error: BaseException | None = None
        self.job: Job | None = None
        self.last_outcome: str | None = None
        self._quiet = 0
        self._lock = threading.RLock()
        self.results = ResultSet("none", dict.fromkeys(METHODS), "")
        self._build(model, models)
        values = {**DEFAULTS, "model": model, **(state or {})}
        with self._quietly():
            for key in STATE_KEYS:
                if key in values and key != "model":
                    self._set_control(key, self._validate(key, values[key]))
        self._refresh_presets()
        self.refresh()

    # -----------------------------------------------------------------------------------------------------
    # construction

    def _build(self, model: str, models) -> None:
        W = widgets
        lay = W.Layout(width="260px")
        desc = {"description_width": "95px"}
        if models is None:
            models = curated_models()
        items = list(models.items()) if isinstance(models, dict) else [(m, m) for m in models]
        opts = [((mid if d == mid else f"{mid} — {d}")[:90], mid) for mid, d in items]
        if model not in [v for _, v in opts]:
            opts.insert(0, (model, model))  # a Python caller's choice is trusted
        c: dict[str, widgets.Widget] = {}
        c["model"] = W.Dropdown(options=opts, value=model, description="model", layout=lay, style=desc)
        c["bits"] = W.IntSlider(min=BITS[0], max=BITS[1], value=4, description="bits",
                                continuous_update=False, layout=lay, style=desc)
        c["group_size"] = W.Dropdown(options=[("per row (-1)", -1)] + [(str(g), g) for g in GROUP_SIZES[1:]],
                                     value=128, description="group size", layout=lay, style=desc)
        c["sym"] = W.Checkbox(value=True, description="symmetric grid", indent=False)
        c["desc_act"] = W.Checkbox(value=False, description="desc_act (act-order)", indent=False)
        c["damp_percent"] = W.FloatLogSlider(value=0.01, base=10, min=DAMP_EXP[0], max=DAMP_EXP[1], step=0.25,
                                             description="damp_percent", readout_format=".3g",
                                             continuous_update=False, layout=lay, style=desc)
        c["prompt"] = W.Dropdown(options=[(p, i) for i, p in enumerate(PROMPTS)], value=0,
                                 description="prompt", layout=W.Layout(width="360px"),
                                 style={"description_width": "50px"})
        c["view"] = W.ToggleButtons(options=[("best", "auto"), ("shipped", "precomputed"),
                                             ("computed", "computed")], value="auto",
                                    tooltips=["precomputed when there is a complete set, else computed here",
                                              "only the shipped (precomputed) results",
                                              "only results computed here (reduced settings)"],
                                    style={"button_width": "80px"})
        self.controls = c
        for key in STATE_KEYS:
            c[key].observe(self._on_change, names="value")
        self.preset = W.Dropdown(options=[CUSTOM, *PRESETS], value=CUSTOM, description="preset",
                                 layout=W.Layout(width="430px"), style={"description_width": "50px"})
        self.preset.observe(self._on_preset, names="value")
        self.compute_button = W.Button(description="Compute", icon="play", button_style="primary",
                                       tooltip="quantize with RTN and GPTQ and measure (reduced settings)",
                                       layout=W.Layout(width="120px"))
        self.compute_button.on_click(lambda _b: self.compute())
        self.progress = ProgressBar(self.cancel)
        self.message = message_widget()
        self.status = W.HTML(value="")
        self.status.add_class("gptq-model-status")
        self.summary = W.HTML(value="", layout=W.Layout(width="420px"))
        self.samples = W.HTML(value="")
        self.samples.add_class("gptq-samples")
        self.ppl_plot = StaticPlot(self._ppl_figure(), layout=W.Layout(width="470px"))
        self.layer_plot = StaticPlot(self._layer_figure())
        self.copy_button = W.Button(description="Copy link", icon="link", layout=W.Layout(width="110px"))
        self.copy_button.on_click(self._on_copy_link)
        self.link = W.HTML(value="")

        def section(title, items):
            return W.VBox([W.HTML(f"<b>{title}</b>"), *items], layout=W.Layout(margin="0 0 8px 0"))

        panel = W.VBox([section("Model", [c["model"]]),
                        section("GPTQ config", [c["bits"], c["group_size"], c["sym"], c["desc_act"],
                                                c["damp_percent"]]),
                        section("Results", [c["view"], self.compute_button])],
                       layout=W.Layout(width="280px", min_width="280px", flex="0 0 280px"))
        header = W.HBox([W.HTML("<h3 style='margin:4px 12px 4px 0'>GPTQ Model Lab</h3>"), self.preset,
                         self.copy_button], layout=W.Layout(align_items="center"))
        main = W.VBox([self.status, W.HBox([self.ppl_plot.widget, self.summary]), self.layer_plot.widget,
                       W.HTML("<b>Sample generations</b> (greedy, same prompt)"), c["prompt"], self.samples],
                      layout=W.Layout(flex="1 1 auto", min_width="0"))
        self.root = W.VBox([header, self.link, self.message, self.progress.box, W.HBox([panel, main])])

    @property
    def widget(self) -> widgets.Widget:
        return self.root

    def _repr_mimebundle_(self, **kwargs):
        return self.root._repr_mimebundle_(**kwargs)

    # -----------------------------------------------------------------------------------------------------
    # state

    @contextlib.contextmanager
    def _quietly(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _validate(self, key: str, value):
        v = _validate(key, value)
        if key == "model":
            allowed = [val for _, val in self.controls["model"].options]
            if v not in allowed:
                raise InputError(f"model must be one of {allowed}, got {v!r}")
        return v

    def _set_control(self, key: str, value) -> None:
        self.controls[key].value = value

    def state(self) -> dict:
        return {k: self.controls[k].value for k in STATE_KEYS}

    def state_query(self, prefix: str = "") -> str:
        return urlencode({prefix + k: (("1" if v else "0") if isinstance(v, bool) else v)
                          for k, v in self.state().items()})

    def config(self) -> QuantConfig:
        c = self.controls
        return QuantConfig(bits=int(c["bits"].value), group_size=int(c["group_size"].value),
                           sym=bool(c["sym"].value), desc_act=bool(c["desc_act"].value),
                           damp_percent=float(c["damp_percent"].value))

    @property
    def model(self) -> str:
        return self.controls["model"].value

    def set(self, **values) -> None:
        """Change controls; every value is checked first (InputError, shown in the page, nothing changes)."""
        try:
            unknown = sorted(set(values) - set(STATE_KEYS))
            if unknown:
                raise InputError(f"unknown setting(s) {unknown}; allowed: {list(STATE_KEYS)}")
            clean = {k: self._validate(k, v) for k, v in values.items()}
        except InputError as exc:
            self.show_error(exc, where="set")
            raise
        with self._quietly():
            for k, v in clean.items():
                self._set_control(k, v)
        if any(k in CONFIG_KEYS for k in clean):
            self._mark_custom()
        self.refresh()

    @guarded
    def apply_preset(self, name: str) -> None:
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; presets: {list(PRESETS)}")
        values, blurb = PRESETS[name]
        with self._quietly():
            for k in CONFIG_KEYS:
                self._set_control(k, values[k])
            self.preset.value = name
        self.refresh()
        if self.results.origin == "precomputed":
            self._info(f"<b>{html.escape(name)}</b>: {html.escape(blurb)}")
        else:
            self._info(f"<b>{html.escape(name)}</b>: {html.escape(blurb)} No precomputed result for it: "
                       f"press Compute ({html.escape(self.settings.describe())}).")

    def _mark_custom(self) -> None:
        if self.preset.value != CUSTOM:
            with self._quietly():
                self.preset.value = CUSTOM

    def _refresh_presets(self) -> None:
        """Mark the presets that ship a precomputed GPTQ result for this model."""
        opts = [CUSTOM]
        for name, (values, _) in PRESETS.items():
            cfg = QuantConfig(**{k: values[k] for k in CONFIG_KEYS})
            mark = " ✓ precomputed" if find_shipped(self.model, "gptq", cfg, self._runs()) else ""
            opts.append((name + mark, name))
        current = self.preset.value
        with self._quietly():
            self.preset.options = [(o, o) if isinstance(o, str) else o for o in opts]
            self.preset.value = current

    # -----------------------------------------------------------------------------------------------------
    # callbacks

    @guarded
    def _on_change(self, change) -> None:
        if self._quiet:
            return
        key = next(k for k, w in self.controls.items() if w is change["owner"])
        if key in CONFIG_KEYS:
            self._mark_custom()
        if key == "model":
            self._refresh_presets()
        if key == "prompt":
            self._render_samples()
        else:
            self.refresh()

    @guarded
    def _on_preset(self, change) -> None:
        if self._quiet or change["new"] == CUSTOM:
            return
        self.apply_preset(change["new"])

    @guarded
    def _on_copy_link(self, _button=None) -> None:
        qs = self.state_query()
        self.link.value = (f"<div style='font-size:12px'>Link to this state (select and copy): "
                           f"<code style='user-select:all'>?{html.escape(qs)}</code></div>")

    # -----------------------------------------------------------------------------------------------------
    # results

    def _runs(self) -> list[dict]:
        model = self.model
        if self._shipped_override is not None:
            return [r for r in self._shipped_override if r.get("model", model) == model]
        if model not in self._shipped:
            try:
                self._shipped[model] = shipped_reports(model)
            except Exception as exc:  # noqa: BLE001 - a broken shipped file must not break the lab
                self.show_error(exc, where="reading the shipped results")
                self._shipped[model] = []
        return self._shipped[model]

    def resolve(self, cfg: QuantConfig | None = None) -> ResultSet:
        """The reports to show for a config (see the module doc for the order)."""
        cfg = cfg or self.config()
        model, runs = self.model, self._runs()
        shipped = {m: find_shipped(model, m, cfg, runs) for m in METHODS}
        g = shipped["gptq"] or shipped["rtn"]
        if g is not None:  # FP / the other method only when measured the same way
            shipped = {m: (r if r is not None and _same_evaluation(r, g) else None)
                       for m, r in shipped.items()}
        computed = {m: self.cache.get(model, m, cfg, self.settings) for m in METHODS}
        pre = ResultSet("precomputed", shipped, "precomputed: " + describe_report(g) if g else "")
        comp = ResultSet("computed", computed,
                         "computed here (reduced settings): " + self.settings.describe())
        view = self.controls["view"].value
        have_pre = shipped["gptq"] is not None or shipped["rtn"] is not None
        have_comp = computed["gptq"] is not None or computed["rtn"] is not None
        if have_pre and (view == "precomputed" or (view == "auto" and (pre.complete or not comp.complete))):
            return pre
        if have_comp and view != "precomputed":
            return comp
        # nothing quantized for this config (in this view): FP alone, as the reference
        fp = computed["fp"] or find_shipped(model, "fp", cfg, runs)
        return ResultSet("none", {"fp": fp, "rtn": None, "gptq": None}, "")

    @guarded
    def refresh(self) -> None:
        """Show what is known for the current config (instant: reads shipped and cached reports)."""
        with self._lock:
            res = self.resolve()
            self.results = res
            self.ppl_plot.show(self._ppl_figure(res))
            self.layer_plot.show(self._layer_figure(res))
            self._render_summary()
            self._render_samples()
            self._render_status()

    def _render_status(self) -> None:
        res, cfg = self.results, self.config()
        missing = [METHOD_LABEL[m] for m in METHODS if res.reports.get(m) is None]
        running = self.job is not None and self.job.outcome == "running"
        if res.origin == "precomputed":
            cfgs = {m: config_label(QuantConfig.from_dict(r["config"]), m)
                    for m, r in res.reports.items() if r is not None and m != "fp"}
            text = (f"<b>{html.escape(res.label)}</b>; " +
                    "; ".join(f"{METHOD_LABEL[m]}: {html.escape(t)}" for m, t in cfgs.items()))
            cls = "gptq-precomputed"
        elif res.origin == "computed":
            text = f"<b>{html.escape(res.label)}</b>; {html.escape(config_label(cfg))}"
            cls = "gptq-computed"
        else:
            text = (f"No result yet for <b>{html.escape(self.model)}</b>, {html.escape(config_label(cfg))}. "
                    f"Press <b>Compute</b> to measure it here with reduced settings "
                    f"({html.escape(self.settings.describe())}; the shipped runs use 128x512 calibration): "
                    "minutes on a small CPU machine.")
            cls = "gptq-missing"
        if missing and res.origin != "none":
            text += f"<br>Not in this set: {', '.join(missing)}" + (
                " (press Compute for a complete set with reduced settings)." if not running else ".")
        self.status.value = f"<div class='{cls}' style='font-size:13px;padding:4px 0'>{text}</div>"
        self.compute_button.disabled = running
        self.compute_button.description = "Computing…" if running else "Compute"

    def _render_summary(self) -> None:
        res = self.results
        fp = res.reports.get("fp")
        corpora = self._corpora(res)
        if not corpora:
            self.summary.value = ""
            return
        rows = []
        for m in METHODS:
            r = res.reports.get(m)
            cells = []
            for corpus in corpora:
                p = (r or {}).get("perplexity", {}).get(corpus)
                base = (fp or {}).get("perplexity", {}).get(corpus)
                if p is None:
                    cells.append("—")
                elif m != "fp" and base:
                    cells.append(f"{p:.2f} <small>({100 * (p / base - 1):+.1f}%)</small>")
                else:
                    cells.append(f"{p:.2f}")
            td = "<td style='text-align:right;padding-left:10px'>"
            rows.append(f"<tr><td style='color:{COLORS[m]}'><b>{METHOD_LABEL[m]}</b></td>"
                        + "".join(f"{td}{c}</td>" for c in cells) + "</tr>")
        head = "".join(f"<th style='text-align:right;padding-left:10px'>{c}</th>" for c in corpora)
        note = ""
        g, r = res.reports.get("gptq"), res.reports.get("rtn")
        if g and r and fp:
            gp, rp, fpp = g.get("perplexity", {}), r.get("perplexity", {}), fp.get("perplexity", {})
            gaps = [(gp[c] - fpp[c], rp[c] - fpp[c]) for c in corpora if c in gp and c in rp and c in fpp]
            if gaps and all(rg > 0 for _, rg in gaps):
                kept = [1 - gg / rg for gg, rg in gaps]
                note = ("<br>GPTQ closes " + ", ".join(f"{100 * k:.0f}%" for k in kept)
                        + " of RTN's perplexity gap to FP (" + ", ".join(corpora) + ").")
        self.summary.value = (f"<div style='font-size:13px;padding:30px 6px 4px 6px'><b>Perplexity</b> "
                              f"(lower is better)<table style='border-collapse:collapse;margin:6px 0'>"
                              f"<tr><th></th>{head}</tr>{''.join(rows)}</table>{note}</div>")

    def _render_samples(self) -> None:
        prompt = PROMPTS[int(self.controls["prompt"].value)]
        cells = []
        for m in METHODS:
            r = self.results.reports.get(m)
            text = ((r or {}).get("samples") or {}).get(prompt)
            body = (f"<b>{html.escape(prompt)}</b>{html.escape(text)}" if text is not None else
                    "<i style='color:#777'>no sample in this report (shipped reports carry none: press "
                    "Compute to generate them here)</i>")
            cells.append(f"<td style='vertical-align:top;width:33%;padding:6px;border:1px solid #ddd'>"
                         f"<div style='color:{COLORS[m]};font-weight:600'>{METHOD_LABEL[m]}</div>"
                         "<div style='white-space:pre-wrap;font-family:monospace;font-size:12px'>"
                         f"{body}</div></td>")
        self.samples.value = (f"<table style='border-collapse:collapse;width:900px'><tr>{''.join(cells)}</tr>"
                              "</table>")

    @staticmethod
    def _corpora(res: ResultSet) -> list[str]:
        out: list[str] = []
        for m in METHODS:
            for c in ((res.reports.get(m) or {}).get("perplexity") or {}):
                if c not in out:
                    out.append(c)
        return out

    def _ppl_figure(self, res: ResultSet | None = None) -> go.Figure:
        res = res or self.results
        corpora = self._corpora(res) or ["prose", "code"]
        fig = go.Figure()
        values = []
        for m in METHODS:
            r = res.reports.get(m) or {}
            y = [r.get("perplexity", {}).get(c) for c in corpora]
            values += [v for v in y if v is not None]
            fig.add_trace(go.Bar(
                x=corpora, y=[np.nan if v is None else v for v in y], name=METHOD_LABEL[m].split(" ")[0],
                marker_color=COLORS[m], text=["" if v is None else f"{v:.2f}" for v in y],
                textposition="outside", cliponaxis=False,
                hovertemplate="%{x}: perplexity %{y:.3f}<extra>" + METHOD_LABEL[m] + "</extra>"))
        log_y = bool(values) and max(values) / max(min(values), 1e-9) > 20
        title = "Perplexity (lower is better)" if values else "Perplexity: no result yet (press Compute)"
        fig.update_layout(
            barmode="group", width=470, height=330, template="plotly_white",
            title=dict(text=title, font=dict(size=14)), margin=dict(l=60, r=10, t=50, b=40),
            legend=dict(orientation="h", y=-0.15, x=0.5, xanchor="center"),
            yaxis=dict(title=dict(text="perplexity" + (" (log scale)" if log_y else ""), standoff=8),
                       type="log" if log_y else "linear", rangemode="tozero"),
            xaxis=dict(title=dict(text="evaluation corpus", standoff=4)))
        if values and not log_y:
            fig.update_yaxes(range=[0, max(values) * 1.18])
        return fig

    def _layer_figure(self, res: ResultSet | None = None) -> go.Figure:
        res = res or self.results
        fig = go.Figure()
        ticks: dict[int, str] = {}
        missing = []
        for m in ("rtn", "gptq"):
            r = res.reports.get(m) or {}
            layers = r.get("layers") or []
            ys = [row.get("output_rel_error") for row in layers]
            if not layers or all(y is None for y in ys):
                if r:
                    missing.append(METHOD_LABEL[m])
                fig.add_trace(go.Scatter(x=[], y=[], name=METHOD_LABEL[m], mode="lines+markers",
                                         line=dict(color=COLORS[m])))
                continue
            names = [row["name"] for row in layers]
            for i, row in enumerate(layers):
                if i == 0 or row.get("block") != layers[i - 1].get("block"):
                    ticks[i] = str(row.get("block"))
            fig.add_trace(go.Scatter(
                x=list(range(len(layers))), y=[np.nan if y is None else y for y in ys], customdata=names,
                name=METHOD_LABEL[m], mode="lines+markers", line=dict(color=COLORS[m], width=1.2),
                marker=dict(size=4), hovertemplate="%{customdata}<br>relative output error %{y:.3g}"
                "<extra>" + METHOD_LABEL[m] + "</extra>"))
        every = max(1, len(ticks) // 15)
        tick_items = list(ticks.items())[::every]
        title = "Per-layer output error on calibration inputs, ‖XWᵀ − XQᵀ‖² / ‖XWᵀ‖²"
        if not ticks:
            fig.add_annotation(text="no per-layer errors in this view yet", x=0.5, y=0.5, xref="paper",
                               yref="paper", showarrow=False, font=dict(size=14, color="#888"))
            fig.update_yaxes(showticklabels=False)
        if missing:
            title += f" (not in the report: {', '.join(missing)})"
        fig.update_layout(
            width=900, height=320, template="plotly_white", title=dict(text=title, font=dict(size=14)),
            margin=dict(l=70, r=10, t=50, b=50), legend=dict(x=1.0, xanchor="right", y=1.0),
            yaxis=dict(type="log", exponentformat="power",
                       title=dict(text="relative error (log)", standoff=8)),
            xaxis=dict(title=dict(text="decoder block (its linears in quantization order)", standoff=4),
                       tickvals=[i for i, _ in tick_items], ticktext=[t for _, t in tick_items]))
        return fig

    # -----------------------------------------------------------------------------------------------------
    # computing (background)

    def compute(self) -> None:
        """Compute the methods missing from the computed set for the current config (background thread)."""
        if self.job is not None and self.job.outcome == "running":
            self._info("A computation is already running: wait for it, or press Cancel.")
            return
        model, cfg, settings = self.model, self.config(), self.settings
        todo = [m for m in METHODS if self.cache.get(model, m, cfg, settings) is None]
        if not todo:
            with self._quietly():
                self.controls["view"].value = "computed"
            self.refresh()
            self._info("Already computed: showing the cached results.")
            return
        job = Job(f"computing {', '.join(METHOD_LABEL[m].split(' ')[0] for m in todo)} for {model}")
        self.job = job
        self.progress.start(job.label)
        self._clear_message()
        self._render_status()
        weights = {"fp": 0.15, "rtn": 0.3, "gptq": 0.55}
        total = sum(weights[m] for m in todo)

        def check(soft: bool = False):
            if job.cancel.is_set():
                if soft:
                    return True
                raise Cancelled("cancelled")
            return False

        def work():
            done = 0.0
            try:
                for m in todo:
                    def progress(f, text, m=m, done=done):
                        if job is self.job:
                            self.progress.set((done + weights[m] * f) / total,
                                              f"{METHOD_LABEL[m].split(' ')[0]}: {text}")

                    report = compute_report(model, m, cfg, settings, check=check, progress=progress,
                                            cache_dir=self.cache_dir if self.keep_quantized else None)
                    check()
                    unsaved = self.cache.put(model, m, cfg, settings, report)
                    if unsaved:
                        job.notes.append(unsaved)
                    done += weights[m]
                job.outcome = "done"
            except Cancelled:
                job.outcome = "cancelled"
            except Exception as exc:  # noqa: BLE001
                job.outcome = "failed"
                self.show_error(exc, where=job.label)
            finally:
                self.last_outcome = job.outcome
                if job is self.job:
                    self.progress.stop()
                    self._finish(job, model, cfg)

        run_job(job, work, self.threaded, "ModelLab-compute")

    def _finish(self, job: Job, model: str, cfg: QuantConfig) -> None:
        if job.outcome == "cancelled":
            self._render_status()
            self.message.value = message_html(
                Cancelled("nothing from the unfinished method was kept or shown; the model is unchanged"),
                where=job.label)
            return
        if job.outcome == "done":
            if self.model == model and self.config() == cfg:
                with self._quietly():
                    self.controls["view"].value = "computed"
            self.refresh()
            notes = "".join(f"<br>{html.escape(n)}" for n in job.notes)
            self._info(f"Done: {html.escape(job.label)} ({html.escape(self.settings.describe())}).{notes}")
            return
        self._render_status()

    @guarded
    def cancel(self) -> None:
        if self.job is not None and self.job.outcome == "running":
            self.job.cancel.set()
            self.progress.label.value = "cancelling… (stops at the next layer or batch)"
            self.progress.cancel_button.disabled = True

    def wait(self, timeout: float | None = None) -> None:
        job = self.job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)

    # -----------------------------------------------------------------------------------------------------
    # messages

    def show_error(self, exc: BaseException, where: str = "") -> None:
        self.last_error = exc
        self.errors.append(f"{type(exc).__name__}: {exc}")
        log.warning("ModelLab %s failed", where, exc_info=exc)
        self.message.value = message_html(exc, where)

    def _info(self, text_html: str) -> None:
        self.message.value = info_html(text_html)

    def _clear_message(self) -> None:
        self.message.value = ""
