"""Sweeps, driven from Python on a small synthetic layer: the heatmaps hold the engine's numbers.

Kept small: a 64 x 192 layer; 20-40 configs of GPTQ + RTN on the torch path (docs/performance.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from traitlets import TraitError

from gptq_explorer.engine import QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.metrics.layer_error import layer_output_mse
from gptq_explorer.ui import InputError, LayerLab, SyntheticSource
from gptq_explorer.ui import sweeps as sweeps_module
from gptq_explorer.ui.sweeps import SWEEP_BITS, SWEEP_GROUPS, Sweeps

SRC = SyntheticSource(d_out=64, d_in=192, n_calib=768, n_heldout=384, seed=3)


@pytest.fixture(scope="module")
def swept():
    sw = Sweeps(source=SRC, threaded=False, cache_dir="/nonexistent-cache", model="no-such-model")
    assert sw.cells_done == 0 and sw.errors == []
    sw.run()
    assert sw.last_outcome == "done" and sw.errors == []
    return sw


def test_grid_holds_the_held_out_output_error(swept):
    grid = swept.grid[None]
    assert grid["gptq"].shape == (len(SWEEP_BITS), len(SWEEP_GROUPS))
    assert np.all(np.isfinite(grid["gptq"])) and np.all(np.isfinite(grid["rtn"]))
    # one cell against the engine's NumPy path and the inputs themselves (not the held-out Hessian)
    data = SRC.load()
    i, j = SWEEP_BITS.index(3), SWEEP_GROUPS.index(64)
    cfg = QuantConfig(bits=3, group_size=64)
    q = gptq_quantize(data.W, data.H, cfg).weight
    np.testing.assert_allclose(grid["gptq"][i, j], layer_output_mse(data.W, q, data.X_heldout), rtol=2e-3)
    r = rtn_quantize(data.W, cfg).weight
    np.testing.assert_allclose(grid["rtn"][i, j], layer_output_mse(data.W, r, data.X_heldout), rtol=1e-4)
    # more bits never hurt; GPTQ beats RTN from 3 bits on
    assert np.all(np.diff(grid["gptq"], axis=0) < 0) and np.all(np.diff(grid["rtn"], axis=0) < 0)
    assert np.all(grid["ratio"][1:] > 1)
    np.testing.assert_allclose(grid["ratio"], grid["rtn"] / grid["gptq"])


def test_figure_shows_the_grid(swept):
    fig = swept.mse_plot.figure
    assert [t.name for t in fig.data] == ["gptq", "rtn", "ratio"]
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), np.log10(swept.grid[None]["gptq"]))
    np.testing.assert_allclose(np.asarray(fig.data[2].customdata, dtype=float), swept.grid[None]["ratio"])
    assert list(fig.data[0].y) == ["2-bit", "3-bit", "4-bit", "8-bit"] and fig.data[0].x[0] == "per row"
    assert fig.layout.xaxis.title.text == "group size" and fig.layout.yaxis.title.text == "bits"
    assert "cells computed" not in fig.layout.title.text  # complete
    out = swept.mse_plot.widget.outputs[0]["data"]
    assert "application/vnd.plotly.v1+json" in out  # drawn by the page's plotly renderer, no FigureWidget


def test_desc_act_facet_and_the_cache(swept, monkeypatch):
    first = swept.grid[None]["gptq"].copy()
    swept.set(facet="desc_act")
    assert set(swept.grid) == {False, True} and len(swept.mse_plot.figure.data) == 6
    assert np.all(np.isnan(swept.grid[True]["gptq"]))  # not swept yet: shown as missing
    assert "of 40 cells computed" in swept.mse_plot.figure.layout.title.text
    swept.run()
    off, on = swept.grid[False]["gptq"], swept.grid[True]["gptq"]
    np.testing.assert_array_equal(off, first)  # desc_act off: the first sweep's cells, from the cache
    assert not np.allclose(on, off)
    # a sweep seen before is read from the cache: no engine call
    monkeypatch.setattr(sweeps_module, "gptq_quantize", lambda *a, **k: pytest.fail("recomputed"))
    swept.set(facet="none")
    swept.run()
    assert swept.last_outcome == "done" and np.all(np.isfinite(swept.grid[None]["gptq"]))
    swept.set(facet="desc_act")
    swept.set(facet="none")


def test_cancel_keeps_finished_cells_and_says_cancelled(monkeypatch):
    src = SyntheticSource(d_out=32, d_in=96, n_calib=256, n_heldout=128, seed=11)
    sw = Sweeps(source=src, threaded=True, cache_dir="/nonexistent-cache", model="no-such-model")
    real = sweeps_module.cell
    calls = []

    def cell_then_cancel(data, key, cfg):
        calls.append(cfg)
        if len(calls) == 3:
            sw.cancel()
        return real(data, key, cfg)

    monkeypatch.setattr(sweeps_module, "cell", cell_then_cancel)
    sw.run()
    sw.wait(60)
    assert sw.last_outcome == "cancelled" and len(calls) == 3
    assert "gptq-cancelled" in sw.message.value and "Cancelled" in sw.message.value
    assert np.isfinite(sw.grid[None]["gptq"]).sum() == 3
    assert "cancelled" in sw.mse_plot.figure.layout.title.text
    assert not sw.progress.visible and not sw.run_button.disabled


def test_follows_the_layer_lab():
    lab = LayerLab(source=SyntheticSource(d_out=32, d_in=64, n_calib=256, n_heldout=128), models={})
    sw = Sweeps(lab, threaded=False, cache_dir="/nonexistent-cache", model="no-such-model")
    data, key, base = sw._layer()
    assert data is lab.data and key == lab._source.key and base == lab.run.cfg
    lab.set(sym=False)
    assert sw._layer()[2].sym is False and all(not c.sym for *_, c in sw.configs())
    sw._show_cached()
    assert "asym" in sw.layer_info.value and "32x64" in sw.layer_info.value


def test_perplexity_panel_reads_shipped_and_computed_reports(tmp_path, monkeypatch):
    shipped = tmp_path / "results" / "tiny-model"
    shipped.mkdir(parents=True)
    base = {"model": "tiny-model", "overrides": {}, "evaluation": {"tokens": 4096, "seqlen": 512}}
    (shipped / "fp.json").write_text(json.dumps({**base, "method": "fp", "config": {},
                                                 "perplexity": {"prose": 11.98}}))
    (shipped / "gptq.json").write_text(json.dumps({
        **base, "method": "gptq", "perplexity": {"prose": 17.19, "code": 3.3},
        "config": QuantConfig(bits=4, group_size=128).to_dict()}))
    cached = tmp_path / "cache" / "reports" / "tiny-model"
    cached.mkdir(parents=True)
    (cached / "rtn-x.json").write_text(json.dumps({
        **base, "method": "rtn", "perplexity": {"prose": 18.76},
        "config": QuantConfig(bits=3, group_size=64).to_dict()}))
    monkeypatch.setenv("GPTQ_EXPLORER_RESULTS", str(tmp_path / "results"))
    sw = Sweeps(source=SRC, threaded=False, cache_dir=tmp_path / "cache", model="tiny-model")
    g, r = sw.perplexity_grid["gptq"], sw.perplexity_grid["rtn"]
    assert g[SWEEP_BITS.index(4), SWEEP_GROUPS.index(128)] == 17.19 and np.isfinite(g).sum() == 1
    assert r[SWEEP_BITS.index(3), SWEEP_GROUPS.index(64)] == 18.76 and np.isfinite(r).sum() == 1
    text = sw.ppl_plot.figure.data[0].text
    assert text[SWEEP_BITS.index(3)][SWEEP_GROUPS.index(64)] == "18.8*"  # * = computed here
    assert "FP: 11.98" in sw.ppl_plot.figure.layout.title.text
    sw.set(corpus="code")
    assert np.isfinite(sw.perplexity_grid["rtn"]).sum() == 0
    assert sw.perplexity_grid["gptq"][SWEEP_BITS.index(4), SWEEP_GROUPS.index(128)] == 3.3


def test_bad_values_are_rejected(swept):
    with pytest.raises(TraitError):
        swept.facet.set_state({"index": 99})
    with pytest.raises(TraitError):
        swept.corpus.set_state({"index": 7})
    with pytest.raises(InputError):
        swept.set(facet="bits")
    assert "gptq-error" in swept.message.value and "gptq-fix" in swept.message.value
    with pytest.raises(InputError):
        swept.set(colour="red")


# ------------------------------------------------------------------ method as the third axis


@pytest.fixture(scope="module")
def by_method():
    sw = Sweeps(source=SRC, threaded=False, cache_dir="/nonexistent-cache", model="no-such-model")
    sw.set(facet="method")
    assert sw.paired() and sw.cells_done == 0
    sw.run()
    assert sw.last_outcome == "done" and sw.errors == []
    return sw


def test_method_axis_measures_every_method_against_the_full_precision_output(by_method):
    from gptq_explorer.ui.layer_methods import METHODS

    sw = by_method
    assert list(sw.grid) == list(sweeps_module.SWEEP_METHODS) and set(sw.grid) <= set(METHODS)
    assert sw.cells_done == 5 * 4 * 5 - 4  # GAR per row is left out (one group: nothing to order)
    pair = SRC.load_pair()  # the quantized model's inputs and the full-precision model's, same tokens
    i, j = SWEEP_BITS.index(3), SWEEP_GROUPS.index(64)
    base = QuantConfig(bits=3, group_size=64)
    for name, knobs in [("GPTQ", {}), ("GPTAQ", {"gptaq_alpha": 0.25}),
                        ("GPTQ + MSE grid", {"mse_norm": 2.4}), ("GPTQ + GAR", {"group_aware": True}),
                        ("GPTQ + rotation", {"rotation": "hadamard"})]:
        cfg = base.replace(**knobs)
        q = gptq_quantize(pair.W, pair.H, cfg, dXXT=pair.dXXT if cfg.gptaq_alpha else None).weight
        np.testing.assert_allclose(sw.grid[name]["gptq"][i, j], pair.heldout_fp_mse(q), rtol=2e-3)
        r = rtn_quantize(pair.W, cfg).weight  # RTN on the method's grid and basis
        np.testing.assert_allclose(sw.grid[name]["rtn"][i, j], pair.heldout_fp_mse(r), rtol=1e-4)
    assert np.all(np.isnan(sw.grid["GPTQ + GAR"]["gptq"][:, 0]))
    assert np.all(np.isfinite(sw.grid["GPTQ + GAR"]["gptq"][:, 1:]))
    np.testing.assert_array_equal(sw.grid["GPTQ"]["rtn"], sw.grid["GPTAQ"]["rtn"])  # RTN has no GPTAQ
    # GPTAQ also fits the upstream layers' error, which plain GPTQ cannot see: lower from 3 bits on, and
    # about a third lower even at 8 bits (measured on this layer)
    gain = sw.grid["GPTAQ"]["gptq"] / sw.grid["GPTQ"]["gptq"]
    assert np.all(gain[1:] < 0.95) and np.all(gain[-1] < 0.75)


def test_method_axis_figure_and_page(by_method):
    sw = by_method
    fig = sw.mse_plot.figure
    assert len(fig.data) == 15
    titles = [a.text for a in fig.layout.annotations]
    assert titles[:6] == ["GPTQ", "RTN", "RTN / GPTQ", "GPTQ + MSE grid", "RTN + MSE grid",
                          "RTN + MSE grid / GPTQ + MSE grid"]
    assert "GPTAQ" in titles and "RTN + rotation" in titles
    np.testing.assert_allclose(np.asarray(fig.data[9].customdata, dtype=float), sw.grid["GPTAQ"]["gptq"])
    title = fig.layout.title.text
    assert title.startswith("Distance from FP output") and "cells computed" not in title
    info = sw.layer_info.value
    assert "quantized model's inputs" in info and "RTN 4-bit g128" in info and "GAR" in info


def test_without_a_full_precision_stream_gptaq_is_left_out():
    """A layer source with only one stream (no load_pair): the method axis runs on it as it is, and GPTAQ,
    which needs both, is left out with a note; GPTQ's row is then the plain sweep's."""

    class OneStream:
        key = ("one-stream", 1)

        def load(self, progress=None, should_cancel=None):
            return SRC.load()

    sw = Sweeps(source=OneStream(), threaded=False, cache_dir="/nonexistent-cache", model="no-such-model")
    sw.run()
    plain = sw.grid[None]["gptq"].copy()
    sw.set(facet="method")
    assert not sw.paired() and "GPTAQ is left out" in sw.layer_info.value
    sw.run()
    assert sw.last_outcome == "done" and sw.errors == []
    assert np.all(np.isnan(sw.grid["GPTAQ"]["gptq"])) and sw.cells_done == 3 * 20 + 16
    np.testing.assert_array_equal(sw.grid["GPTQ"]["gptq"], plain)
    assert sw.mse_plot.figure.layout.title.text.startswith("Held-out output MSE")


def test_a_layer_lab_with_gptaq_sweeps_on_both_streams():
    lab = LayerLab(source=SyntheticSource(d_out=32, d_in=64, n_calib=256, n_heldout=128, seed=5), models={})
    lab.set(gptaq_alpha=0.25)
    sw = Sweeps(lab, threaded=False, cache_dir="/nonexistent-cache", model="no-such-model")
    assert sw.paired() and all(c.gptaq_alpha == 0.25 for *_, c in sw.configs())
    sw.run()
    assert sw.last_outcome == "done" and sw.errors == [] and np.all(np.isfinite(sw.grid[None]["gptq"]))
    assert sw.mse_plot.figure.layout.title.text.startswith("Distance from FP output")


def test_method_axis_perplexity_shows_the_shipped_method_table(tmp_path, monkeypatch):
    from gptq_explorer.services import results

    def report(method, bits, group, prose, **knobs):
        return {"model": "tiny-model", "method": method, "overrides": {},
                "config": QuantConfig(bits=bits, group_size=group, **knobs).to_dict(),
                "calibration": ({"corpus": "prose", "nsamples": 32, "seqlen": 512} if method == "gptq"
                                else None),
                "evaluation": {"tokens": 16384, "seqlen": 512},
                "perplexity": {"prose": prose, "code": 2 * prose}}

    monkeypatch.setenv("GPTQ_EXPLORER_RESULTS", str(tmp_path / "results"))
    table = {"rtn-w3-g128": report("rtn", 3, 128, 151.0), "gptq-w3-g128": report("gptq", 3, 128, 31.0),
             "gptaq-w3-g128": report("gptq", 3, 128, 27.25, gptaq_alpha=0.25),
             "gptq-had-w4-g128": report("gptq", 4, 128, 12.5, rotation="hadamard"),
             "gptq-order-w3-grow": report("gptq", 3, -1, 50.0, desc_act=True)}
    for name, r in table.items():
        results.write_json(results.method_dir("tiny-model") / f"{name}.json", r)
    cached = tmp_path / "cache" / "reports" / "tiny-model"  # computed here: GPTAQ at 4 bits, GPTQ at 3
    cached.mkdir(parents=True)
    (cached / "gptq-a.json").write_text(json.dumps(report("gptq", 4, 128, 13.0, gptaq_alpha=0.25)))
    (cached / "gptq-b.json").write_text(json.dumps(report("gptq", 3, 128, 99.0)))
    sw = Sweeps(source=SRC, threaded=False, cache_dir=tmp_path / "cache", model="tiny-model")
    # the plain panel: the paper's GPTQ only (a computed GPTAQ run is not GPTQ's, the method table apart)
    g = sw.perplexity_grid["gptq"]
    assert np.isfinite(g).sum() == 1 and g[SWEEP_BITS.index(3), SWEEP_GROUPS.index(128)] == 99.0
    sw.set(facet="method")  # the method axis: the method table by method and config
    grid = sw.perplexity_grid
    assert grid["rows"] == ["RTN", "GPTQ", "GPTAQ", "GPTQ + act-order", "GPTQ + rotation"]
    assert grid["cols"] == [(4, 128, True), (3, 128, True), (3, -1, True)]
    z = dict(((row, col), grid["z"][i, j]) for i, row in enumerate(grid["rows"])
             for j, col in enumerate(grid["cols"]))
    assert z["GPTAQ", (3, 128, True)] == 27.25 and z["GPTQ", (3, 128, True)] == 31.0  # the table's, not 99
    assert z["GPTAQ", (4, 128, True)] == 13.0 and z["GPTQ + act-order", (3, -1, True)] == 50.0
    assert np.isfinite(grid["z"]).sum() == 6
    text = sw.ppl_plot.figure.data[0].text
    assert text[2][0] == "13.00*" and text[2][1] == "27.25"  # * = computed here (another protocol)
    assert "reduced protocol: 32x512 prose calibration" in sw.ppl_plot.figure.layout.title.text
    sw.set(corpus="code")
    assert sw.perplexity_grid["z"][2, 1] == 54.5
    sw.set(facet="none")
    assert set(sw.perplexity_grid) == {"rtn", "gptq"}


def test_a_link_opens_the_method_axis():
    from gptq_explorer.ui.app import ExplorerApp

    src = SyntheticSource(d_out=32, d_in=64, n_calib=256, n_heldout=128, seed=7)
    app = ExplorerApp("tab=sweeps&sw.facet=method", source=src, models={},
                      sweeps_kwargs={"threaded": False, "cache_dir": "/nonexistent-cache",
                                     "model": "no-such-model"})
    sw = app.sweeps
    assert sw.facet.value == "method" and sw.last_outcome == "done" and sw.errors == []
    assert np.all(np.isfinite(sw.grid["GPTAQ"]["gptq"])) and "sw.facet=method" in app.state_query()
