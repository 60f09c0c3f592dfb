"""The Layer Lab in a room (a projector, a keyboard, a screen reader): keys, presenter mode, Save picture.

LabRoom is a small anywidget (its ESM: layer_room.js) shown in the lab's header with three buttons
(Controls, Presenter (P), Save picture). Its `playing`, `cursor` and `last` are jslinked to the Play
control's `playing`, `value` and `max`, so the keys move the animation in the page, as the Play buttons do:

    Space  play / pause         ← / →  step one column (pauses)     Home / End  first / last column
    N      next group           B      next lazy-update block       P           presenter mode

N and B ask the kernel (the run knows its boundaries). Keys act on the lab that has the focus (or the first
one shown when nothing has it), never while typing in a text box. Presenter mode hides the controls,
enlarges the type and sizes the figure to the screen's height; Save picture downloads the canvas as a PNG
named after the layer, the config and the column. Under prefers-reduced-motion the animation starts paused
and a method's "animate" (the compare view) sets the method up without playing it.

The same ESM names the page's unnamed controls once per page: ipywidgets' slider handles get their
description as aria-label, the Play control's icon buttons their action.
"""

from __future__ import annotations

import re
from pathlib import Path

import anywidget
import ipywidgets as widgets
import traitlets

ROOM_CLASS = "gptq-layer-lab"  # on the lab's root: the room's JavaScript finds the lab (and its figure) by it
PANEL_CLASS = "gptq-lab-panel"  # the controls column, hidden in presenter mode
TEXT_CLASS = "gptq-lab-text"  # the explanation and the summary, larger in presenter mode
HEADER_CLASS = "gptq-lab-header"  # presenter mode keeps only the room's buttons of it
ESM = (Path(__file__).with_name("layer_room.js")).read_text(encoding="utf-8")
KEYS = {"Space": "play / pause", "← / →": "step one column", "Home / End": "first / last column",
        "N": "next group", "B": "next lazy-update block", "P": "presenter mode"}


class LabRoom(anywidget.AnyWidget):
    """The room's widget (see the module doc)."""

    _esm = traitlets.Unicode(ESM).tag(sync=True)
    playing = traitlets.Bool(False).tag(sync=True)
    cursor = traitlets.Int(0).tag(sync=True)
    last = traitlets.Int(0).tag(sync=True)
    presenter = traitlets.Bool(False).tag(sync=True)
    controls_hidden = traitlets.Bool(False).tag(sync=True)
    reduced_motion = traitlets.Bool(False).tag(sync=True)
    picture_name = traitlets.Unicode("gptq-layer").tag(sync=True)


def picture_name(layer: str, config_label: str) -> str:
    """The saved picture's name without the column: 'gptq-<layer>-<config>' in lowercase letters, digits
    and dashes (the page appends '-col<k>.png')."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"gptq {layer} {config_label}".lower()).strip("-")
    return slug[:120].rstrip("-")


class LayerRoom:
    """The room side of LayerLab (a mixin): `room` (LabRoom), linked to `play`; uses `next_boundary` and
    `show_error` (through guarded callbacks)."""

    def _build_room(self) -> None:
        self.room = LabRoom()
        play = self.play
        self._room_links = tuple(widgets.jslink((play, name), (self.room, trait))
                                 for name, trait in (("playing", "playing"), ("value", "cursor"),
                                                     ("max", "last")))
        self.room.on_msg(self._on_room_msg)

    def _on_room_msg(self, _widget, content, _buffers) -> None:
        if isinstance(content, dict) and content.get("event") == "key":
            action = content.get("action")
            if action in ("group", "block"):
                self.next_boundary(action)  # guarded: an error shows in the page

    def _room_picture(self, run) -> None:
        self.room.picture_name = picture_name(run.name, run.cfg.label())

    @property
    def presenter(self) -> bool:
        """Presenter mode (the P key or the Presenter button in the page)."""
        return bool(self.room.presenter)

    @presenter.setter
    def presenter(self, on: bool) -> None:
        self.room.presenter = bool(on)
