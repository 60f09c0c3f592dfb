"""The explorer app that Voila serves (notebooks/explorer.ipynb): one call builds it.

Four tabs: the Layer Lab (built at once: it is the first view), the Model Lab, the Sweeps and the Questions
(each built the first time its tab is shown, so Voila's cold start pays only for the Layer Lab).

Settings come from the environment so that a workshop server can set them per kernel (voila.json):
GPTQ_EXPLORER_THREADS (torch threads; 1 is often faster on a busy 2-core machine) and
GPTQ_EXPLORER_LOCAL=1 (allow local model folders: never on a public server). The page's query string
carries the whole state, so a copied link reopens the same view: `tab=layer|model|sweeps|questions`, the Layer
Lab's keys as they are (bits=3&group_size=64...), the Model Lab's with the prefix `ml.` (ml.bits=3) and the
Sweeps' with `sw.` (sw.facet=desc_act). Unknown keys and bad values are listed in the page, not applied.
"""

from __future__ import annotations

import functools
import html
import os
import threading
from urllib.parse import parse_qsl, urlencode

import ipywidgets as widgets

from ..services.layer_source import ModelSource
from ..services.threads import configure_threads
from ..settings import CUSTOM
from .common import InputError, Shown, link_html, query_of
from .layer_lab import LayerLab
from .preheat import in_voila, page_query, preload_default_layer, preload_enabled

TABS = ("layer", "model", "sweeps", "questions")
TAB_TITLES = ("Layer Lab", "Model Lab", "Sweeps", "Questions")
PREFIX = {"model": "ml.", "sweeps": "sw."}

DEFER_LOAD_S = 10.0  # a page that has not drawn its figure after this long gets its model load anyway


def local_mode_from_env() -> bool:
    return os.environ.get("GPTQ_EXPLORER_LOCAL", "0").strip().lower() in ("1", "true", "yes")


def split_query(query: str) -> tuple[str, dict, dict, dict, list[str]]:
    """(the Layer Lab's query, {app keys}, {Model Lab keys}, {Sweeps keys}, problems)."""
    query = query[1:] if query.startswith("?") else query
    layer, app, ml, sw, problems = [], {}, {}, {}, []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "tab":
            if value in TABS:
                app["tab"] = value
            else:
                problems.append(f"tab={value!r} ignored: tab must be one of {list(TABS)}")
        elif key.startswith(PREFIX["model"]):
            ml[key[len(PREFIX["model"]):]] = value
        elif key.startswith(PREFIX["sweeps"]):
            sw[key[len(PREFIX["sweeps"]):]] = value
        else:
            layer.append((key, value))
    return urlencode(layer), app, ml, sw, problems


class ExplorerApp(Shown):
    """The tabs (see the module doc). app.layer_lab is built at once; app.model_lab, app.sweeps and
    app.questions on first use (showing their tab, or reading the attribute). app.state() /
    app.state_query() cover the three labs and the tab shown."""

    def __init__(self, query: str = "", *, local_mode: bool = False, source=None, models=None,
                 model_lab_kwargs: dict | None = None, sweeps_kwargs: dict | None = None,
                 defer_load_s: float | None = None):
        layer_query, app, self._ml_query, self._sw_query, self.problems = split_query(query or "")
        self.local_mode = local_mode
        self._models = models
        self._ml_kwargs = dict(model_lab_kwargs or {})
        self._sw_kwargs = dict(sweeps_kwargs or {})
        kw = {"local_mode": local_mode, "defer_load_s": defer_load_s}
        if models is not None:
            kw["models"] = models
        source = source if source is not None else ModelSource()
        if layer_query:
            self.layer_lab = LayerLab.from_query(layer_query, source=source, **kw)
        else:
            self.layer_lab = LayerLab(source, **kw)
        self._model_lab = None
        self._sweeps = None
        self._questions = None
        self._syncing = False
        self._slots = [widgets.Box(), widgets.VBox([widgets.HTML("<i>Opening the Model Lab…</i>")]),
                       widgets.VBox([widgets.HTML("<i>Opening the Sweeps…</i>")]),
                       widgets.VBox([widgets.HTML("<i>Opening the Questions…</i>")])]
        self._slots[0] = self.layer_lab.root
        self.tabs = widgets.Tab(children=list(self._slots))
        self.tabs.titles = TAB_TITLES
        self.tabs.observe(self._on_tab, names="selected_index")
        self._rebind_copy(self.layer_lab)
        self.layer_lab.preset.observe(functools.partial(self._on_preset, "model"), names="value")
        if self.problems:
            self.layer_lab._info("Some settings in the link were not used: "
                                 + "; ".join(html.escape(p) for p in self.problems))
        tab = app.get("tab", "layer")
        if tab != "layer":
            self.tabs.selected_index = TABS.index(tab)  # -> _on_tab builds it
        self.root = widgets.VBox([self.tabs])

    # -----------------------------------------------------------------------------------------------------

    @property
    def model_lab(self):
        if self._model_lab is None:
            from .model_lab import ModelLab

            kwargs = dict(self._ml_kwargs)
            if self._models is not None:
                kwargs.setdefault("models", self._models)
            lab = ModelLab(**kwargs)
            self._model_lab = lab
            self._apply_query(lab, self._ml_query, "Model Lab")
            if not self._ml_query and self.layer_lab.preset.value != CUSTOM:
                lab.apply_preset(self.layer_lab.preset.value)
            self._rebind_copy(lab)
            lab.preset.observe(functools.partial(self._on_preset, "layer"), names="value")
            self._slots[1].children = [lab.widget]
        return self._model_lab

    @property
    def sweeps(self):
        if self._sweeps is None:
            from .sweeps import Sweeps

            kwargs = {"autorun": False, **self._sw_kwargs}
            sw = Sweeps(self.layer_lab, model_lab=self._model_lab, **kwargs)
            self._sweeps = sw
            self._apply_query(sw, self._sw_query, "Sweeps")
            self._slots[2].children = [sw.widget]
        return self._sweeps

    @property
    def questions(self):
        if self._questions is None:
            from .questions_tab import QuestionsTab

            self._questions = QuestionsTab()
            self._slots[3].children = [self._questions.widget]
        return self._questions

    def _apply_query(self, view, values: dict, name: str) -> None:
        problems = []
        for key, value in values.items():
            try:
                view.set(**{key: value})
            except InputError as exc:
                problems.append(f"{key}={value!r} ignored: {exc}")
        if problems:
            view._info(f"Some {name} settings in the link were not used: "
                       + "; ".join(html.escape(p) for p in problems))

    def _on_tab(self, change) -> None:
        try:
            index = change["new"]
            if index == 1:
                self.model_lab  # noqa: B018 - builds it
            elif index == 2:
                if self._sweeps is None:
                    self.sweeps.run()  # first view: sweep the current layer (background, cancellable)
                else:
                    self._sweeps.model_lab = self._model_lab
                    self._sweeps._show_cached()
                    self._sweeps.refresh_perplexity()
            elif index == 3:
                self.questions  # noqa: B018 - builds it
        except Exception as exc:  # noqa: BLE001 - a callback: show it, keep the kernel alive
            self.layer_lab.show_error(exc, where=f"opening the {TAB_TITLES[change['new']]} tab")

    # -----------------------------------------------------------------------------------------------------
    # presets: choosing one in one lab applies it to the other

    def _on_preset(self, to: str, change) -> None:
        """A preset chosen in one lab: apply it to the other ("layer" or "model"; one not built yet takes
        it when it is built)."""
        target = self.layer_lab if to == "layer" else self._model_lab
        if self._syncing or change["new"] == CUSTOM or target is None:
            return
        self._syncing = True
        try:
            target.apply_preset(change["new"])
        finally:
            self._syncing = False

    # -----------------------------------------------------------------------------------------------------
    # state

    def state(self) -> dict:
        out = {"tab": TABS[self.tabs.selected_index or 0], **self.layer_lab.state()}
        if self._model_lab is not None:
            out.update({PREFIX["model"] + k: v for k, v in self._model_lab.state().items()})
        else:
            out.update({PREFIX["model"] + k: v for k, v in self._ml_query.items()})
        if self._sweeps is not None:
            out.update({PREFIX["sweeps"] + "facet": self._sweeps.facet.value,
                        PREFIX["sweeps"] + "corpus": self._sweeps.corpus.value})
        return out

    def state_query(self) -> str:
        return query_of(self.state())

    def _rebind_copy(self, lab) -> None:
        """A lab's 'Copy link' button gives the whole app's state."""
        lab.copy_button.on_click(lab._on_copy_link, remove=True)

        def copy(_button=None, lab=lab):
            lab.link.value = link_html(self.state_query())

        lab.copy_button.on_click(copy)


def explorer_app(query: str | None = None, *, local_mode: bool | None = None, source=None,
                 **kwargs) -> ExplorerApp:
    """The explorer: Layer Lab (on the offline default model; a synthetic layer shows while it loads),
    Model Lab, Sweeps and Questions tabs. `query` defaults to the Voila page's query string.

    Served by Voila, the kernel is preheated: it waits here for its visitor. When none comes within
    PRELOAD_AFTER_S, it loads the default model's first layer meanwhile (when the machine is quiet, see
    preload_default_layer), so a later visitor sees it at once: where preload_enabled() says so.
    A visitor who is there sooner gets the synthetic layer first, and the model loads once the page has
    drawn it (DEFER_LOAD_S at the latest), not while the browser is still opening the page."""
    configure_threads()
    local = local_mode_from_env() if local_mode is None else local_mode
    if query is None:
        visitor_here = threading.Event()
        preload = preload_enabled()
        query = page_query(while_waiting=(lambda: preload_default_layer(visitor_here)) if preload else None)
        visitor_here.set()  # a preload still running now goes on at full speed: this visitor needs it
        if in_voila():
            kwargs.setdefault("defer_load_s", DEFER_LOAD_S)
    return ExplorerApp(query, local_mode=local, source=source, **kwargs)
