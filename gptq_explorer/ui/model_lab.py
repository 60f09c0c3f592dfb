"""The Model Lab: quantize a whole model with GPTQ and with RTN, and compare them with full precision.

    from gptq_explorer.ui import ModelLab
    lab = ModelLab()              # the offline default model; shipped results show at once
    lab                           # displays (or lab.widget inside your own layout)

What it shows for the chosen config (bits, group size, sym, desc_act, damping, and the method: the knobs
of the methods after GPTQ, set one by one in the "Method" section or all at once by the method menu):
  * perplexity, FP vs RTN vs GPTQ, on the prose and code corpora (bars; the paper's protocol);
  * each quantized linear's output error ||X W^T - X Q^T||^2 / ||X W^T||^2 on its calibration inputs, in
    quantization order (RTN and GPTQ);
  * greedy generations of the three models from the same short prompt, side by side;
  * the shipped method runs at the current bits and group size (perplexity, quantize time), one click each
    to select one (model_charts.MethodTable).

Where the numbers come from, in this order (gptq_explorer.services.results finds them all):
  1. precomputed: the reports shipped in data/results/<model>/ (the paper's 128 x 512 calibration for the
     default model), shown instantly and labelled with their settings;
  2. the method table shipped in data/results/methods/<model>/ (services.results.method_runs: its own,
     reduced protocol, 32 x 512 calibration and 16,384 evaluation tokens per corpus, which the page
     states), when the main table has no GPTQ run for the config (a method knob is on);
  3. computed here: the Compute button builds the three reports (services.reports.build_report) with
     reduced settings (services.reports.REDUCED: 16 x 256 calibration windows, 4096 evaluation tokens per
     corpus) in a background thread with a progress bar and Cancel. Each finished model's report is cached
     on disk (services.results.ReportCache, cache_root()/model_lab/reports), and quantize_model's own
     cache keeps the quantized layers (cache_root()/model_lab/quantized), so a config computed once is
     instant afterwards.
The results toggle picks where from: "best" (that order, a complete computed set before an incomplete
shipped one), "shipped" (1, then 2), "methods" (2 only: what a click in the method table selects, so that
its run shows and not the main table's at the same config) or "computed" (3).
A cancelled run shows "Cancelled" and never replaces what is on screen; the shared model is never
modified (every method works on its own copy).

Reports have the schema of `gptq-explorer quantize --json` (services.results), plus "samples"
{prompt: generated text} and "settings" (the ComputeSettings) for computed runs.
"""

from __future__ import annotations

import dataclasses
import html
import threading
from pathlib import Path

import ipywidgets as widgets

from ..engine import QuantConfig
from ..metrics.generation import SAMPLE_PROMPTS
from ..models.catalog import DEFAULT_MODEL
from ..services.layer_source import Cancelled, curated_models, get_model
from ..services.reports import METHODS, REDUCED, ComputeSettings, build_report, describe_report
from ..services.results import (
    ReportCache,
    default_cache_dir,
    find_shipped,
    method_label,
    method_runs,
    same_evaluation,
    shipped_runs,
)
from ..settings import BEYOND_PAPER_KEYS, CUSTOM, PRESETS, QUANT_KEYS, defaults
from .common import InputError, Job, ProgressBar, StaticPlot, guarded, message_html, message_widget
from .controls import Lab, knob_control, preset_dropdown
from .layer_methods import COMBINED, method_of, method_values
from .layer_methods import METHODS as METHOD_MENU
from .model_charts import (
    METHOD_LABEL,
    MethodTable,
    ResultSet,
    layer_error_figure,
    ppl_figure,
    samples_html,
    summary_html,
)

PROMPTS = SAMPLE_PROMPTS
VIEWS = ("auto", "precomputed", "methods", "computed")
SHIPPED_VIEWS = ("precomputed", "methods")  # views of shipped reports only (never a computed one)
PAPER_KNOBS = ("bits", "group_size", "sym", "desc_act", "damp_percent")
METHOD_KNOBS = BEYOND_PAPER_KEYS  # the "Method" section: mse_norm, group_aware, gptaq_alpha, rotation, ...
KNOBS = PAPER_KNOBS + METHOD_KNOBS
# the rest of the state: a prompt's index, the results view, the model (checked against the offered list)
VIEW_RULES = {"model": None, "prompt": (0, len(PROMPTS) - 1), "view": list(VIEWS)}
DEFAULTS: dict = {"model": DEFAULT_MODEL, **defaults(KNOBS), "prompt": 0, "view": "auto"}
STATE_KEYS = tuple(DEFAULTS)


def config_label(cfg: QuantConfig, method: str | None = None) -> str:
    text = cfg.label()
    if method != "rtn":
        text += f", damp {cfg.damp_percent:.3g}, desc_act {'on' if cfg.desc_act else 'off'}"
    return text


def series_names(cfg: QuantConfig) -> dict:
    """What the page calls RTN's and GPTQ's series when a method knob is on ('GPTAQ', 'RTN + rotation');
    {} for the paper's GPTQ (FP / RTN / GPTQ as always)."""
    values = {**cfg.to_dict(), "desc_act": False}  # act-order is a setting of the paper's GPTQ
    if all(values[k] == v for k, v in defaults(METHOD_KNOBS).items()):
        return {}
    return {m: method_label(m, values) for m in ("rtn", "gptq")}


def shipped_set(model: str, cfg: QuantConfig, tables: list[tuple[list[dict], str]]) -> ResultSet | None:
    """The shipped reports for a config, from the first table (runs, label) with a GPTQ run for it, else the
    first with an RTN run; FP and the other method only where measured the same way. None: no table has
    either. tables: the main shipped table first, then the method table (its own protocol: never mixed)."""
    sets = []
    for runs, label in tables:
        found = {m: find_shipped(model, m, cfg, runs) for m in METHODS}
        g = found["gptq"] or found["rtn"]
        if g is None:
            continue
        found = {m: (r if r is not None and same_evaluation(r, g) else None) for m, r in found.items()}
        sets.append(ResultSet("precomputed", found, label + describe_report(g), series_names(cfg)))
    return next((s for s in sets if s.reports["gptq"] is not None), sets[0] if sets else None)


METHOD_TABLE_LABEL = "shipped method run, reduced protocol (benchmarks/bench_methods.py): "


def view_toggle() -> widgets.ToggleButtons:
    """The results toggle: where the numbers come from (VIEWS; the module doc says what each shows)."""
    return widgets.ToggleButtons(
        options=[("best", "auto"), ("shipped", "precomputed"), ("methods", "methods"),
                 ("computed", "computed")],
        value="auto", style={"button_width": "auto"},  # each label whole ("computed" is wider than 62 px)
        tooltips=["precomputed when there is a complete set, else computed here",
                  "only the shipped (precomputed) results",
                  "only the shipped method table (its reduced protocol)",
                  "only results computed here (reduced settings)"])


def status_html(res: ResultSet, cfg: QuantConfig, model: str, settings: ComputeSettings,
                running: bool) -> str:
    """The line above the charts: where the numbers come from and with which settings, what is missing."""
    missing = [res.name(m) for m in METHODS if res.reports.get(m) is None]
    if res.origin == "precomputed":
        cfgs = {m: config_label(QuantConfig.from_dict(r["config"]), m)
                for m, r in res.reports.items() if r is not None and m != "fp"}
        text = (f"<b>{html.escape(res.label)}</b>; " +
                "; ".join(f"{html.escape(res.name(m))}: {html.escape(t)}" for m, t in cfgs.items()))
        cls = "gptq-precomputed"
    elif res.origin == "computed":
        text = f"<b>{html.escape(res.label)}</b>; {html.escape(config_label(cfg))}"
        cls = "gptq-computed"
    else:
        text = (f"No result yet for <b>{html.escape(model)}</b>, {html.escape(config_label(cfg))}. "
                f"Press <b>Compute</b> to measure it here with reduced settings "
                f"({html.escape(settings.describe())}; the shipped runs use 128x512 calibration): "
                "minutes on a small CPU machine.")
        cls = "gptq-missing"
    if missing and res.origin != "none":
        text += f"<br>Not in this set: {', '.join(missing)}" + (
            " (press Compute for a complete set with reduced settings)." if not running else ".")
    return f"<div class='{cls}' style='font-size:13px;padding:4px 0'>{text}</div>"


# ---------------------------------------------------------------------------------------------------------
# the view


class ModelLab(Lab):
    """The Model Lab (see the module doc). Public API:

    ModelLab(model="smollm2-135m", *, models=None, settings=REDUCED, cache_dir=None, threaded=True,
             state=None, shipped=None, method_runs=None, keep_quantized=True)
    lab.widget / display(lab)          the view
    lab.set(**values)                  change controls (validated; bad values raise InputError)
    lab.state() / lab.state_query()    the state; lab.apply_preset(name); lab.compute(); lab.cancel()
    ModelLab.from_query(qs)            a lab in the state of a query string (bad values listed in the page)
    lab.wait(timeout)                  join the background job
    lab.results                        the ResultSet on screen; lab.ppl_plot / lab.layer_plot (StaticPlot)
    lab.config()                       the QuantConfig the controls show
    ModelLab.KNOBS                     the knobs it shows; lab.controls[name] is a knob's control
    lab.method_menu                    the method menu (layer_methods.METHODS): sets the method knobs
    lab.select_method(name)            the same from Python; lab.select_run(report) shows a shipped run
    lab.method_table                   the shipped method runs at the current bits and group size
    shipped / method_runs: lists of reports to use instead of services.results' shipped runs and method
    table (tests); None = the shipped ones.
    """

    NAME = "ModelLab"
    KNOBS = KNOBS
    VIEW_RULES = VIEW_RULES
    DEFAULTS = DEFAULTS

    def __init__(self, model: str = DEFAULT_MODEL, *, models=None, settings: ComputeSettings = REDUCED,
                 cache_dir=None, threaded: bool = True, state: dict | None = None, shipped=None,
                 method_runs=None, keep_quantized: bool = True):
        self.settings = settings
        # quantize_model's cache holds every quantized layer (~0.1 GB per method and config for SmolLM2);
        # a shared workshop server may prefer keep_quantized=False (the small reports are cached anyway)
        self.keep_quantized = bool(keep_quantized)
        self.threaded = bool(threaded)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = ReportCache(self.cache_dir)
        self._shipped_override = shipped
        self._methods_override = method_runs
        self._shipped: dict[tuple[str, str], list[dict]] = {}  # (table, model) -> its reports
        self._init_dashboard()
        self.job: Job | None = None
        self.last_outcome: str | None = None
        self._lock = threading.RLock()
        self.results = ResultSet("none", dict.fromkeys(METHODS), "")
        self._build(model, models)
        values = {**DEFAULTS, "model": model, **(state or {})}
        with self._quietly():
            for key in STATE_KEYS:
                if key in values and key != "model":
                    self._set_control(key, self._validate(key, values[key], values))
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
        for name in KNOBS:
            c[name] = knob_control(name, layout=lay, style=desc)
        self.method_menu = W.Dropdown(options=[*METHOD_MENU, COMBINED], value="GPTQ", description="method",
                                      layout=lay, style=desc)
        self.method_menu.observe(self._on_method, names="value")
        self.method_blurb = W.HTML(value="", layout=W.Layout(width="260px"))
        self.method_knobs = W.Accordion(children=[W.VBox([c[k] for k in METHOD_KNOBS])],
                                        selected_index=None, layout=W.Layout(width="270px"))
        self.method_knobs.set_title(0, "method knobs")
        self.method_table = MethodTable(self.select_run)
        c["prompt"] = W.Dropdown(options=[(p, i) for i, p in enumerate(PROMPTS)], value=0,
                                 description="prompt", layout=W.Layout(width="360px"),
                                 style={"description_width": "50px"})
        c["view"] = view_toggle()
        self.controls = c
        for key in STATE_KEYS:
            c[key].observe(self._on_change, names="value")
        self.preset = preset_dropdown("430px")
        self.preset.observe(self._on_preset, names="value")
        self.compute_button = W.Button(description="Compute", icon="play", button_style="primary",
                                       tooltip="quantize with RTN and GPTQ and measure (reduced settings)",
                                       layout=W.Layout(width="120px"))
        self.compute_button.on_click(lambda _b: self.compute())
        self.progress = ProgressBar(self.cancel)
        self.message = message_widget()
        self.status = W.HTML(value="")
        self.status.add_class("gptq-model-status")
        self.summary = W.HTML(value="", layout=W.Layout(flex="1 1 300px", min_width="0", max_width="460px"))
        self.samples = W.HTML(value="")
        self.samples.add_class("gptq-samples")
        # the plots take their box's width (responsive), the summary goes under the bars when there is no room
        self.ppl_plot = StaticPlot(ppl_figure(self.results), responsive=True,
                                   layout=W.Layout(flex="1 1 340px", min_width="0", max_width="520px"))
        self.layer_plot = StaticPlot(layer_error_figure(self.results), responsive=True,
                                     layout=W.Layout(width="100%"))
        self.copy_button = W.Button(description="Copy link", icon="link", layout=W.Layout(width="110px"))
        self.copy_button.on_click(self._on_copy_link)
        self.link = W.HTML(value="")

        def section(title, items):
            return W.VBox([W.HTML(f"<b>{title}</b>"), *items], layout=W.Layout(margin="0 0 8px 0"))

        panel = W.VBox([section("Model", [c["model"]]),
                        section("GPTQ config", [c[k] for k in PAPER_KNOBS]),
                        section("Method", [self.method_menu, self.method_blurb, self.method_knobs]),
                        section("Results", [c["view"], self.compute_button])],
                       layout=W.Layout(width="280px", min_width="280px", flex="0 0 280px"))
        header = W.HBox([W.HTML("<h3 style='margin:4px 12px 4px 0'>GPTQ Model Lab</h3>"), self.preset,
                         self.copy_button], layout=W.Layout(flex_flow="row wrap", align_items="center"))
        main = W.VBox([self.status, W.HBox([self.ppl_plot.widget, self.summary],
                                           layout=W.Layout(flex_flow="row wrap", width="100%")),
                       self.method_table.widget,
                       self.layer_plot.widget,
                       W.HTML("<b>Sample generations</b> (greedy, same prompt)"), c["prompt"], self.samples],
                      layout=W.Layout(flex="1 1 480px", min_width="0"))  # beside the panel down to 480 px
        self.root = W.VBox([header, self.link, self.message, self.progress.box,
                            W.HBox([panel, main], layout=W.Layout(flex_flow="row wrap"))])

    # -----------------------------------------------------------------------------------------------------
    # state

    @classmethod
    def _parse_value(cls, key: str, raw: str, *, models=None):
        if key == "model":
            offered = curated_models() if models is None else models
            if raw not in offered:
                raise InputError(f"'{raw}' is not one of the offered models")
            return raw
        return cls.check_value(key, raw)

    @classmethod
    def from_query(cls, query: str, *, strict: bool = False, **kwargs) -> ModelLab:
        """A lab in the state a query string describes (its own keys, without the app's `ml.` prefix).
        strict=True raises on any bad value; otherwise the bad ones are skipped and listed in the page.
        Keyword arguments go to ModelLab()."""
        values, problems = cls.parse_query(query, models=kwargs.get("models"))
        if problems and strict:
            raise InputError("; ".join(problems))
        if "model" in values:
            kwargs["model"] = values["model"]
        lab = cls(state=values, **kwargs)
        if problems:
            lab._info("Some settings in the link were not used: "
                      + "; ".join(html.escape(p) for p in problems))
        return lab

    @property
    def model(self) -> str:
        return self.controls["model"].value

    def _validate_all(self, values: dict) -> dict:
        """Each value checked by its knob, then the config they make together (GAR needs groups and no
        act-order): InputError with QuantConfig's message, nothing changed."""
        clean = super()._validate_all(values)
        knobs = {k: clean.get(k, self.controls[k].value) for k in KNOBS if k in QUANT_KEYS}
        try:
            QuantConfig(**knobs)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return clean

    def _apply(self, clean: dict) -> None:
        with self._quietly():
            for k, v in clean.items():
                self._set_control(k, v)
        if any(k in KNOBS for k in clean):
            self._mark_custom()
        self.refresh()

    @guarded
    def apply_preset(self, name: str) -> None:
        values, blurb = self._preset(name)
        with self._quietly():
            for k, v in values.items():
                self._set_control(k, v)
            self.preset.value = name
            if self.controls["view"].value == "methods":  # a preset is a config of the main table
                self.controls["view"].value = "auto"
        self.refresh()
        if self.results.origin == "precomputed":
            self._info(f"<b>{html.escape(name)}</b>: {html.escape(blurb)}")
        else:
            self._info(f"<b>{html.escape(name)}</b>: {html.escape(blurb)} No precomputed result for it: "
                       f"press Compute ({html.escape(self.settings.describe())}).")

    def _refresh_presets(self) -> None:
        """Mark the presets that ship a precomputed GPTQ result for this model."""
        opts = [CUSTOM]
        for name, (values, _) in PRESETS.items():
            cfg = QuantConfig(**{k: values[k] for k in KNOBS})
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
        if key in KNOBS:
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
    def _on_method(self, change) -> None:
        if self._quiet or change["new"] == COMBINED:
            return
        self.select_method(change["new"])

    def select_method(self, name: str) -> None:
        """Set the method knobs to method `name` (layer_methods.METHODS: "GPTQ", "GPTAQ", ...); the others
        stay (GAR turns act-order off and gives a per-row grid groups of 128). InputError for an unknown
        name (also shown in the page)."""
        try:
            values = method_values(name, self.state())
        except InputError as exc:
            self.show_error(exc, where="select_method")
            raise
        self.set(**values)

    def select_run(self, report: dict) -> None:
        """Show a run of the method table: the controls take its config (the knobs this lab has), and the
        view the method table (so that this run shows, not the main table's at the same config)."""
        config = {**defaults(KNOBS), **(report.get("config") or {})}
        self.set(**{k: config[k] for k in KNOBS}, view="methods")

    def _sync_method_menu(self) -> None:
        """The method menu names what the method knobs show (COMBINED when no single method)."""
        name = method_of({k: self.controls[k].value for k in METHOD_KNOBS})
        blurb = METHOD_MENU[name][1] if name in METHOD_MENU else "Several methods at once."
        with self._quietly():
            self.method_menu.value = name
        self.method_blurb.value = f"<div style='font-size:12px;color:#555'>{html.escape(blurb)}</div>"

    # -----------------------------------------------------------------------------------------------------
    # results

    def _runs(self, table: str = "main") -> list[dict]:
        """The shipped reports of the current model: the main table ("main") or the method table
        ("methods"), read once per model."""
        model = self.model
        override = self._shipped_override if table == "main" else self._methods_override
        if override is not None:
            return [r for r in override if r.get("model", model) == model]
        if (table, model) not in self._shipped:
            try:
                self._shipped[table, model] = (shipped_runs if table == "main" else method_runs)(model)
            except Exception as exc:  # noqa: BLE001 - a broken shipped file must not break the lab
                self.show_error(exc, where=f"reading the shipped {table} results")
                self._shipped[table, model] = []
        return self._shipped[table, model]

    def resolve(self, cfg: QuantConfig | None = None) -> ResultSet:
        """The reports to show for a config (see the module doc for the order)."""
        cfg = cfg or self.config()
        model, runs, view = self.model, self._runs(), self.controls["view"].value
        tables = [(self._runs("methods"), METHOD_TABLE_LABEL)]
        if view != "methods":  # the main table first: the paper's protocol
            tables.insert(0, (runs, "precomputed: "))
        pre = shipped_set(model, cfg, tables)
        pre = pre or ResultSet("precomputed", dict.fromkeys(METHODS), "", series_names(cfg))
        computed = {m: self.cache.get(model, m, cfg, self.settings) for m in METHODS}
        comp = ResultSet("computed", computed,
                         "computed here (reduced settings): " + self.settings.describe(), pre.names)
        have_pre = pre.reports["gptq"] is not None or pre.reports["rtn"] is not None
        have_comp = computed["gptq"] is not None or computed["rtn"] is not None
        if have_pre and (view in SHIPPED_VIEWS or (view == "auto" and (pre.complete or not comp.complete))):
            return pre
        if have_comp and view not in SHIPPED_VIEWS:
            return comp
        # nothing quantized for this config (in this view): FP alone, as the reference
        fp = computed["fp"] or find_shipped(model, "fp", cfg, runs)
        return ResultSet("none", {"fp": fp, "rtn": None, "gptq": None}, "", pre.names)

    @guarded
    def refresh(self) -> None:
        """Show what is known for the current config (instant: reads shipped and cached reports)."""
        with self._lock:
            res = self.resolve()
            self.results = res
            self.ppl_plot.show(ppl_figure(res))
            self.layer_plot.show(layer_error_figure(res))
            self._render_summary()
            self._render_samples()
            self._render_status()
            cfg = self.config()
            self.method_table.show(self._runs("methods"), cfg.bits, cfg.group_size, cfg.sym,
                                   shown=res.reports.values())
            self._sync_method_menu()

    def _render_status(self) -> None:
        running = self.job is not None and self.job.outcome == "running"
        self.status.value = status_html(self.results, self.config(), self.model, self.settings, running)
        self.compute_button.disabled = running
        self.compute_button.description = "Computing…" if running else "Compute"

    def _render_summary(self) -> None:
        self.summary.value = summary_html(self.results)

    def _render_samples(self) -> None:
        self.samples.value = samples_html(self.results, PROMPTS[int(self.controls["prompt"].value)])

    # -----------------------------------------------------------------------------------------------------
    # computing (background)

    @guarded
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

        def steps():
            done = 0.0
            for m in todo:
                def progress(f, text, m=m, done=done):
                    if job is self.job:
                        self.progress.set((done + weights[m] * f) / total,
                                          f"{METHOD_LABEL[m].split(' ')[0]}: {text}")

                lm = get_model(model, lambda f, text, progress=progress: progress(0.0, text))
                quantized = Path(self.cache_dir) / "quantized" if self.keep_quantized else None
                report = build_report(
                    lm, m, cfg, settings, name=model, rtn_calib=True, samples=True, cache_dir=quantized,
                    save_hessians=False, hessian_condition=False, progress=progress,
                    should_cancel=job.cancel.is_set, extra={"settings": dataclasses.asdict(settings)})
                job.check()
                unsaved = self.cache.put(model, m, cfg, settings, report)
                if unsaved:
                    job.notes.append(unsaved)
                done += weights[m]

        def finish():
            if job is self.job:
                self.progress.stop()
                self._finish(job, model, cfg)

        self._start_job(job, steps, finish, "ModelLab-compute")

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
