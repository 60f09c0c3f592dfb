"""The Layer Lab's Hessian view: the current layer's H as GPTQ sees it (views.hessian_view has the numbers).

The **Hessian** toggle (the link key `hessian`, 0 or 1) opens a panel under the header: the eigenvalues of
H sorted (log scale) with the damping lambda as a line and the spectrum of H + lambda I, sorted diag(H)
(what desc_act orders by); beside it, as text in the element with the CSS class `gptq-hessian`: the
condition number before and after damping, what the engine did (the damping it reports it used, and
whether its Cholesky needed the x10 retry), the dead inputs and the diag(H) spread. With a rotation, H is
the engine's H' = R H R^T and the text says so.

The figure is a small SVG in an HTML widget, like the compare view's table: it changes only with the run,
needs no plotting library in the page, and a browser that connects later gets it with the widget's value.

It follows the run on screen: a new run (layer or knobs) recomputes it, marked stale until then. The costly
part, eigvalsh of the n x n H (cubic in n: too long to hold the kernel for the larger layers), runs in the
background when the lab is threaded, once per layer, stream and rotation (cached); the damping is a shift
of the eigenvalues, so a new damp_percent redraws at once.
"""

from __future__ import annotations

import html
import math
from collections import OrderedDict

import ipywidgets as widgets
import numpy as np

from ..services.threads import single_blas_thread
from ..views.hessian_view import hessian_spectrum, hessian_view
from .common import Job, guarded, run_job
from .layer_figure import COLORS

HESSIAN_CLASS = "gptq-hessian"  # the panel; its numbers are text inside it (a browser test reads them)
DONE_CLASS = "gptq-hessian-done"  # the status once the numbers are for the run on screen
STALE_CLASS = "gptq-hessian-stale"  # the status while they are for the previous run
PLOT_CLASS = "gptq-hessian-plot"
MAX_SPECTRA = 4  # cached spectra (n floats each, plus diag(H))
MAX_POINTS = 400  # points per line of the SVG (the lines are monotone: decimating keeps their shape)
SHOWN_INDICES = 12  # dead inputs listed by index

_PLOT_W, _PLOT_H = 500, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 10, 62, 38


def _g(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else f"{x:.3g}"


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}{'s' * (k != 1)}"


def _indices(idx: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:SHOWN_INDICES])
    return shown + (f", … ({idx.size - SHOWN_INDICES} more)" if idx.size > SHOWN_INDICES else "")


def spectrum_svg(view: dict) -> str:
    """The spectrum as an SVG: eigenvalues of H and of H + lambda I (descending), lambda as a dashed line,
    sorted diag(H), on a log scale (values below its floor, and those <= 0, are drawn on the floor)."""
    eig, damped, diag = view["eigenvalues"], view["eigenvalues_damped"], view["diag_sorted"]
    lam = view["lam_used"]
    n = eig.size
    values = np.concatenate([eig, damped, diag, [lam]])
    positive = values[values > 0]
    hi = float(positive.max()) if positive.size else 1.0
    lo = max(float(positive.min()) if positive.size else hi, hi * 1e-12)
    d0, d1 = math.floor(math.log10(lo)), max(math.ceil(math.log10(hi)), math.floor(math.log10(lo)) + 1)
    pw, ph = _PLOT_W - _LEFT - _RIGHT, _PLOT_H - _TOP - _BOTTOM

    def x(i):
        return _LEFT + pw * (np.asarray(i, dtype=np.float64) / max(n - 1, 1))

    def y(v):
        v = np.log10(np.maximum(np.asarray(v, dtype=np.float64), 10.0**d0))
        return _TOP + ph * (d1 - v) / (d1 - d0)

    idx = np.unique(np.r_[np.linspace(0, n - 1, min(n, MAX_POINTS)).astype(int), n - 1])

    def line(vals, color, dash="", width=1.6):
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x(idx), y(vals[idx]), strict=True))
        dashed = f" stroke-dasharray='{dash}'" if dash else ""
        return (f"<polyline points='{pts}' fill='none' stroke='{color}' stroke-width='{width}'{dashed}/>")

    step = max(1, math.ceil((d1 - d0) / 8))
    ticks = []
    for d in range(d0, d1 + 1, step):
        yy = float(y(10.0**d))
        ticks.append(f"<line x1='{_LEFT}' x2='{_LEFT + pw}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#eee'/>"
                     f"<text x='{_LEFT - 4}' y='{yy + 4:.1f}' text-anchor='end'>1e{d}</text>")
    h_name = "H'" if view["rotated"] else "H"
    legend = [(COLORS["w"], "", f"eigenvalues of {h_name}"),
              (COLORS["upd"], "", f"eigenvalues of {h_name} + λI"),
              (COLORS["err"], "6,4", f"λ = {_g(lam)}"), (COLORS["hinv"], "2,3", f"diag({h_name}), sorted")]
    keys = []
    for i, (color, dash, label) in enumerate(legend):
        lx, ly = _LEFT + (i % 2) * 220, 14 + (i // 2) * 18
        dashed = f" stroke-dasharray='{dash}'" if dash else ""
        keys.append(f"<line x1='{lx}' x2='{lx + 22}' y1='{ly}' y2='{ly}' stroke='{color}' stroke-width='2'"
                    f"{dashed}/><text x='{lx + 28}' y='{ly + 4}'>{html.escape(label)}</text>")
    ylam = float(y(lam))
    floor = f"; values below 1e{d0} (or ≤ 0) drawn at 1e{d0}" if np.any(values < 10.0**d0) else ""
    return (
        f"<svg class='{PLOT_CLASS}' width='{_PLOT_W}' height='{_PLOT_H}' viewBox='0 0 {_PLOT_W} {_PLOT_H}' "
        "xmlns='http://www.w3.org/2000/svg' style='font:11px sans-serif'>"
        + "".join(ticks) + "".join(keys)
        + f"<rect x='{_LEFT}' y='{_TOP}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"
        + line(diag, COLORS["hinv"], "2,3", 1.4) + line(eig, COLORS["w"]) + line(damped, COLORS["upd"])
        + f"<line x1='{_LEFT}' x2='{_LEFT + pw}' y1='{ylam:.1f}' y2='{ylam:.1f}' stroke='{COLORS['err']}' "
          "stroke-width='1.4' stroke-dasharray='6,4'/>"
        + f"<text x='{_LEFT}' y='{_PLOT_H - 20}'>1</text>"
        + f"<text x='{_LEFT + pw}' y='{_PLOT_H - 20}' text-anchor='end'>{n}</text>"
        + f"<text x='{_LEFT + pw / 2:.0f}' y='{_PLOT_H - 6}' text-anchor='middle'>rank (largest first)"
          f"{floor}</text></svg>")


def hessian_html(view: dict, *, layer: str, tokens: int, desc_act: bool, stream: str = "") -> str:
    """The view's numbers in words (what the `gptq-hessian` panel reads)."""
    n, h = view["n"], "H'" if view["rotated"] else "H"
    lam = f"λ = {view['damp_used']:.3g} × mean diag({h}) = {_g(view['lam_used'])}"
    cond = f"condition number {_g(view['cond'])} → {_g(view['cond_damped'])} after damping ({lam})"
    asked = view["damp_percent"]
    if view["failed"]:
        engine = (f"the engine's Cholesky of {h} + λI failed at every damp_percent from {asked:.3g} to 1 "
                  "(×10 each retry): it stops with an error")
    elif view["retries"]:
        tried = ", ".join(f"{asked * 10**i:.3g}" for i in range(view["retries"]))
        times = _count(view["retries"], "time")
        engine = (f"the engine's Cholesky of {h} + λI failed at damp_percent {tried} (not positive "
                  f"definite): it retried ×10 {times} and used {view['damp_used']:.3g} (condition number "
                  f"at the {asked:.3g} asked: {_g(view['cond_asked'])})")
    else:
        engine = f"the engine's Cholesky of {h} + λI worked at the damp_percent asked, {asked:.3g}"
    engine += "" if view["damp_reported"] else " (predicted here; the engine did not report it)"
    pd = ("works: it is positive definite" if view["cholesky_undamped"] else
          "fails: it is not positive definite" + (f" ({_count(view['n_nonpositive'], 'eigenvalue')} ≤ 0)"
                                                  if view["n_nonpositive"] else ""))
    dead = f"dead inputs: {view['n_dead']} of {n}"
    if view["n_dead"]:
        dead += (f" (diag({h}) == 0: {'rotated inputs' if view['rotated'] else 'inputs'} "
                 f"{_indices(view['dead'])}): the engine sets their diagonal to 1 and their weights to 0")
    if view["rotated"] and view["dead_original"].size:
        before = view["dead_original"]
        dead += (f"; before the rotation {before.size} (inputs {_indices(before)})"
                 + ("; the rotation mixes them into every input, so their zero eigenvalues stay and only "
                    "damping lifts them" if not view["n_dead"] else ""))
    spread = f"diag({h}) spread: max/median = {_g(view['diag_spread'])} over the live inputs"
    if view["rotated"]:
        spread += f" ({_g(view['diag_spread_original'])} before the rotation, which flattens it)"
    spread += f": what desc_act orders by (desc_act is {'on' if desc_act else 'off'})"
    basis = f"basis: {html.escape(view['basis'])}"
    if view["rotated"]:
        basis += "; its eigenvalues are those of H (R is orthogonal), its diagonal is not"
    zero = (f" ({_count(view['n_zero'], 'eigenvalue')} zero up to rounding: {h} is singular)"
            if view["n_zero"] else "")
    items = [
        f"<b>{cond}</b>",
        f"eigenvalues: largest {_g(view['lambda_max'])}, smallest {_g(view['lambda_min'])}{zero}; "
        f"{view['n_below_lambda']} of {n} below λ (there damping dominates, above it {h} does)",
        f"Cholesky of {h} without damping {pd}; {engine}",
        dead,
        spread,
        basis,
    ]
    where = f"{html.escape(layer)}: {h} is {n} × {n}, from {tokens} calibration tokens{stream}"
    if tokens < n:  # 2/n XᵀX is a sum of `tokens` rank-one terms
        where += f" (fewer than its {n} inputs: its rank is at most {tokens})"
    return (f"<div class='gptq-hessian-numbers' style='font-size:13px;line-height:1.45;max-width:560px'>"
            f"<div style='color:#555'>{where}</div><ul style='margin:4px 0;padding-left:18px'>"
            + "".join(f"<li>{item}</li>" for item in items) + "</ul></div>")


class LayerHessian:
    """The Hessian view of LayerLab (a mixin): `controls["hessian"]` (a toggle, also `hessian_button`) opens
    `hessian_box`; `hessian_numbers` is the view's dict (views.hessian_view) for the run on screen. Uses the
    lab's `run`, `data`, `pair`, `_source`, `controls`, `threaded`, `_lock`, `_quiet` and `show_error`;
    the lab calls `_hessian_changed()` after every new run and `_sync_hessian()` when the link key is set."""

    def _build_hessian(self) -> None:
        W = widgets
        self.hessian_numbers: dict | None = None
        self._hessian_job: Job | None = None
        self._hessian_key = None
        self._spectra: OrderedDict = OrderedDict()
        toggle = W.ToggleButton(value=False, description="Hessian", icon="line-chart",
                                layout=W.Layout(width="110px"),
                                tooltip="the layer Hessian: spectrum, damping, dead inputs, diag(H) spread")
        toggle.observe(self._on_hessian_toggle, names="value")
        self.controls["hessian"] = self.hessian_button = toggle
        self.hessian_status = W.HTML(value="")
        self.hessian_plot = W.HTML(value="")
        self.hessian_text = W.HTML(value="")
        close = W.Button(description="close", layout=W.Layout(width="70px"))
        close.on_click(lambda _b: self._close_hessian())
        self.hessian_box = W.VBox([W.HBox([W.HTML("<b>The layer Hessian, as GPTQ damps and factors it</b>"),
                                           close], layout=W.Layout(align_items="center")),
                                   self.hessian_status,
                                   W.HBox([self.hessian_plot, self.hessian_text],
                                          layout=W.Layout(flex_flow="row wrap"))],
                                  layout=W.Layout(display="none", border="1px solid #ccc", padding="4px 8px",
                                                  margin="4px 0"))
        self.hessian_box.add_class(HESSIAN_CLASS)

    def state(self) -> dict:
        """The state, the toggle's bool as the link's 0 / 1."""
        out = super().state()
        out["hessian"] = int(bool(out["hessian"]))
        return out

    @property
    def hessian_open(self) -> bool:
        return bool(self.controls["hessian"].value)

    @guarded
    def _on_hessian_toggle(self, change) -> None:
        if self._quiet:
            return
        self._sync_hessian()

    def _close_hessian(self) -> None:
        self.controls["hessian"].value = False  # -> _sync_hessian

    def _sync_hessian(self) -> None:
        """Show or hide the panel as the toggle says; an open one shows the run on screen."""
        if not self.hessian_open:
            self.hessian_box.layout.display = "none"
            if self._hessian_job is not None:  # its result is dropped: opening again recomputes
                self._hessian_job, self._hessian_key = None, None
            return
        self.hessian_box.layout.display = "flex"
        self._hessian_changed()

    def _hessian_snapshot(self) -> tuple:
        """(run, the data it ran on, whether that is GPTAQ's stream, its spectrum's key, the view's key)."""
        with self._lock:
            run, source = self.run, self._source
            gptaq = run.cfg.gptaq_alpha > 0
            data = self.pair if gptaq and self.pair is not None else self.data
        cfg = run.cfg
        rotation = (cfg.rotation, cfg.rotation_seed) if cfg.rotation else None
        spec_key = (source.key, gptaq, rotation)
        key = (spec_key, cfg, run.summary.get("damp_percent_used"))  # the text names the config
        return run, data, gptaq, spec_key, key

    def _hessian_changed(self) -> None:
        """After a new run: an open view recomputes (marked stale meanwhile); a closed one waits."""
        if not self.hessian_open:
            return
        run, data, gptaq, spec_key, key = self._hessian_snapshot()
        with self._lock:  # a job finishing meanwhile must not show an older run over this one
            if key == self._hessian_key or data.W.shape[1] != run.n:
                return
            self._hessian_key = key
            spec = self._spectra.get(spec_key)
            if spec is not None:  # the same H: another damping is a shift of the eigenvalues
                self._hessian_job = None  # a job still computing an older run's spectrum shows nothing
                self._show_hessian(run, data, gptaq, spec)
                return
            stale = ("These numbers are for the previous settings or layer: recomputing…"
                     if self.hessian_numbers else "Computing the spectrum…")
            self.hessian_status.value = (f"<span class='{STALE_CLASS}' style='color:#8a6d3b'>{stale} "
                                         f"(eigenvalues of the {run.n} × {run.n} H)</span>")
            job = Job("the Hessian's spectrum")
            self._hessian_job = job

        def work():
            try:
                with single_blas_thread():
                    spec = hessian_spectrum(data.H, run.cfg)
                with self._lock:
                    if job is self._hessian_job:
                        self._spectra[spec_key] = spec
                        while len(self._spectra) > MAX_SPECTRA:
                            self._spectra.popitem(last=False)
                        self._show_hessian(run, data, gptaq, spec)
            except Exception as exc:  # noqa: BLE001 - shown in the page, never raised into the kernel
                if job is self._hessian_job:
                    self.hessian_status.value = ""
                    self._hessian_key = None
                    self.show_error(exc, where="hessian")
            finally:
                if job is self._hessian_job:
                    self._hessian_job = None

        run_job(job, work, self.threaded, "LayerLab-hessian")

    def _show_hessian(self, run, data, gptaq: bool, spec: dict) -> None:
        view = hessian_view(data.H, run.cfg, damp_used=run.summary.get("damp_percent_used"), spectrum=spec)
        stream = " (the quantized model's inputs, which GPTAQ's run uses)" if gptaq else ""
        self.hessian_numbers = view
        self.hessian_plot.value = spectrum_svg(view)
        self.hessian_text.value = hessian_html(view, layer=data.name, tokens=int(data.X_calib.shape[0]),
                                               desc_act=run.cfg.desc_act, stream=stream)
        self.hessian_status.value = (f"<span class='{DONE_CLASS}' style='color:#555'>"
                                     f"{html.escape(data.name)}, {html.escape(run.cfg.label())}, "
                                     f"damp_percent {run.cfg.damp_percent:.3g}</span>")
