"""The Layer Lab in a room, without a browser: colours readable with red-green colour blindness and as text,
the room widget's wiring (keys N/B, Save picture's name, reduced motion). The browser side:
tests/test_ui_browser_room.py."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gptq_explorer.ui.layer_figure import ESM, TEXT_COLORS
from gptq_explorer.ui.layer_room import picture_name
from gptq_explorer.ui.model_charts import TEXT_COLORS as MODEL_TEXT_COLORS

# Machado, Oliveira & Fernandes (2009), severity 1.0, on linear RGB
DEUTERANOPIA = np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                         [-0.011820, 0.042940, 0.968881]])
PROTANOPIA = np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                       [-0.003882, -0.048116, 1.051998]])
DISTINCT = 20.0  # CIE76 ΔE: two lines or two ends of a scale clearly apart (2.3 is "just noticeable")


def _linear(hex_color: str) -> np.ndarray:
    c = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(linear: np.ndarray) -> np.ndarray:
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ np.clip(linear, 0, 1) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a: str, b: str, vision: np.ndarray | None = None) -> float:
    la, lb = _linear(a), _linear(b)
    if vision is not None:
        la, lb = vision @ la, vision @ lb
    return float(np.linalg.norm(_lab(la) - _lab(lb)))


def contrast(color: str, background: str = "#ffffff") -> float:
    lum = [float(np.dot([0.2126, 0.7152, 0.0722], _linear(c))) for c in (color, background)]
    return (max(lum) + 0.05) / (min(lum) + 0.05)


def _canvas_colours() -> dict:
    """layer_canvas.js's line colours and its diverging scales, read from the source the page runs."""
    colors = dict(re.findall(r"(\w+): \"(#[0-9a-f]{6})\"", re.search(r"const COLORS = \{(.*?)\};", ESM,
                                                                       re.S).group(1)))
    scales = {name: re.findall(r"#[0-9a-f]{6}", stops)
              for name, stops in re.findall(r"(RdBu|PiYG): \[([^\]]*)\]", ESM)}
    return {"colors": colors, "scales": scales}


@pytest.mark.parametrize("vision", [DEUTERANOPIA, PROTANOPIA], ids=["deuteranopia", "protanopia"])
def test_the_figure_reads_with_red_green_colour_blindness(vision):
    canvas = _canvas_colours()
    c = canvas["colors"]
    assert delta_e(c["upd"], c["rtn"], vision) > DISTINCT  # the GPTQ and RTN curves (RTN also dashed)
    assert delta_e(c["w"], c["q"], vision) > DISTINCT  # the column profile's w and q
    for name, stops in canvas["scales"].items():  # a diverging map's two ends
        assert len(stops) == 5 and delta_e(stops[0], stops[-1], vision) > DISTINCT, name


def test_coloured_text_is_readable():
    """The explanation's and the Model Lab's coloured words reach WCAG AA's 4.5:1 on white."""
    for colors in (TEXT_COLORS, MODEL_TEXT_COLORS):
        for name, color in colors.items():
            if name not in ("cursor", "hover"):
                assert contrast(color) >= 4.5, (name, color, contrast(color))


def test_picture_name():
    assert picture_name("synthetic 576x576 (seed 0)", "4-bit g128 sym") == \
        "gptq-synthetic-576x576-seed-0-4-bit-g128-sym"
    assert picture_name("smollm2-135m block 0 self_attn.q_proj", "3-bit g64 asym GPTAQ a=0.25") == \
        "gptq-smollm2-135m-block-0-self-attn-q-proj-3-bit-g64-asym-gptaq-a-0-25"


def test_room_keys_and_reduced_motion():
    from gptq_explorer.ui import LayerLab

    lab = LayerLab(threaded=False)
    assert lab.room.picture_name == "gptq-synthetic-576x576-seed-0-4-bit-g128-sym"
    lab._on_room_msg(lab.room, {"event": "key", "action": "group"}, [])  # the page's N
    assert lab.col == 128
    lab._on_room_msg(lab.room, {"event": "key", "action": "block"}, [])  # B
    assert lab.col == 256
    lab._on_room_msg(lab.room, {"event": "key", "action": "nonsense"}, [])
    assert lab.col == 256 and not lab.errors
    lab.presenter = True
    assert lab.room.presenter and lab.presenter
    lab.set(bits=3)
    assert lab.room.picture_name.endswith("3-bit-g128-sym")
    # under reduced motion a method's "animate" sets it up at column 0 without playing it
    lab.room.reduced_motion = True
    lab.animate_method("GPTQ + MSE grid")
    assert lab.col == 0 and not lab.play.playing and not lab.fig.playing
    assert "reduced motion" in lab.message.value
    lab.room.reduced_motion = False
    lab.animate_method("GPTQ")
    assert lab.play.playing
