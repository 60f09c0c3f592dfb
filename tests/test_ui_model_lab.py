"""Model Lab and the tabbed app, driven from Python on a tiny random-init LLaMA (tests/tiny_models.py).

Every number the charts show is checked against what the package computes independently (perplexity with
metrics.perplexity, per-layer errors from quantize_model's report). Kept small: one tiny model, reduced
settings (docs/performance.md has the timings).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import make_tiny_model
from traitlets import TraitError

from gptq_explorer.ui import InputError, SyntheticSource
from gptq_explorer.ui import model_lab as ml
from gptq_explorer.ui.app import ExplorerApp, split_query
from gptq_explorer.ui.model_lab import ComputeSettings, ModelLab

pytest.importorskip("transformers")

TINY = ComputeSettings(nsamples=4, seqlen=32, eval_tokens=256, eval_seqlen=64, max_new_tokens=4)
PRESET4 = "4-bit g128 — the default everyone uses"
PRESET3 = "3-bit: where RTN collapses"
SMALL = SyntheticSource(d_out=48, d_in=96, n_calib=256, n_heldout=128)  # the Layer Lab's layer in app tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_lab")
    folder = str(make_tiny_model("llama", root / "llama"))
    return {"folder": folder, "cache": root / "cache", "root": root}


@pytest.fixture(scope="module")
def computed(tiny):
    """A lab that has computed FP, RTN and GPTQ at 4 bits (the computation every later test reuses)."""
    lab = ModelLab(tiny["folder"], models={tiny["folder"]: "tiny llama"}, settings=TINY,
                   cache_dir=tiny["cache"], threaded=False, shipped=[])
    assert lab.results.origin == "none" and "gptq-missing" in lab.status.value
    assert all(np.all(np.isnan(np.asarray(t.y, dtype=float))) for t in lab.ppl_plot.figure.data)
    lab.compute()
    assert lab.errors == [] and lab.last_outcome == "done"
    return lab


def bars(lab) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.y, dtype=float) for t in lab.ppl_plot.figure.data}


def layer_errors(lab) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.y, dtype=float) for t in lab.layer_plot.figure.data}


def test_compute_fills_every_chart_with_the_measured_numbers(computed, tiny):
    from gptq_explorer.data import evaluation_ids
    from gptq_explorer.metrics import perplexity
    from gptq_explorer.models import load_model

    lab = computed
    res = lab.results
    assert res.origin == "computed" and res.complete
    assert "computed here (reduced settings): 4x32 prose calibration" in lab.status.value
    b = bars(lab)
    for m, name in (("fp", "FP"), ("rtn", "RTN"), ("gptq", "GPTQ")):
        np.testing.assert_allclose(b[name], [res.reports[m]["perplexity"][c] for c in ("prose", "code")])
    # the bars use the paper's protocol: the same number as metrics.perplexity on the FP model
    lm = load_model(tiny["folder"])
    ids = evaluation_ids(lm.tokenizer, "prose", TINY.eval_tokens)
    ref = perplexity(lm.model, ids, seqlen=TINY.eval_seqlen, progress=False).ppl
    np.testing.assert_allclose(b["FP"][0], ref, rtol=1e-5)
    assert b["RTN"][0] != b["FP"][0] and b["GPTQ"][0] != b["FP"][0]  # quantization did change the model
    # per-layer chart: one point per quantized linear (2 blocks x 7), as quantize_model reported them
    errs = layer_errors(lab)
    assert errs["RTN"].size == errs["GPTQ"].size == 14
    np.testing.assert_allclose(errs["GPTQ"], [r["output_rel_error"] for r in res.reports["gptq"]["layers"]])
    assert np.mean(errs["GPTQ"] < errs["RTN"]) >= 0.8  # GPTQ's calibration error is lower almost everywhere
    # samples: the three generations of the chosen prompt, side by side
    assert ml.PROMPTS[0] in lab.samples.value and lab.samples.value.count("<td") == 3
    for m in ml.METHODS:
        assert len(res.reports[m]["samples"][ml.PROMPTS[0]]) > 0
    lab.set(prompt=1)
    assert ml.PROMPTS[1] in lab.samples.value


def test_three_bits_raises_rtns_error_bars(computed):
    lab = computed
    four = layer_errors(lab)
    lab.set(bits=3)
    assert lab.results.origin == "none" and "Compute" in lab.status.value  # not computed yet: says so
    lab.compute()
    assert lab.errors == [] and lab.results.origin == "computed" and lab.config().bits == 3
    three = layer_errors(lab)
    assert np.all(three["RTN"] > four["RTN"])  # every layer's RTN error goes up with one bit less
    assert np.mean(three["RTN"]) > 2 * np.mean(four["RTN"])
    assert np.mean(three["GPTQ"] < three["RTN"]) >= 0.8
    lab.set(bits=4)  # back: cached, instant
    np.testing.assert_allclose(layer_errors(lab)["RTN"], four["RTN"])


def test_computed_results_are_cached_on_disk(computed, tiny, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(ml, "build_report", boom)
    lab = ModelLab(tiny["folder"], models={tiny["folder"]: "tiny llama"}, settings=TINY,
                   cache_dir=tiny["cache"], threaded=False, shipped=[])
    assert lab.results.origin == "computed" and lab.results.complete
    np.testing.assert_allclose(bars(lab)["GPTQ"], bars(computed)["GPTQ"])
    lab.compute()  # everything cached: no work, no error
    assert lab.errors == [] and "Already computed" in lab.message.value
    # quantize_model's own cache holds the quantized layers too
    assert any((tiny["cache"] / "quantized").glob("*/report.json"))


def test_cancel_leaves_the_model_unquantized_and_says_cancelled(computed, tiny, monkeypatch):
    import torch

    from gptq_explorer.services.layer_source import get_model

    lab = ModelLab(tiny["folder"], models={tiny["folder"]: "tiny llama"}, settings=TINY,
                   cache_dir=tiny["cache"], threaded=True, shipped=[])
    lab.set(bits=2, group_size=32)
    before_bars = bars(lab)
    shared = get_model(tiny["folder"]).model
    weights = {k: v.clone() for k, v in shared.state_dict().items()}
    original_set = lab.progress.set

    def set_and_cancel(fraction, text):  # press Cancel as soon as GPTQ starts on its first block
        original_set(fraction, text)
        if text.startswith("GPTQ: quantizing block"):
            lab.cancel()

    lab.progress.set = set_and_cancel
    lab.compute()
    assert lab.compute_button.disabled and lab.progress.visible  # running, the kernel is free meanwhile
    lab.wait(120)
    assert lab.last_outcome == "cancelled"
    assert "gptq-cancelled" in lab.message.value and "Cancelled" in lab.message.value
    assert not lab.progress.visible and not lab.compute_button.disabled
    # never shown as finished: no GPTQ report at this config, the view is not a computed set
    assert lab.cache.get(lab.model, "gptq", lab.config(), TINY) is None
    assert lab.results.origin != "computed" or lab.results.reports["gptq"] is None
    np.testing.assert_array_equal(bars(lab)["GPTQ"], before_bars["GPTQ"])
    # the shared model is untouched (every method works on its own copy)
    for k, v in shared.state_dict().items():
        assert torch.equal(v, weights[k]), k


def _write_shipped(folder, reports: dict, model: str) -> None:
    out = folder / model
    out.mkdir(parents=True, exist_ok=True)
    for name, r in reports.items():
        r = {**r, "model": model}
        if r.get("calibration"):
            r["calibration"] = {**r["calibration"], "nsamples": 128, "seqlen": 512}
        r.pop("samples", None)  # shipped reports carry no samples
        (out / f"{name}.json").write_text(json.dumps(r))


def test_a_shipped_preset_shows_instantly_with_its_numbers(computed, tiny, monkeypatch):
    """Shipped reports (here: the tiny model's real ones, relabelled 128x512) show without any compute."""
    shipped_dir = tiny["root"] / "shipped"
    lab4 = computed
    lab4.set(bits=4)
    _write_shipped(shipped_dir, {f"{m}-4": lab4.results.reports[m] for m in ml.METHODS}, "smollm2-135m")
    monkeypatch.setenv("GPTQ_EXPLORER_RESULTS", str(shipped_dir))
    monkeypatch.setattr(ml, "build_report", lambda *a, **k: pytest.fail("computed instead of shipped"))
    lab = ModelLab("smollm2-135m", models={"smollm2-135m": "SmolLM2"}, settings=TINY,
                   cache_dir=tiny["root"] / "empty-cache", threaded=False)
    assert lab.results.origin == "precomputed" and lab.results.complete  # at once, the default config
    assert "precomputed: 128x512 prose calibration" in lab.status.value
    assert "gptq-precomputed" in lab.status.value
    labels = dict((v, label) for label, v in lab.preset.options)
    assert "✓ precomputed" in labels[PRESET4] and "✓" not in labels[PRESET3]
    np.testing.assert_allclose(bars(lab)["GPTQ"], bars(lab4)["GPTQ"])
    lab.apply_preset(PRESET3)
    assert lab.results.origin == "none" and "No precomputed result" in lab.message.value
    lab.apply_preset(PRESET4)
    assert lab.results.origin == "precomputed" and lab.preset.value == PRESET4
    np.testing.assert_allclose(bars(lab)["RTN"], [lab4.results.reports["rtn"]["perplexity"][c]
                                                 for c in ("prose", "code")])
    assert "no sample in this report" in lab.samples.value


def test_values_from_a_client_are_clamped_or_rejected(computed):
    lab = computed
    state = lab.state()
    lab.controls["bits"].set_state({"value": 99})  # sliders clamp
    assert lab.controls["bits"].value == 8
    lab.controls["damp_percent"].set_state({"value": 50.0})
    assert lab.controls["damp_percent"].value == pytest.approx(10 ** -0.5)
    for key in ("group_size", "model", "prompt", "view"):  # dropdowns and toggle buttons reject
        with pytest.raises(TraitError):
            lab.controls[key].set_state({"index": 99})
    with pytest.raises(TraitError):
        lab.controls["sym"].set_state({"value": "rm -rf"})
    with pytest.raises(InputError, match="bits must be between 2 and 8"):
        lab.set(bits=12)
    assert "gptq-error" in lab.message.value and "gptq-fix" in lab.message.value
    with pytest.raises(InputError):
        lab.set(model="gpt2-evil")
    lab.set(**{k: state[k] for k in ("bits", "damp_percent")})
    assert lab.state() == state


def test_app_builds_tabs_lazily_and_round_trips_its_state(tiny):
    kwargs = dict(settings=TINY, cache_dir=tiny["cache"], shipped=[], threaded=False)
    folder = tiny["folder"]
    app = ExplorerApp("", source=SMALL, models={folder: "tiny llama"},
                      model_lab_kwargs={"model": folder, **kwargs})
    assert app._model_lab is None and app._sweeps is None  # cold start pays for the Layer Lab only
    bundle = app._repr_mimebundle_()  # what the notebook's last line displays
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == app.root.model_id
    assert app.widget is app.root
    app.tabs.selected_index = 1  # as a browser would
    assert app._model_lab is not None and app._slots[1].children == (app.model_lab.widget,)
    app.model_lab.set(bits=3, desc_act=True, prompt=2)
    app.layer_lab.set(bits=5, group_size=64)
    qs = app.state_query()
    assert "tab=model" in qs and "ml.bits=3" in qs and "bits=5" in qs
    other = ExplorerApp(qs, source=SMALL, models={folder: "tiny llama"},
                        model_lab_kwargs={"model": folder, **kwargs})
    assert other.tabs.selected_index == 1 and other._model_lab is not None
    assert other.state() == app.state()
    # the copy-link button gives the whole app's state
    app.model_lab.copy_button.click()
    assert "ml.bits=3" in app.model_lab.link.value and "tab=model" in app.model_lab.link.value
    # bad values in a link are listed, not applied
    bad = ExplorerApp("tab=nope&ml.bits=12&ml.view=x&bits=3", source=SMALL,
                      models={folder: "tiny llama"}, model_lab_kwargs={"model": folder, **kwargs})
    assert "tab=" in bad.layer_lab.message.value and bad.layer_lab.state()["bits"] == 3
    ml_lab = bad.model_lab
    assert ml_lab.state()["bits"] == 4 and "bits" in ml_lab.message.value and "view" in ml_lab.message.value
    assert split_query("?tab=sweeps&sw.facet=desc_act&bits=3")[:4] == (
        "bits=3", {"tab": "sweeps"}, {}, {"facet": "desc_act"})


def test_a_preset_in_one_lab_applies_to_the_other(tiny):
    folder = tiny["folder"]
    app = ExplorerApp("", source=SMALL, models={folder: "tiny llama"},
                      model_lab_kwargs={"model": folder, "settings": TINY, "cache_dir": tiny["cache"],
                                        "shipped": [], "threaded": False})
    app.layer_lab.preset.value = PRESET3
    assert app.model_lab.config().bits == 3 and app.model_lab.preset.value == PRESET3  # built with it
    app.model_lab.preset.value = "desc_act on vs off"
    assert app.layer_lab.run.cfg.desc_act and app.layer_lab.preset.value == "desc_act on vs off"


def test_a_full_disk_keeps_the_computed_report_in_memory(tiny, tmp_path, monkeypatch):
    """ENOSPC while caching a report: no partial or temp file is left, the report is still shown (kept in
    memory for the session), and the page says it was not saved and what to do."""
    import errno
    import pathlib

    real_write = pathlib.Path.write_text

    def full_disk(self, data, *a, **k):
        if self.name.endswith(".tmp"):
            real_write(self, data[: len(data) // 2], *a, **k)  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    cache = tmp_path / "cache"
    lab = ModelLab(tiny["folder"], models={tiny["folder"]: "tiny llama"}, settings=TINY, cache_dir=cache,
                   threaded=False, shipped=[], keep_quantized=False)
    lab.compute()
    assert lab.errors == [] and lab.last_outcome == "done"
    assert lab.results.origin == "computed" and lab.results.complete
    assert np.all(np.isfinite(bars(lab)["GPTQ"]))
    text = lab.message.value
    assert "could not be saved" in text and "No space left on device" in text and "Free some disk" in text
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # nothing half-written, no temp files
    monkeypatch.undo()
    again = ModelLab(tiny["folder"], models={tiny["folder"]: "tiny llama"}, settings=TINY, cache_dir=cache,
                     threaded=False, shipped=[])
    assert again.results.origin == "none"  # a new session: nothing was stored


# ------------------------------------------------ the methods after GPTQ: shipped method runs, Compute


def _run(method, bits=3, group=128, prose=20.0, *, main=False, **knobs):
    """A run report of SmolLM2 as the shipped tables hold it: the main table's protocol (128 x 512, 65,536
    tokens in windows of 2048) or the method table's reduced one (32 x 512, 16,384 in windows of 512)."""
    from gptq_explorer.engine import QuantConfig

    ns, tokens, seqlen = (128, 65536, 2048) if main else (32, 16384, 512)
    return {"model": "smollm2-135m", "method": method, "overrides": {},
            "config": (QuantConfig(bits=bits, group_size=group, **knobs).to_dict() if method != "fp" else {}),
            "calibration": None if method != "gptq" else {"corpus": "prose", "nsamples": ns, "seqlen": 512},
            "evaluation": {"corpora": ["prose", "code"], "tokens": tokens, "seqlen": seqlen},
            "perplexity": {"prose": prose, "code": prose / 2}, "layers": [],
            "timings": {"quantize": prose * 3}, "created": "2026-01-01T00:00:00+00:00"}


MAIN = {"fp": _run("fp", prose=10.1, main=True), "rtn-w3-g128-sym": _run("rtn", prose=133.6, main=True),
        "gptq-w3-g128-sym": _run("gptq", prose=29.5, main=True)}
TABLE = {"rtn-w3-g128": _run("rtn", prose=151.0),
         "rtn-had-w3-g128": _run("rtn", prose=61.0, rotation="hadamard"),
         "gptq-w3-g128": _run("gptq", prose=31.0),
         "gptq-mse-w3-g128": _run("gptq", prose=30.0, mse_norm=2.4),
         "gptq-order-w3-g128": _run("gptq", prose=29.0, group_aware=True),
         "gptaq-w3-g128": _run("gptq", prose=27.25, gptaq_alpha=0.25),
         "gptq-had-w3-g128": _run("gptq", prose=26.5, rotation="hadamard"),
         "gptaq-mse-order-w3-g128": _run("gptq", prose=25.0, gptaq_alpha=0.25, mse_norm=2.4,
                                         group_aware=True),
         "rtn-w4-g128": _run("rtn", bits=4, prose=22.0),
         "gptq-w4-g128": _run("gptq", bits=4, prose=14.0)}


@pytest.fixture
def methods_lab(tmp_path, monkeypatch):
    """A Model Lab of SmolLM2 (never loaded) over a main table and a method table written to tmp_path."""
    from gptq_explorer.services import results

    monkeypatch.setenv("GPTQ_EXPLORER_RESULTS", str(tmp_path / "results"))
    for name, r in MAIN.items():
        results.write_json(results.model_dir("smollm2-135m") / f"{name}.json", r)
    for name, r in TABLE.items():
        results.write_json(results.method_dir("smollm2-135m") / f"{name}.json", r)
    monkeypatch.setattr(ml, "build_report", lambda *a, **k: pytest.fail("computed instead of shipped"))
    lab = ModelLab("smollm2-135m", models={"smollm2-135m": "SmolLM2"}, settings=TINY,
                   cache_dir=tmp_path / "cache", threaded=False, state={"bits": 3})
    assert lab.errors == []
    return lab


def ppl(report) -> list[float]:
    return [report["perplexity"][c] for c in ("prose", "code")]


def test_the_method_knobs_are_controls_of_the_model_lab(methods_lab):
    from gptq_explorer.settings import BEYOND_PAPER_KEYS

    lab = methods_lab
    assert set(BEYOND_PAPER_KEYS) <= set(lab.KNOBS) and set(BEYOND_PAPER_KEYS) <= set(lab.state())
    assert lab.method_menu.value == "GPTQ" and "GPTAQ" in lab.method_menu.options
    lab.set(mse_norm=2.4)
    assert lab.method_menu.value == "GPTQ + MSE grid" and lab.config().mse_norm == 2.4
    lab.method_menu.value = "GPTQ + rotation"  # as a browser would: the menu sets the knobs
    assert lab.state()["rotation"] == "hadamard" and lab.state()["mse_norm"] == 0.0
    # GAR needs groups and is an order of its own: the menu makes room for it, set() refuses the clash
    lab.set(group_size=-1, desc_act=True, rotation=None)
    lab.select_method("GPTQ + GAR")
    assert lab.state()["group_aware"] and lab.state()["group_size"] == 128 and not lab.state()["desc_act"]
    with pytest.raises(InputError, match="group_aware=True orders groups"):
        lab.set(group_size=-1)
    assert lab.state()["group_size"] == 128 and "gptq-error" in lab.message.value
    with pytest.raises(InputError, match="unknown method"):
        lab.select_method("AWQ")


def test_selecting_gptaq_shows_the_shipped_method_run_at_once(methods_lab):
    lab = methods_lab
    assert lab.results.origin == "precomputed" and "128x512" in lab.status.value  # the main table first
    lab.select_method("GPTAQ")
    res = lab.results
    assert lab.config().gptaq_alpha == 0.25 and res.origin == "precomputed"
    assert res.reports["gptq"]["path"].endswith("methods/smollm2-135m/gptaq-w3-g128.json")
    b = bars(lab)
    assert list(b) == ["FP", "RTN", "GPTAQ"]
    np.testing.assert_allclose(b["GPTAQ"], [27.25, 13.625])  # the stored report's perplexity
    np.testing.assert_allclose(b["RTN"], ppl(TABLE["rtn-w3-g128"]))  # RTN of the same (reduced) protocol
    assert np.all(np.isnan(b["FP"]))  # the method table has no FP run: never the main table's, not comparable
    status = lab.status.value
    assert "reduced protocol" in status and "32x512 prose calibration" in status and "16384" in status
    assert "Not in this set: FP" in status
    assert "GPTAQ" in lab.summary.value and "27.25" in lab.summary.value


def test_the_method_table_has_one_row_per_stored_run_and_selects_it(methods_lab):
    lab = methods_lab
    table = lab.method_table
    w3 = {n: r for n, r in TABLE.items() if n.endswith("w3-g128")}
    assert len(table.rows) == len(table.buttons) == len(w3) == 8
    assert [row["label"] for row in table.rows] == [
        "RTN", "RTN + rotation", "GPTQ", "GPTAQ", "GPTQ + GAR", "GPTQ + MSE grid", "GPTQ + rotation",
        "GPTAQ + MSE grid + GAR"]
    for row in table.rows:
        name = row["report"]["run_id"]
        assert [row["prose"], row["code"]] == ppl(w3[name])
        assert row["quantize_s"] == w3[name]["timings"]["quantize"]
    assert "reduced protocol" in table.title.value.lower() and "3-bit g128 sym" in table.title.value
    assert len(table.grid.children) == 4 * (1 + 8)  # a header, then a row per run
    # one click: the run's config, the method table's view, its numbers
    table.buttons[[r["label"] for r in table.rows].index("GPTQ + rotation")].click()
    assert lab.config().rotation == "hadamard" and lab.state()["view"] == "methods"
    assert lab.method_menu.value == "GPTQ + rotation"
    b = bars(lab)
    np.testing.assert_allclose(b["GPTQ + rotation"], ppl(TABLE["gptq-had-w3-g128"]))
    np.testing.assert_allclose(b["RTN + rotation"], ppl(TABLE["rtn-had-w3-g128"]))
    shown = [row["label"] for row, button in zip(table.rows, table.buttons) if button.button_style == "info"]
    assert shown == ["RTN + rotation", "GPTQ + rotation"]
    # plain GPTQ from the table is the table's run (same protocol as the others), not the main table's
    table.buttons[[r["label"] for r in table.rows].index("GPTQ")].click()
    np.testing.assert_allclose(bars(lab)["GPTQ"], ppl(TABLE["gptq-w3-g128"]))
    lab.set(view="auto")
    np.testing.assert_allclose(bars(lab)["GPTQ"], ppl(MAIN["gptq-w3-g128-sym"]))
    assert "precomputed: 128x512" in lab.status.value
    # a combination: the menu says so, the series says which
    table.buttons[-1].click()
    assert lab.method_menu.value == ml.COMBINED and "GPTAQ + MSE grid + GAR" in bars(lab)
    # 4-bit: its two runs; per row: none, and the page says which settings have some
    lab.set(bits=4, mse_norm=0.0, group_aware=False, gptaq_alpha=0.0)
    assert [r["label"] for r in table.rows] == ["RTN", "GPTQ"]
    lab.set(group_size=-1)
    assert table.rows == [] and "no shipped method run at 4-bit per row sym" in table.title.value
    assert "4-bit g128 sym, 3-bit g128 sym" in table.title.value


def test_a_link_with_a_method_opens_its_run(methods_lab, tmp_path):
    lab = ModelLab.from_query("bits=3&gptaq_alpha=0.25&view=methods", models={"smollm2-135m": "SmolLM2"},
                              settings=TINY, cache_dir=tmp_path / "cache", threaded=False)
    assert lab.errors == [] and lab.method_menu.value == "GPTAQ"
    np.testing.assert_allclose(bars(lab)["GPTAQ"], ppl(TABLE["gptaq-w3-g128"]))
    assert "gptaq_alpha=0.25" in lab.state_query() and "rotation=None" in lab.state_query()
    again, problems = ModelLab.parse_query(lab.state_query(), models={"smollm2-135m": "SmolLM2"})
    assert problems == [] and again == lab.state()


def test_compute_runs_a_method_with_its_knobs(computed):
    """A method the tables do not have: Compute measures it (build_report gets the method knobs in its
    QuantConfig); RTN and FP are reused from the cache (GPTAQ and GAR do not change RTN)."""
    lab = computed
    lab.set(bits=4, group_size=128, view="auto")
    rtn_before, errors = bars(lab)["RTN"], len(lab.errors)  # earlier tests' bad values stay listed
    lab.select_method("GPTAQ")
    # FP and RTN are computed already (RTN's cache ignores GPTAQ): the set lacks only GPTAQ, and says so
    assert lab.results.reports["gptq"] is None and lab.results.reports["rtn"] is not None
    assert "Not in this set: GPTAQ (press Compute" in lab.status.value
    lab.compute()
    assert lab.errors[errors:] == [] and lab.last_outcome == "done" and lab.results.origin == "computed"
    report = lab.results.reports["gptq"]
    assert report["config"]["gptaq_alpha"] == 0.25 and report["method"] == "gptq"
    b = bars(lab)
    np.testing.assert_allclose(b["GPTAQ"], ppl(report))
    np.testing.assert_allclose(b["RTN"], rtn_before)  # the cached plain RTN: GPTAQ does not change it
    assert b["GPTAQ"][0] != bars_of_gptq(lab)[0]
    assert "Done: computing GPTQ" in lab.message.value
    lab.select_method("GPTQ")
    assert lab.config().gptaq_alpha == 0.0 and "GPTQ" in bars(lab)


def bars_of_gptq(lab) -> np.ndarray:
    """Plain GPTQ's computed perplexity at the lab's bits and group size (from its cache)."""
    cfg = lab.config().replace(gptaq_alpha=0.0, mse_norm=0.0, group_aware=False, rotation=None, ternary=False)
    return np.asarray(ppl(lab.cache.get(lab.model, "gptq", cfg, TINY)))


def test_every_shipped_method_run_shows_when_selected(monkeypatch, tmp_path):
    """The real method table (data/results/methods/smollm2-135m; more runs arrive as the benchmark goes):
    each run, selected from the table, shows its own perplexity."""
    from gptq_explorer.services.results import method_runs

    monkeypatch.delenv("GPTQ_EXPLORER_RESULTS", raising=False)
    runs = [r for r in method_runs("smollm2-135m") if r["method"] != "fp"]
    if not runs:
        pytest.skip("no method run measured yet (python benchmarks/bench_methods.py)")
    monkeypatch.setattr(ml, "build_report", lambda *a, **k: pytest.fail("computed instead of shipped"))
    lab = ModelLab("smollm2-135m", models={"smollm2-135m": "SmolLM2"}, cache_dir=tmp_path, threaded=False)
    for r in runs:
        lab.select_run(r)
        shown = lab.results.reports[r["method"]]
        assert shown["run_id"] == r["run_id"] and "reduced protocol" in lab.status.value, r["run_id"]
        series = lab.results.name(r["method"], short=True)
        np.testing.assert_allclose(bars(lab)[series], ppl(r))
        assert r["run_id"] in [row["report"]["run_id"] for row in lab.method_table.rows]
    assert lab.errors == []
