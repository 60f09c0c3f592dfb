"""The settings model: every knob is declared once (gptq_explorer.settings) and the engine, the CLI, the
dashboards, the link parser and the presets expose each one with the same default and the same range."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gptq_explorer import cli, settings
from gptq_explorer.engine import QuantConfig
from gptq_explorer.settings import KNOBS, QUANT_KEYS


def outside(knob: settings.Knob) -> list:
    """Values the engine refuses for this knob (for a bool: a non-bool)."""
    if knob.type is bool:
        return ["yes", 1]
    if knob.type is str:
        return [3]
    bad = []
    if knob.low is not None:
        bad.append(knob.low if knob.open_low else knob.type(knob.low - 1))
    if knob.high is not None:
        bad.append(knob.high if knob.open_high else knob.type(knob.high + 1))
    if knob.type is float:
        bad.append(float("nan"))
    if knob.type is int:
        bad.append(2.5)
    return [b for b in bad if b not in knob.also]


def inside(knob: settings.Knob) -> list:
    if knob.type is bool:
        return [True, False]
    values = [knob.default] if knob.default is not None else []
    values += list(knob.also) + list(knob.offered or ())
    if knob.offered_range:
        values += list(knob.offered_range)
    return values


KNOB_NAMES = list(KNOBS)


def test_every_knob_is_complete():
    for name, k in KNOBS.items():
        assert k.name == name and k.help and k.flag.startswith("--") and k.group
        assert k.type in (int, float, bool, str)
        if k.default is not None:
            assert k.check(k.default) == k.default
        elif k.follows:
            assert k.follows in KNOBS  # None means "the value of another knob"
        else:
            assert None in k.also and k.check(None) is None  # None is a value of its own (no rotation)
        for v in inside(k):
            k.check(v)
        for v in outside(k):
            with pytest.raises(ValueError, match=rf"^{name}"):
                k.check(v)
        if k.offered is not None:  # what the dashboards offer is allowed by the engine
            assert all(k.check(v) == v for v in k.offered)
            assert k.default in k.offered
    flags = [f for k in KNOBS.values() for f in (k.flag, k.off_flag) if f]
    assert len(flags) == len(set(flags))


def test_quantconfig_fields_are_the_quant_knobs():
    fields = dataclasses.fields(QuantConfig)
    assert tuple(f.name for f in fields) == QUANT_KEYS
    for f in fields:
        assert f.default == KNOBS[f.name].default
    for name in QUANT_KEYS:
        for bad in outside(KNOBS[name]):
            with pytest.raises(ValueError, match=rf"^{name} must be"):
                QuantConfig(**{name: bad})


def test_cli_exposes_each_knob_with_its_default_and_range():
    parser = cli.build_parser()
    args = parser.parse_args(["quantize"])
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    actions = quantize._option_string_actions  # flag -> action
    for name in cli.CLI_KNOBS:
        k = KNOBS[name]
        dest = cli.knob_dest(k)
        assert getattr(args, dest) == k.default, name
        assert actions[k.flag].dest == dest and actions[k.flag].help == k.help
        if k.off_flag:
            flipped = parser.parse_args(["quantize", k.off_flag])
            assert getattr(flipped, dest) is (not k.default)
        for bad in outside(k):
            if k.type is bool or isinstance(bad, float) and k.type is int:
                continue  # argparse itself refuses these forms (a flag takes no value; int('2.5') fails)
            args = parser.parse_args(["quantize"])
            setattr(args, dest, bad)
            with pytest.raises(cli.UsageError, match=rf"^{k.flag} .*{name} must be"):
                cli.knob_values(args)
    assert set(cli.CLI_KNOBS) == set(KNOBS)  # the CLI takes every knob


def test_eval_seqlen_follows_seqlen():
    args = cli.build_parser().parse_args(["quantize", "--seqlen", "64"])
    assert cli.knob_values(args)["eval_seqlen"] == 64
    args = cli.build_parser().parse_args(["quantize", "--seqlen", "64", "--eval-seqlen", "32"])
    assert cli.knob_values(args)["eval_seqlen"] == 32


def test_overrides_parse_with_the_knobs():
    assert settings.parse_assignments("bits=8,group-size=64,sym=off,damp_percent=0.1") == {
        "bits": 8, "group_size": 64, "sym": False, "damp_percent": 0.1}
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        settings.parse_assignments("bits=9")
    with pytest.raises(ValueError, match="unknown field 'nsamples'"):
        settings.parse_assignments("nsamples=4")  # per-layer overrides take quantization knobs only


@pytest.mark.parametrize("name", KNOB_NAMES)
def test_link_values_parse_and_clamp(name):
    k = KNOBS[name]
    if k.default is None:
        return
    text = ("1" if k.default else "0") if k.type is bool else str(k.default)
    assert k.parse(text) == k.default
    assert k.offer(text) == k.default
    if k.offered_range:  # a slider's end written with a few digits is clamped to the end
        lo, hi = k.offered_range
        assert k.offer(f"{hi:.12g}") == hi and k.offer(f"{lo:.12g}") == lo
        with pytest.raises(ValueError, match=rf"{name} must be between"):
            k.offer(str(hi * 1.5))
    if k.offered:
        not_offered = [v for v in (3, 100, "other") if not isinstance(v, str) or k.type is str]
        for v in not_offered:
            if v not in k.offered:
                with pytest.raises(ValueError, match=rf"{name} must be"):
                    k.offer(str(v))


def test_presets_are_valid_configs_that_change_only_what_they_say():
    assert settings.PRESETS
    defaults = settings.defaults()
    for name, (values, blurb) in settings.PRESETS.items():
        cfg = QuantConfig(**values)
        assert set(values) == set(QUANT_KEYS) and blurb
        assert KNOBS["damp_percent"].offer(cfg.damp_percent) == cfg.damp_percent  # a dashboard can show it
        if "default" in name:
            assert values == defaults
    heavy = settings.PRESETS["Heavy damping (30%)"][0]["damp_percent"]
    assert math.isclose(heavy, 10**-0.5)


# ------------------------------------------------------------------ the dashboards and their links


def _labs(tmp_path):
    from gptq_explorer.ui import LayerLab
    from gptq_explorer.ui.model_lab import ModelLab

    return [LayerLab(models={}), ModelLab("m", models={"m": "a model"}, shipped=[], cache_dir=tmp_path,
                                          threaded=False)]


def _range_of(widget):
    import ipywidgets as widgets

    from gptq_explorer.ui.controls import INT_MAX

    if isinstance(widget, widgets.FloatLogSlider):
        return 10**widget.min, 10**widget.max
    if isinstance(widget, widgets.BoundedIntText) and widget.max == INT_MAX:
        return widget.min, None  # a number box for a range with no upper end (rotation_seed)
    return widget.min, widget.max


def test_each_dashboard_exposes_its_knobs_with_the_same_default_and_range(tmp_path):
    import ipywidgets as widgets

    from gptq_explorer.ui.common import InputError

    labs = _labs(tmp_path)
    assert {"bits", "group_size", "sym", "desc_act", "damp_percent"} <= set(labs[1].KNOBS)
    assert set(QUANT_KEYS) <= set(labs[0].KNOBS)
    for lab in labs:
        assert lab.errors == []
        for name in lab.KNOBS:
            k, control = KNOBS[name], lab.controls[name]
            assert control.value == k.default, (type(lab).__name__, name)
            assert lab.DEFAULTS[name] == k.default
            assert control.description == k.control_label
            if k.offered is not None:
                assert [v for _, v in control.options] == list(k.offered)
            elif k.type is bool:
                assert isinstance(control, widgets.Checkbox)
            else:
                low, high = k.slider_range()
                got_low, got_high = _range_of(control)
                assert got_low == pytest.approx(low, rel=1e-12)
                assert got_high == (None if high is None else pytest.approx(high, rel=1e-12))  # None: no end
            # a link's "yes" is a bool there (Knob.parse); "maybe" is not
            bads = ["maybe", 2] if k.type is bool else outside(k)
            for bad in bads + ([7] if k.offered and 7 not in k.offered else []):
                with pytest.raises(InputError, match=rf"{name}"):
                    lab.set(**{name: bad})
                assert control.value == k.default  # nothing changed
        assert lab.config() == QuantConfig(**{k: KNOBS[k].default for k in QUANT_KEYS})


@pytest.mark.parametrize("which", [0, 1])
def test_each_dashboards_link_parser_takes_the_knobs(tmp_path, which):
    lab = _labs(tmp_path)[which]
    for name in lab.KNOBS:
        k = KNOBS[name]
        text = ("1" if k.default else "0") if k.type is bool else str(k.default)
        values, problems = type(lab).parse_query(f"{name}={text}")
        assert values == {name: k.default} and problems == []
        if k.type is not bool:
            values, problems = type(lab).parse_query(f"{name}=nonsense")
            assert values == {} and len(problems) == 1
            assert problems[0].startswith(f"{name}='nonsense' ignored")
    values, problems = type(lab).parse_query("bits=3&group_size=64&damp_percent=0.1")
    assert values == {"bits": 3, "group_size": 64, "damp_percent": 0.1} and problems == []
    lab.set(**values)
    assert lab.config() == QuantConfig(bits=3, group_size=64, damp_percent=0.1)
    again, problems = type(lab).parse_query(lab.state_query(), models={"m": "a model"})  # a copied link
    assert problems == []
    assert {k: again[k] for k in lab.KNOBS} == {k: lab.controls[k].value for k in lab.KNOBS}


def test_the_offered_corpora_are_the_offline_ones():
    from gptq_explorer.data.corpora import LOCAL_CORPORA
    from gptq_explorer.ui import sweeps

    assert KNOBS["corpus"].offered == LOCAL_CORPORA == sweeps.CORPORA
