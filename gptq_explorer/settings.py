"""Every user-facing knob, declared once.

A `Knob` holds what the whole product needs to know about one setting: its name (also the field of
QuantConfig, the key in a report and in a dashboard link), its type, the values the engine accepts, the
default, a one-line help, the command-line flag, and what the dashboards offer (a dropdown's values or a
slider's range, a subset of what the engine accepts). QuantConfig's validation, the CLI's arguments, the
dashboards' controls, link parsing and the presets all derive from KNOBS; adding a knob is one
declaration here plus the code that uses it.

This module imports nothing of the package (the engine builds on it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Knob:
    """One setting. Allowed values: `choices` if given, else the closed range [low, high] (open at an end
    where `open_low` / `open_high`), plus the values in `also`. Dashboards offer `offered` (a dropdown)
    or the range `offered_range` (a slider; logarithmic when `log`) and clamp link values to it."""

    name: str  # also its QuantConfig field, its key in a dashboard link and in a report
    type: type
    default: Any
    help: str
    group: str  # "quant" (a QuantConfig field), "model", "calibration" or "evaluation"
    flag: str  # the command-line flag; for a bool that defaults to True, the flag that keeps it on
    label: str = ""  # what a dashboard control shows (default: the name)
    off_flag: str | None = None  # the flag that turns a bool off (--asym)
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    also: tuple = ()  # allowed besides the range (group_size -1: one group per row)
    choices: tuple | None = None
    rule: str = ""  # the allowed values in words, for the error message (default: built from the range)
    offered: tuple | None = None
    offered_range: tuple | None = None
    log: bool = False
    option_labels: tuple = ()  # (value, label) pairs a dropdown shows instead of the bare value
    follows: str | None = None  # default None means "the value of this other knob" (eval_seqlen -> seqlen)
    beyond_paper: bool = False  # a method after the 2022 paper (docs/methods.md): off by default

    @property
    def control_label(self) -> str:
        return self.label or self.name

    # -- the engine's rule ---------------------------------------------------------------------------------

    def _rule(self) -> str:
        if self.rule:
            return self.rule
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.low is not None and self.high is not None:
            return f"between {_num(self.low)} and {_num(self.high)}"
        if self.low is not None:
            return f"at least {_num(self.low)}"
        return "valid"

    def check(self, value: Any) -> Any:
        """`value` if the engine accepts it, else ValueError naming the knob, the allowed values and what
        was given. No conversion: 4.0 is not an integer and "yes" is not a bool here (see `parse`)."""
        if value is None and (self.follows or None in self.also):
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be True or False, got {value!r}")
            return value
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{self.name} must be an integer, got {value!r} ({type(value).__name__})")
        if self.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{self.name} must be a number, {self._rule()}, got {value!r}")
        if self.type is str and not isinstance(value, str):
            raise ValueError(f"{self.name} must be a string, got {value!r}")
        if value in self.also:
            return value
        if self.choices is not None:
            ok = value in self.choices
        else:
            ok = not (isinstance(value, float) and math.isnan(value))
            if ok and self.low is not None:
                ok = value > self.low if self.open_low else value >= self.low
            if ok and self.high is not None:
                ok = value < self.high if self.open_high else value <= self.high
        if not ok:
            raise ValueError(f"{self.name} must be {self._rule()}, got {_num(value)}")
        return value

    def parse(self, raw: Any) -> Any:
        """A value from text (a link, a CLI override, a form): converted to the knob's type and checked.
        Non-text values are converted the same way (1.0 -> 1 for an int knob, but not 1.5)."""
        text = raw.strip() if isinstance(raw, str) else raw
        try:
            if self.type is bool:
                if isinstance(text, bool):
                    value = text
                elif isinstance(text, str) and text.lower() in _TRUE + _FALSE:
                    value = text.lower() in _TRUE
                else:
                    raise ValueError
            elif self.type is int:
                if isinstance(text, bool):
                    raise ValueError
                f = float(text)
                if not math.isfinite(f) or f != int(f):
                    raise ValueError
                value = int(f)
            elif self.type is float:
                if isinstance(text, bool):
                    raise ValueError
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError
            elif None in self.also and (text is None or str(text).lower() in ("", "none")):
                value = None
            else:
                value = str(text)
        except (TypeError, ValueError):
            kind = {bool: "true/false", int: "an integer", float: "a finite number"}.get(self.type, "text")
            raise ValueError(f"{self.name}={raw!r} must be {kind}") from None
        return self.check(value)

    # -- what the dashboards offer -------------------------------------------------------------------------

    def offer(self, raw: Any) -> Any:
        """A dashboard's (or a link's) value: parsed, checked, and within what the controls offer; a slider
        value just outside its range (rounding in a link) is clamped. ValueError says what is offered."""
        value = self.parse(raw)
        if self.offered is not None and value not in self.offered:
            raise ValueError(f"{self.name} must be one of {list(self.offered)}, got {value!r}")
        if self.offered_range is not None:
            lo, hi = self.offered_range
            if not lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9):
                raise ValueError(f"{self.name} must be between {_num(lo)} and {_num(hi, 3)}, "
                                 f"got {_num(value)}")
            value = self.type(min(max(value, lo), hi))
        return value

    def offered_values(self) -> list:
        """What a dropdown offers, as (label, value) pairs."""
        labels = dict(self.option_labels)
        return [(labels.get(v, str(v)), v) for v in (self.offered or ())]

    def slider_range(self) -> tuple:
        """(low, high) of a slider: the offered range, else the allowed range."""
        return self.offered_range or (self.low, self.high)


def _num(x: Any, digits: int = 6) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


DAMP_RANGE = (10**-3.0, 10**-0.5)  # what the dashboards' damping slider offers: 0.1% .. 31.6% of mean diag H

_KNOBS = (
    # -- quantization: the fields of QuantConfig, in order --------------------------------------------------
    Knob("bits", int, 4, "bits per weight; codes are integers in [0, 2**bits - 1]", "quant", "--bits",
         low=2, high=8, rule="between 2 and 8 (2, 3, 4, 5, 6, 7 or 8)"),
    Knob("group_size", int, 128, "input columns sharing one (scale, zero) per output row; -1 = one group per "
         "row", "quant", "--group-size", label="group size", low=1, also=(-1,),
         rule="-1 (one group per row) or a positive number of columns",
         offered=(-1, 32, 64, 128, 256), option_labels=((-1, "per row (-1)"),)),
    Knob("sym", bool, True, "symmetric grid: zero = 2**(bits-1), range [-max|w|, max|w|]", "quant", "--sym",
         label="symmetric grid", off_flag="--asym"),
    Knob("damp_percent", float, 0.01, "lambda = damp_percent * mean(diag H) is added to diag H", "quant",
         "--damp", low=0.0, high=1.0, open_low=True, open_high=True,
         rule="strictly between 0 and 1 (0.01 = 1% of mean diag(H))", offered_range=DAMP_RANGE, log=True),
    Knob("desc_act", bool, False, "process columns in order of decreasing diag(H) (act-order)", "quant",
         "--desc-act", label="desc_act (act-order)"),
    Knob("static_groups", bool, False, "compute every group's (scale, zero) from the original weights up "
         "front", "quant", "--static-groups", label="static groups"),
    Knob("block_size", int, 128, "columns per lazy batch update; changes speed, never the result", "quant",
         "--block-size", label="block size", low=1, rule="a positive number of columns",
         offered=(16, 32, 64, 128, 256)),
    # -- quantization methods beyond the 2022 paper (docs/methods.md) ------------------------------------
    Knob("mse_norm", float, 0.0, "search each row's range (the reference's MSE grid: shrink it in steps of "
         "0.01 down to 0.21 of it, keep the least sum |w - q|^p); 0 = the min-max range", "quant",
         "--mse-norm", label="MSE grid (norm p)", low=0.0,
         rule="0 (min-max grid) or a norm p > 0 (the reference uses 2.4)", offered=(0.0, 2.0, 2.4, 3.0),
         option_labels=((0.0, "off (min-max)"), (2.4, "2.4 (reference)")), beyond_paper=True),
    Knob("group_aware", bool, False, "GAR order: groups by their largest diag(H), columns inside a group by "
         "diag(H); act-order's benefit with g_idx = i // group_size", "quant", "--group-aware",
         label="GAR (group-aware order)", beyond_paper=True),
    Knob("gptaq_alpha", float, 0.0, "GPTAQ: fit each layer to the full-precision model's inputs too, with "
         "this weight (GPTQModel recommends 0.25); 0 = plain GPTQ", "quant", "--gptaq-alpha",
         label="GPTAQ alpha", low=0.0, high=1.0, rule="between 0 (off) and 1 (GPTQModel recommends 0.25)",
         offered=(0.0, 0.25, 0.5, 1.0), option_labels=((0.0, "off (GPTQ)"),), beyond_paper=True),
    Knob("rotation", str, None, "rotate the input dimension before quantizing: 'hadamard' (a randomized "
         "Hadamard rotation, QuaRot style) or none", "quant", "--rotation", also=(None,),
         choices=("hadamard",), rule="None (no rotation) or 'hadamard'", offered=(None, "hadamard"),
         option_labels=((None, "none"),), beyond_paper=True),
    Knob("rotation_seed", int, 0, "which random signs the Hadamard rotation uses", "quant", "--rotation-seed",
         label="rotation seed", low=0, beyond_paper=True),
    Knob("ternary", bool, False, "three values per row (and group): {min, 0, max}, the reference's trits; "
         "bits is ignored", "quant", "--ternary", beyond_paper=True),
    # -- the whole model ------------------------------------------------------------------------------------
    Knob("true_sequential", bool, True, "inside a block, quantize the linears group by group in forward "
         "order (q/k/v, then o, ...), each group calibrated on the outputs of the groups already quantized",
         "model", "--true-sequential", off_flag="--no-true-sequential"),
    # -- calibration ---------------------------------------------------------------------------------------
    Knob("corpus", str, "prose", "calibration text: prose | code | wikitext2 | c4 | ptb | a text file",
         "calibration", "--calib", label="calib corpus", offered=("prose", "code")),
    Knob("nsamples", int, 16, "calibration windows", "calibration", "--nsamples", label="calib windows",
         low=1, rule="a positive number of windows", offered=(4, 8, 16, 32, 64)),
    Knob("seqlen", int, 512, "tokens per calibration window", "calibration", "--seqlen", low=1,
         rule="a positive number of tokens"),
    Knob("seed", int, 0, "which calibration windows are drawn", "calibration", "--seed", low=0),
    # -- evaluation ----------------------------------------------------------------------------------------
    Knob("eval", str, "prose,code", "comma-separated corpora to measure perplexity on ('' = none)",
         "evaluation", "--eval"),
    Knob("eval_tokens", int, 8192, "evaluation tokens per corpus", "evaluation", "--eval-tokens", low=1,
         rule="a positive number of tokens"),
    Knob("eval_seqlen", int, None, "perplexity window length (default: the calibration seqlen; the paper "
         "uses 2048)", "evaluation", "--eval-seqlen", low=2, follows="seqlen"),
)

KNOBS: dict[str, Knob] = {k.name: k for k in _KNOBS}
QUANT_KEYS: tuple[str, ...] = tuple(k.name for k in _KNOBS if k.group == "quant")
CALIBRATION_KEYS: tuple[str, ...] = tuple(k.name for k in _KNOBS if k.group == "calibration")
EVALUATION_KEYS: tuple[str, ...] = tuple(k.name for k in _KNOBS if k.group == "evaluation")
BEYOND_PAPER_KEYS: tuple[str, ...] = tuple(k.name for k in _KNOBS if k.beyond_paper)


def knob(name: str) -> Knob:
    try:
        return KNOBS[name]
    except KeyError:
        raise ValueError(f"unknown setting {name!r}; settings: {list(KNOBS)}") from None


def defaults(names: Iterable[str] = QUANT_KEYS) -> dict[str, Any]:
    """{name: default} for the named knobs."""
    return {n: knob(n).default for n in names}


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """values with every knob that `follows` another and is None set to that knob's value."""
    out = dict(values)
    for name, value in values.items():
        k = KNOBS.get(name)
        if value is None and k is not None and k.follows:
            out[name] = out.get(k.follows, KNOBS[k.follows].default)
    return out


def parse_assignments(text: str, names: Iterable[str] = QUANT_KEYS) -> dict[str, Any]:
    """'bits=8,group_size=64' -> {'bits': 8, 'group_size': 64}, each value parsed and checked by its knob;
    '-' in a name reads as '_'. ValueError names the bad item and the allowed names."""
    allowed = list(names)
    values = {}
    for item in text.split(","):
        key, eq, raw = item.partition("=")
        key, raw = key.strip().replace("-", "_"), raw.strip()
        if not eq or not key or not raw:
            raise ValueError(f"{item!r} is not field=value (e.g. bits=8)")
        if key not in allowed:
            raise ValueError(f"unknown field {key!r}; use one of: {', '.join(allowed)}")
        values[key] = knob(key).parse(raw)
    return values


# -- presets: named configs the dashboards offer (each knob not named keeps its default) -------------------

CUSTOM = "(custom)"  # what a preset menu shows once a control was changed by hand

PRESETS: dict[str, tuple[dict, str]] = {
    name: ({**defaults(), **changes}, blurb) for name, changes, blurb in (
        ("4-bit g128 — the default everyone uses", {},
         "4 bits, one grid per 128 input columns, symmetric, 1% damping: what most GPTQ checkpoints use. "
         "GPTQ's held-out error is well below RTN's."),
        ("3-bit: where RTN collapses", {"bits": 3},
         "8 levels per group. RTN's error jumps; GPTQ's compensation keeps much more of the layer's output."),
        ("desc_act on vs off", {"bits": 3, "group_size": -1, "desc_act": True},
         "Columns with the largest diag(H) (the most-used inputs) go first, while many columns remain to "
         "absorb their error. Toggle desc_act and compare the held-out error and the diag(H) plot."),
        ("2-bit per-row: everything breaks", {"bits": 2, "group_size": -1},
         "4 levels for a whole row. Both methods lose most of the signal; GPTQ loses less."),
        ("8-bit: nearly lossless", {"bits": 8, "group_size": -1},
         "256 levels: RTN is already fine and GPTQ has little left to fix."),
        ("desc_act + static groups (fast kernels)", {"desc_act": True, "static_groups": True},
         "Act-order with grids computed up front from the original weights: the groups stay contiguous in "
         "memory, which is what fast inference kernels want."),
        ("Heavy damping (30%)", {"bits": 3, "damp_percent": DAMP_RANGE[1]},
         "Lots of lambda*I makes H^-1 closer to diagonal: the updates shrink and GPTQ drifts towards RTN."),
    )
}
