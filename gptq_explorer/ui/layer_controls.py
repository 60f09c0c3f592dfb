"""The Layer Lab's widgets, their layout and their callbacks.

The knobs' controls come from the settings model (controls.knob_control); the rest (model, block,
sublayer, the crop, the column, frames/s, a rotated run's basis) from the lab's VIEW_RULES. The method
knobs sit in a collapsed "Method" section; the method menu above it sets them by name
(layer_methods.METHODS) and follows them. Every callback is guarded: an error is shown in the page with the
fix to try, never raised into the kernel.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

import ipywidgets as widgets

from ..services.layer_source import SYNTHETIC, SYNTHETIC_BLOCKS, SYNTHETIC_SUBLAYERS
from ..settings import CUSTOM
from .common import InputError, ProgressBar, as_int, guarded, message_widget
from .controls import int_slider, knob_control, preset_dropdown
from .layer_figure import FIGURE_BASIS
from .layer_methods import COMBINED, GAR_GROUP, METHOD_KEYS, METHODS, method_of
from .layer_room import HEADER_CLASS, PANEL_CLASS, ROOM_CLASS, TEXT_CLASS

SOURCE_KEYS = ("model", "block", "sublayer", "corpus", "nsamples")
VIEW_KEYS = ("rows", "cols", "row0")

# The layout flows with the page's width (a projector's 1280 px, a notebook's ~1000 px): the controls column
# has a fixed width, its controls fill it, and the figure and the text beside it share what is left, the text
# going under the figure when there is no room (flex-wrap); min-width 0 lets a box shrink below its content.
PANEL_WIDTH = "300px"
_WIDTH = "100%"
_STYLE = {"description_width": "110px"}  # the longest descriptions ("damp_percent", "calib windows") fit
TEXT_BASIS = "300px"


def _button(width: str, **kwargs) -> widgets.Button:
    return widgets.Button(layout=widgets.Layout(width=width), **kwargs)


def _section(title: str, items: list) -> widgets.VBox:
    return widgets.VBox([widgets.HTML(f"<b>{title}</b>"), *items],
                        layout=widgets.Layout(margin="0 0 8px 0", width="100%"))


class LayerControls:
    """The controls side of LayerLab (a mixin): builds `controls`, `preset`, `buttons`, the message box,
    the progress bar and the layout (`root`), and reacts to them. Uses the lab's KNOBS, VIEW_RULES,
    `_model_options` and its actions (goto, step, next_boundary, highlight, apply_preset, the source and
    run changes)."""

    def _build_controls(self, values: dict) -> None:
        self.controls: dict[str, widgets.Widget] = {}
        self._build_source_controls()
        for name in self.KNOBS:
            if name not in self.controls:
                self.controls[name] = knob_control(name, layout=widgets.Layout(width=_WIDTH), style=_STYLE)
        self._build_view_controls()
        self._build_play(self.controls["col"])
        self.preset = preset_dropdown("420px")
        self.method = widgets.Dropdown(options=[COMBINED, *METHODS], value="GPTQ", description="method",
                                       layout=widgets.Layout(width=_WIDTH), style=_STYLE)
        self._build_compare()
        self._build_hessian()
        self.local_path = None
        if self.local_mode:
            self.local_path = widgets.Text(placeholder="/path/to/model folder (config.json + *.safetensors)",
                                           layout=widgets.Layout(width=_WIDTH))
            self.local_button = _button(_WIDTH, description="use local folder")
            self.local_button.on_click(self._on_local_folder)
        self._set_initial_values(values)
        self._observe_controls()
        self._build_buttons()
        self._build_messages()
        self._build_probe()

    def _build_source_controls(self) -> None:
        lay = widgets.Layout(width=_WIDTH)
        c = self.controls
        c["model"] = widgets.Dropdown(options=self._model_options, value=SYNTHETIC, description="model",
                                      layout=lay, style=_STYLE)
        c["block"] = widgets.Dropdown(options=list(range(SYNTHETIC_BLOCKS)), value=0, description="block",
                                      layout=lay, style=_STYLE)
        c["sublayer"] = widgets.Dropdown(options=list(SYNTHETIC_SUBLAYERS), value=SYNTHETIC_SUBLAYERS[0],
                                         description="sublayer", layout=lay, style=_STYLE)
        for name in ("corpus", "nsamples"):
            c[name] = knob_control(name, layout=lay, style=_STYLE)

    def _build_view_controls(self) -> None:
        lay = widgets.Layout(width=_WIDTH)
        rules, d = self.VIEW_RULES, self.DEFAULTS
        c = self.controls
        c["rows"] = int_slider(rules["rows"], d["rows"], "crop rows", continuous_update=False, layout=lay,
                               style=_STYLE)
        c["cols"] = int_slider(rules["cols"], d["cols"], "crop cols", continuous_update=False, layout=lay,
                               style=_STYLE)
        c["row0"] = int_slider((0, 576), d["row0"], "first row", continuous_update=False, layout=lay,
                               style=_STYLE)
        c["col"] = int_slider((0, 575), d["col"], "column", continuous_update=True,
                              layout=widgets.Layout(flex="1 1 300px", min_width="220px", max_width="480px"),
                              style={"description_width": "55px"})
        c["fps"] = int_slider(rules["fps"], d["fps"], "frames/s", layout=widgets.Layout(width="230px"),
                              style={"description_width": "60px"})
        # a rotated run: its views in the basis GPTQ works in, or multiplied back by R
        c["basis"] = widgets.ToggleButtons(options=rules["basis"], value=d["basis"], description="basis",
                                           style={"button_width": "70px", "description_width": "40px"},
                                           tooltips=["the basis GPTQ works in: W Rᵀ",
                                                     "back in the original basis: each view · R"])

    def _set_initial_values(self, values: dict) -> None:
        """The initial values (checked), without callbacks; model/block/sublayer follow the source."""
        with self._quietly():
            for key in ("corpus", "nsamples", *self.CONFIG_KEYS, "rows", "cols", "fps", "basis"):
                if values[key] != self.DEFAULTS[key]:
                    self._set_control(key, self.check_value(key, values[key]))
        self._initial_view = {k: self.check_value(k, values[k]) for k in ("col", "row0")}

    def _observe_controls(self) -> None:
        c = self.controls
        for key in SOURCE_KEYS:
            c[key].observe(functools.partial(self._on_source_change, key), names="value")
        for key in self.CONFIG_KEYS:
            c[key].observe(self._on_config_change, names="value")
        for key in VIEW_KEYS:
            c[key].observe(self._on_view_change, names="value")
        c["fps"].observe(self._on_fps, names="value")
        c["basis"].observe(self._on_basis, names="value")
        self.preset.observe(self._on_preset, names="value")
        self.method.observe(self._on_method, names="value")

    def _build_buttons(self) -> None:
        self.buttons = {
            "start": _button("40px", icon="step-backward", tooltip="first column"),
            "prev": _button("40px", icon="chevron-left", tooltip="step -1"),
            "next": _button("40px", icon="chevron-right", tooltip="step +1"),
            "group": _button("95px", description="next group", tooltip="jump to the next group boundary"),
            "block": _button("95px", description="next block", tooltip="jump to the next lazy-update block"),
        }
        self.buttons["start"].on_click(lambda _: self.goto(0))
        self.buttons["prev"].on_click(lambda _: self.step(-1))
        self.buttons["next"].on_click(lambda _: self.step(+1))
        self.buttons["group"].on_click(lambda _: self.next_boundary("group"))
        self.buttons["block"].on_click(lambda _: self.next_boundary("block"))
        self.copy_button = _button("110px", description="Copy link", icon="link")
        self.copy_button.on_click(self._on_copy_link)

    def _build_messages(self) -> None:
        self.link = widgets.HTML(value="")
        self.message = message_widget()
        self.progress = ProgressBar(self._on_cancel, width="260px")
        self.progress_box = self.progress.box
        self.explain = widgets.HTML(value="", layout=widgets.Layout(width="100%"))
        self.summary_html = widgets.HTML(value="", layout=widgets.Layout(width="100%"))

    def _build_layout(self) -> None:
        W = widgets
        c = self.controls
        self._model_name = W.HTML(value="", layout=W.Layout(width="100%"))  # the whole name: the menu cuts it
        c["model"].observe(self._show_model_name, names=["value", "options"])
        self._show_model_name()
        layer_items = [c["model"], self._model_name]
        if self.local_mode:
            layer_items += [self.local_path, self.local_button]
        layer_items += [c["block"], c["sublayer"], c["corpus"], c["nsamples"]]
        # the method knobs, collapsed: the method menu sets them, and the default view stays short
        self.method_section = W.Accordion(children=[W.VBox([c[k] for k in METHOD_KEYS])],
                                          selected_index=None, layout=W.Layout(width="100%"))
        self.method_section.set_title(0, "Method knobs")
        panel = W.VBox([
            _section("Layer", layer_items),
            _section("GPTQ config", [self.method, *(c[k] for k in self.CONFIG_KEYS if k not in METHOD_KEYS),
                                     self.method_section]),
            _section("Crop", [c[k] for k in VIEW_KEYS]),
        ], layout=W.Layout(flex=f"0 0 {PANEL_WIDTH}", width=PANEL_WIDTH, margin="0 12px 0 0"))
        panel.add_class(PANEL_CLASS)
        b = self.buttons
        anim = W.HBox([self.play, b["start"], b["prev"], b["next"], c["col"], b["group"], b["block"],
                       c["fps"], c["basis"]],
                      layout=W.Layout(flex_flow="row wrap", align_items="center"))
        self._build_room()
        header = W.HBox([W.HTML("<h3 style='margin:4px 12px 4px 0'>GPTQ Layer Lab</h3>"), self.preset,
                         self.copy_button, self.compare_button, self.hessian_button, self.room],
                        layout=W.Layout(flex_flow="row wrap", align_items="center"))
        header.add_class(HEADER_CLASS)
        text = W.VBox([self.explain, self.summary_html],
                      layout=W.Layout(flex=f"1 1 {TEXT_BASIS}", min_width="0", max_width="760px"))
        text.add_class(TEXT_CLASS)
        self._fig_box = W.HBox([self.fig, text],
                               layout=W.Layout(flex_flow="row wrap", align_items="flex-start", width="100%"))
        main = W.VBox([anim, self._fig_box], layout=W.Layout(flex=f"1 1 {FIGURE_BASIS}", min_width="0"))
        probe = [self.probe] if self.probe is not None else []
        self.root = W.VBox([*probe, header, self.link, self.message, self.progress_box, self.compare_box,
                            self.hessian_box, W.HBox([panel, main], layout=W.Layout(flex_flow="row wrap"))])
        self.root.add_class(ROOM_CLASS)
        self._sync_method()

    def _show_model_name(self, _change=None) -> None:
        ctrl = self.controls["model"]
        label = next((lab for lab, v in ctrl.options if v == ctrl.value), str(ctrl.value))
        self._model_name.value = (f"<div class='gptq-model-name' style='font-size:12px;color:#555;"
                                  f"line-height:1.3;margin:0 0 4px 4px'>{html.escape(label)}</div>")

    # -- setting controls --------------------------------------------------------------------------------

    def _set_control(self, key: str, value) -> None:
        ctrl = self.controls[key]
        if key in ("block", "sublayer") and value not in ctrl.options:
            ctrl.options = [*ctrl.options, value]
        ctrl.value = value

    def _set_source_controls(self, values: dict) -> None:
        c = self.controls
        with self._quietly():
            for k in ("model", "corpus", "nsamples"):
                if k in values and c[k].value != values[k]:
                    c[k].value = values[k]
            options = self._structure_options(values.get("model"))
            if options is not None:
                c["block"].options, c["sublayer"].options = options
            for k in ("block", "sublayer"):
                if k in values:
                    self._set_control(k, values[k])
            synthetic = c["model"].value == SYNTHETIC
            c["corpus"].disabled = c["nsamples"].disabled = synthetic

    # -- callbacks ---------------------------------------------------------------------------------------

    @guarded
    def _on_config_change(self, change) -> None:
        if self._quiet:
            return
        key = next(k for k in self.CONFIG_KEYS if self.controls[k] is change["owner"])
        note = self._resolve_conflicts(key)
        self._mark_custom()
        self._sync_method()
        self._recompute()
        if note:
            self._info(note)

    def _resolve_conflicts(self, changed: str | None) -> str:
        """A browser can tick what QuantConfig refuses together: GAR with desc_act (two orders), GAR with a
        per-row grid (nothing to order). The knob just changed wins; the other gives way, and the page says
        so (the note returned). Python's set() refuses them instead."""
        c, notes = self.controls, []
        with self._quietly():
            if c["group_aware"].value and c["desc_act"].value:
                other = "desc_act" if changed == "group_aware" else "group_aware"
                c[other].value = False
                notes.append(f"GAR and desc_act are two column orders: {other} is off now.")
            if c["group_aware"].value and c["group_size"].value == -1:
                if changed == "group_size":
                    c["group_aware"].value = False
                    notes.append("GAR orders groups and a per-row grid has none: GAR is off now.")
                else:
                    c["group_size"].value = GAR_GROUP
                    notes.append(f"GAR orders groups: the group size is {GAR_GROUP} now (it was per row).")
        return " ".join(notes)

    def _show_config(self, cfg) -> None:
        """The controls show `cfg` (what is on screen, after a load that failed)."""
        with self._quietly():
            for key in self.CONFIG_KEYS:
                self.controls[key].value = getattr(cfg, key)
        self._sync_method()

    def _sync_method(self) -> None:
        """The method menu names what the knobs show; bits says it is ignored by ternary, the seed that it
        needs a rotation; the basis toggle shows with a rotation only."""
        c = self.controls
        values = {k: c[k].value for k in METHOD_KEYS}
        with self._quietly():
            self.method.value = method_of(values)
        c["bits"].disabled = bool(values["ternary"])
        c["rotation_seed"].disabled = values["rotation"] is None
        c["basis"].layout.display = "none" if values["rotation"] is None else "flex"

    @guarded
    def _on_method(self, change) -> None:
        if self._quiet or change["new"] == COMBINED:
            return
        name = change["new"]
        self.apply_method(name)  # guarded: an error shows in the page
        self._sync_method()
        if self.method.value == name:
            self._info(f"<b>{html.escape(name)}</b>: {html.escape(METHODS[name][1])}")

    @guarded
    def _on_basis(self, change) -> None:
        if self._quiet:
            return
        self._render_full()

    @guarded
    def _on_view_change(self, change) -> None:
        if self._quiet:
            return
        self._render_frame(force=True)

    @guarded
    def _on_preset(self, change) -> None:
        if self._quiet or change["new"] == CUSTOM:
            return
        self.apply_preset(change["new"])

    @guarded
    def _on_hover(self, col) -> None:
        """The mouse is over column `col` (processing position) of a view, or left them (None)."""
        self.highlight(col)

    @guarded
    def _on_click(self, col) -> None:
        """A click on a column of any view jumps there."""
        self.goto(as_int(col))

    @guarded
    def _on_cancel(self, _button=None) -> None:
        if self._job is not None:
            self._job.cancel.set()
            self.progress.label.value = "cancelling…"

    @guarded
    def _on_local_folder(self, _button=None) -> None:
        if not self.local_mode or self.local_path is None:
            raise InputError("local folders are disabled in the public app")
        folder = Path(self.local_path.value.strip()).expanduser()
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise InputError(f"{folder} is not a model folder (it needs config.json and *.safetensors)")
        value = str(folder.resolve())
        opts = list(self.controls["model"].options)
        if value not in [v for _, v in opts]:
            self.controls["model"].options = [*opts, (f"local: {folder.name}", value)]
        self.controls["model"].value = value  # -> _on_source_change

    @guarded
    def _on_source_change(self, key, change) -> None:
        if self._quiet:
            return
        self._mark_custom()
        self._source_changed(changed=key)
