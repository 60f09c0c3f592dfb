"""The dashboards' controls from the settings model, and the checks of what the controls allow.

A knob (gptq_explorer.settings) becomes one widget through `knob_control`: a dropdown of what the knob
offers, an integer slider over its range (a number box when the range has no upper end), a logarithmic
slider (base 10) for a `log` knob, a checkbox for a bool; its value is the knob's default and its
description the knob's label. The widget enforces the
allowed values for a browser; `check_knob` does the same for Python callers and links (Knob.offer),
raising InputError with the knob's message.

What the dashboards show besides the knobs (the column, the crop, the frames per second, the synthetic
block, the Model Lab's prompt and results view) is not a setting of the product: `check_view` checks those
against a small table of allowed values each dashboard declares once (`VIEW_RULES`).

`Lab` is what the two labs share on top of common.Dashboard: KNOBS (the knobs it shows; controls[name] is
the control of knob `name`), its state and links, `set` (everything checked first), the presets and the
QuantConfig of its controls.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qsl

import ipywidgets as widgets
import traitlets

from .. import settings
from ..engine import QuantConfig
from ..settings import CUSTOM, PRESETS, QUANT_KEYS, Knob
from .common import Dashboard, InputError, as_int, guarded, link_html, query_of

LOG_STEP = 0.25  # a log slider moves in quarter decades
LOG_READOUT = ".3g"
INT_MAX = 2**31 - 1  # the upper end of a number box for an integer knob with no upper bound


class OptionDropdown(widgets.Dropdown):
    """A dropdown where None is a value like any other (the rotation knob's "none"). ipywidgets' own reads
    value None as "nothing selected" and shows an empty box, even when None is one of its options."""

    @traitlets.validate("value")
    def _validate_value(self, proposal):
        if proposal.value is None and None in self._options_values:
            return None
        return super()._validate_value(proposal)

    @traitlets.observe("value")
    def _propagate_value(self, change):
        if change.new is None and None in self._options_values:
            if self.index is None or self._options_values[self.index] is not None:
                self.index = self._options_values.index(None)
            return
        super()._propagate_value(change)


def knob_control(knob: Knob | str, *, layout: widgets.Layout | None = None,
                 style: dict | None = None) -> widgets.Widget:
    """The control of a knob (a Knob or its name), showing its default. `layout` and `style` go to the
    dropdowns and sliders; a checkbox keeps its natural width."""
    knob = settings.knob(knob) if isinstance(knob, str) else knob
    if knob.type is bool:
        return widgets.Checkbox(value=knob.default, description=knob.control_label, indent=False)
    sized = {"description": knob.control_label, "layout": layout or widgets.Layout(), "style": style or {}}
    if knob.offered is not None:
        return OptionDropdown(options=knob.offered_values(), value=knob.default, **sized)
    low, high = knob.slider_range()
    if knob.log:
        return widgets.FloatLogSlider(value=knob.default, base=10, min=math.log10(low), max=math.log10(high),
                                      step=LOG_STEP, readout_format=LOG_READOUT, continuous_update=False,
                                      **sized)
    if knob.type is int and high is None:  # no slider over an unbounded range
        return widgets.BoundedIntText(min=int(low), max=INT_MAX, value=knob.default, **sized)
    if knob.type is int:
        return widgets.IntSlider(min=int(low), max=int(high), value=knob.default, continuous_update=False,
                                 **sized)
    raise TypeError(f"no control for knob {knob.name!r} ({knob.type.__name__} without offered values)")


def check_knob(name: str, value: Any) -> Any:
    """The value a knob's control would take (parsed, checked, within what it offers), or InputError with
    the knob's message ("bits must be between 2 and 8 ..., got 9")."""
    try:
        return settings.knob(name).offer(value)
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(str(exc)) from None


def check_view(name: str, value: Any, rule: Any) -> Any:
    """A view-only value against its rule: (low, high) for an integer (high None: no upper bound), a list
    of the allowed values, or None (checked by the dashboard itself, e.g. a model against its list)."""
    if rule is None:
        return value
    if isinstance(rule, list):
        if value not in rule:
            raise InputError(f"{name} must be one of {rule}, got {value!r}")
        return value
    low, high = rule
    v = as_int(value)
    if high is None and v < low:
        raise InputError(f"{name} must be >= {low}, got {v}")
    if high is not None and not low <= v <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {v}")
    return v


def int_slider(rule: tuple[int, int], value: int, description: str, **kwargs) -> widgets.IntSlider:
    """A slider over a view rule's range (the table declares the range once)."""
    return widgets.IntSlider(min=rule[0], max=rule[1], value=value, description=description, **kwargs)


def preset_dropdown(width: str) -> widgets.Dropdown:
    """The preset menu: CUSTOM (what the controls show was set by hand), then settings.PRESETS."""
    return widgets.Dropdown(options=[CUSTOM, *PRESETS], value=CUSTOM, description="preset",
                            layout=widgets.Layout(width=width, max_width="100%"),  # shrinks on a narrow page
                            style={"description_width": "50px"})


class Lab(Dashboard):
    """A dashboard with knobs (the Layer Lab, the Model Lab). A subclass declares KNOBS (the knobs it
    shows, built with knob_control), VIEW_RULES (the rest of its state, see check_view) and DEFAULTS (its
    whole state at start, in link order), sets `controls` (name -> widget, every key of DEFAULTS),
    `preset` (preset_dropdown) and `link`, and defines `_apply(clean)` (show checked values)."""

    KNOBS: tuple[str, ...] = ()
    VIEW_RULES: dict[str, Any] = {}
    DEFAULTS: dict[str, Any] = {}
    controls: dict[str, widgets.Widget]
    preset: widgets.Dropdown
    link: widgets.HTML

    # -- values ------------------------------------------------------------------------------------------

    @classmethod
    def check_value(cls, key: str, value: Any) -> Any:
        """A value of the state as its control would take it, or InputError saying what is allowed."""
        if key in cls.KNOBS:
            return check_knob(key, value)
        if key in cls.VIEW_RULES:
            return check_view(key, value, cls.VIEW_RULES[key])
        raise InputError(f"unknown setting {key!r}; allowed: {list(cls.DEFAULTS)}")

    @classmethod
    def parse_query(cls, query: str, **context) -> tuple[dict, list[str]]:
        """(values, problems) from a query string: unknown keys and bad values are listed, not applied."""
        query = query[1:] if query.startswith("?") else query
        values, problems = {}, []
        for key, raw in parse_qsl(query, keep_blank_values=True):
            if key not in cls.DEFAULTS:
                problems.append(f"unknown setting '{key}' ignored")
                continue
            try:
                values[key] = cls._parse_value(key, raw, **context)
            except InputError as exc:
                problems.append(f"{key}={raw!r} ignored: {exc}")
        return values, problems

    @classmethod
    def _parse_value(cls, key: str, raw: str, **context) -> Any:
        return cls.check_value(key, raw)

    def _validate(self, key: str, value: Any, values: dict) -> Any:
        """The value a control would take (`values`: everything being set with it)."""
        if key == "model":
            allowed = [v for _, v in self.controls["model"].options]
            if value not in allowed:
                raise InputError(f"model must be one of {allowed}, got {value!r}")
            return value
        return self.check_value(key, value)

    def _validate_all(self, values: dict) -> dict:
        unknown = sorted(set(values) - set(self.DEFAULTS))
        if unknown:
            raise InputError(f"unknown setting(s) {unknown}; allowed: {list(self.DEFAULTS)}")
        return {k: self._validate(k, values[k], values) for k in self.DEFAULTS if k in values}

    def set(self, **values) -> None:
        """Change several controls at once. Every value is checked first: anything outside what the
        controls allow raises InputError (also shown in the page) and nothing changes."""
        try:
            clean = self._validate_all(values)
        except InputError as exc:
            self.show_error(exc, where="set")
            raise
        self._apply(clean)

    def _apply(self, clean: dict) -> None:
        raise NotImplementedError

    def _set_control(self, key: str, value: Any) -> None:
        self.controls[key].value = value

    # -- state -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """Every control's value (what a link restores)."""
        return {k: self.controls[k].value for k in self.DEFAULTS}

    def state_query(self, prefix: str = "") -> str:
        """The state as a URL query string (no leading '?'), each key prefixed, e.g. for a Voila link."""
        return query_of({prefix + k: v for k, v in self.state().items()})

    def config(self) -> QuantConfig:
        """The config the controls show (the quantization knobs this lab has; the others at their
        defaults)."""
        return QuantConfig.from_dict({k: self.controls[k].value for k in QUANT_KEYS if k in self.controls})

    @guarded
    def _on_copy_link(self, _button=None) -> None:
        self.link.value = link_html(self.state_query())

    # -- presets -----------------------------------------------------------------------------------------

    def _preset(self, name: str) -> tuple[dict, str]:
        """(the preset's values of this lab's knobs, its blurb); InputError for an unknown name."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; presets: {list(PRESETS)}")
        values, blurb = PRESETS[name]
        return {k: v for k, v in values.items() if k in self.KNOBS}, blurb

    def _mark_custom(self) -> None:
        if self.preset.value != CUSTOM:
            with self._quietly():
                self.preset.value = CUSTOM
