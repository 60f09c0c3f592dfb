"""Layer Lab, driven from Python: set controls, then assert what the figures hold.

Uses the synthetic 576x576 source (instant); one test captures a tiny random model's activations.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from traitlets import TraitError

from gptq_explorer.engine import QuantConfig, gptq_steps
from gptq_explorer.ui import LabInputError, LayerLab, ModelSource, SyntheticSource
from gptq_explorer.ui import layer_animation as animation_module
from gptq_explorer.ui import layer_lab as lab_module
from gptq_explorer.ui.layer_figure import from_f32


@pytest.fixture(scope="module")
def lab():
    return LayerLab(models={})


def curve_end(lab, key):
    y = lab.figure.shown()[key]
    return float(y[~np.isnan(y)][-1])


def test_initial_view_is_complete(lab):
    assert lab.errors == []
    n = lab.run.n
    assert (n, lab.run.d_out) == (576, 576)
    for name in ("W", "updated", "Q", "error", "compensation"):
        z, rows, cols = lab.view(name)
        assert z.shape == (rows.size, cols.size) == (24, 32)
    assert lab.figure.shown()["diag_h"].size == n
    assert "Step 1 of 576" in lab.explain.value
    assert "GPTQ" in lab.summary_html.value and "tokens" in lab.summary_html.value


def test_bits_4_to_3_raises_the_output_error():
    lab = LayerLab(models={})
    lab.goto(575)
    before = dict(lab.summary)
    gptq4, rtn4 = curve_end(lab, "gptq"), curve_end(lab, "rtn")
    lab.set(bits=3)
    assert lab.run.cfg.bits == 3 and lab.errors == []
    after = lab.summary
    assert after["heldout_mse_gptq"] > 2 * before["heldout_mse_gptq"]
    assert after["heldout_mse_rtn"] > 2 * before["heldout_mse_rtn"]
    assert after["loss_gptq"] > before["loss_gptq"]
    assert curve_end(lab, "gptq") > gptq4 and curve_end(lab, "rtn") > rtn4  # the plotted running curves too
    assert after["heldout_mse_gptq"] < after["heldout_mse_rtn"]  # GPTQ still beats RTN
    assert "3-bit" in lab.summary_html.value


def test_desc_act_reorders_diag_h():
    lab = LayerLab(models={})
    plain = lab.figure.shown()["diag_h"]
    assert np.any(np.diff(plain) > 0)  # column order: not sorted
    lab.set(desc_act=True)
    ordered = lab.figure.shown()["diag_h"]
    assert np.all(np.diff(ordered) <= 0)  # processing order: descending diag(H)
    np.testing.assert_array_equal(np.sort(ordered), np.sort(plain))  # same values, permuted
    np.testing.assert_allclose(ordered, np.diag(lab.data.H)[lab.run.perm], rtol=1e-6)
    assert "decreasing diag(H)" in lab.figure.shown()["diag_title"]


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=128, desc_act=False),
                                 dict(bits=3, group_size=-1, desc_act=True, block_size=32)])
def test_heatmaps_match_the_engine_stepper(cfg):
    lab = LayerLab(models={})
    lab.set(**cfg, rows=16, cols=40, row0=200)
    data = lab.data
    stepper = gptq_steps(data.W, data.H, QuantConfig(**{**cfg, "block_size": cfg.get("block_size", 128)}))
    steps = list(stepper)
    U = stepper.prepared.U
    for k in (0, 37, 129, 400, 575):
        lab.goto(k)
        assert f"Step {k + 1} of 576" in lab.explain.value
        z, rows, cols = lab.view("updated")
        q, _, _ = lab.view("Q")
        comp, _, _ = lab.view("compensation")
        assert cols[0] <= k <= cols[-1] and list(rows) == list(range(200, 216))
        for j, c in enumerate(cols):
            if c <= k:  # quantized: the column as the stepper saw it, and its quantized value
                np.testing.assert_allclose(z[:, j], steps[c].weight[rows], rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(q[:, j], steps[c].quantized[rows], rtol=1e-5, atol=1e-7)
                assert np.all(np.isnan(comp[:, j]))
            else:  # not yet: W_perm[:, c] - sum over steps <= k of e_i U[i, c]
                state = stepper.prepared.W[rows, c] - sum(steps[i].error[rows] * U[i, c]
                                                          for i in range(k + 1))
                np.testing.assert_allclose(z[:, j], state, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(comp[:, j], steps[k].update[rows, c - k - 1], rtol=1e-5, atol=1e-9)
                assert np.all(np.isnan(q[:, j]))
        if k + 1 in cols:  # the next column is exactly what the stepper will quantize next
            j = list(cols).index(k + 1)
            np.testing.assert_allclose(z[:, j], steps[k + 1].weight[rows], rtol=1e-5, atol=1e-7)


def test_running_curves_are_the_obs_loss(lab):
    """GPTQ's curve is the engine's running OBS loss / d_out; it ends at the total loss."""
    run = lab.run
    np.testing.assert_allclose(run.curve_gptq[-1] * run.d_out, lab.summary["loss_gptq"], rtol=1e-9)
    assert run.curve_gptq[-1] < run.curve_rtn[-1]
    lab.goto(100)
    y = lab.figure.shown()["gptq"]
    assert np.all(np.isfinite(y[:101])) and np.all(np.isnan(y[101:]))


def test_navigation_and_boundaries():
    lab = LayerLab(models={})
    lab.set(group_size=128, block_size=32)
    lab.goto(5)
    lab.next_boundary("group")
    assert lab.col == 128
    lab.next_boundary("block")
    assert lab.col == 160
    lab.step(-1)
    assert lab.col == 159
    lab.goto(10_000)  # clamped
    assert lab.col == 575
    lab.next_boundary("group")
    assert lab.col == 575


def test_window_turns_pages_and_follows_the_cursor(lab):
    lab.set(cols=32, col=0)
    _, _, cols0 = lab.view("W")
    lab.goto(10)
    _, _, cols1 = lab.view("W")
    assert list(cols1) == list(cols0)  # still inside: the window stays
    lab.goto(31)
    _, _, cols2 = lab.view("W")
    assert cols2[0] <= 31 <= cols2[-1] and cols2[0] > 0


def test_hover_and_click_link_the_views(lab):
    """The view reports the column under the mouse (the synced `hover`) and draws it highlighted in every
    heatmap and in diag(H); highlight() sets it from Python; a click on a column jumps there."""
    lab.goto(50)
    _, _, cols = lab.view("W")
    col = int(cols[3])
    lab.fig.set_state({"hover": col})  # what the browser sends when the mouse is over that column
    assert lab._hover == col and lab.figure.shown()["hover"] == col
    lab.goto(51)  # a frame keeps the highlight
    assert lab.fig.hover == col and lab.figure.shown()["k"] == 51
    lab.fig.set_state({"hover": -1})  # the mouse left
    assert lab._hover is None and lab.figure.shown()["hover"] is None
    lab.highlight(col)
    assert lab.fig.hover == col
    lab.highlight(None)
    assert lab.fig.hover == -1
    lab.fig._handle_custom_msg({"event": "click", "col": 300}, [])  # a click on column 300 of diag(H)
    assert lab.col == 300 and lab.figure.shown()["k"] == 300
    _, _, cols = lab.view("W")
    assert cols[0] <= 300 <= cols[-1]


def test_state_query_round_trips():
    a = LayerLab(models={})
    a.set(bits=3, group_size=64, desc_act=True, sym=False, damp_percent=10 ** -1.75, block_size=32,
          rows=16, cols=40, row0=100, fps=10)
    a.goto(123)
    qs = a.state_query()
    b = LayerLab.from_query("?" + qs, models={})
    assert b.state() == a.state()
    assert b.play.value == b.col == 123  # a connecting browser copies Play onto the slider (jslink)
    assert b.errors == [] and "not used" not in b.message.value
    assert b.run.cfg == a.run.cfg
    np.testing.assert_array_equal(b.view("updated")[0], a.view("updated")[0])
    a._on_copy_link()
    assert qs.replace("&", "&amp;") in a.link.value


def test_bad_query_values_are_listed_not_applied():
    lab = LayerLab.from_query("bits=9&group_size=7&desc_act=maybe&foo=1&model=/etc&bits=3", models={})
    state = lab.state()
    assert state["bits"] == 3 and state["group_size"] == 128 and state["model"] == "synthetic"
    for word in ("bits", "group_size", "desc_act", "foo", "model"):
        assert word in lab.message.value
    with pytest.raises(LabInputError):
        LayerLab.from_query("bits=9", strict=True, models={})


def test_out_of_range_values_are_rejected(lab):
    state = lab.state()
    with pytest.raises(LabInputError, match="bits must be between 2 and 8"):
        lab.set(bits=9)
    assert lab.state() == state and "bits must be between 2 and 8" in lab.message.value
    with pytest.raises(LabInputError):
        lab.set(model="gpt2-evil")  # not in the curated list
    with pytest.raises(LabInputError):
        lab.set(group_size=100)
    # what a browser could send: sliders clamp, dropdowns and checkboxes reject
    lab.controls["rows"].set_state({"value": 10_000})
    assert lab.controls["rows"].value == 96
    with pytest.raises(TraitError):
        lab.controls["group_size"].set_state({"index": 99})
    with pytest.raises(TraitError):
        lab.controls["model"].set_state({"index": 42})
    with pytest.raises(TraitError):
        lab.controls["desc_act"].set_state({"value": "rm -rf"})
    assert lab.state()["group_size"] == state["group_size"] and lab.state()["model"] == "synthetic"
    assert lab.local_path is None  # no free-text box outside local mode


def test_a_failing_callback_shows_in_the_page(monkeypatch):
    lab = LayerLab(models={})
    shown = lab.run

    def boom(data, cfg):
        raise RuntimeError("boom: engine exploded")

    monkeypatch.setattr(lab_module, "compute_run", boom)
    lab.controls["bits"].value = 5  # as if the browser moved the slider: must not raise
    assert "boom: engine exploded" in lab.message.value and "Try:" in lab.message.value
    assert lab.run is shown  # the previous result stays on screen
    lab.fig._handle_custom_msg({"event": "click", "col": "not a number"}, [])  # a forged view message
    assert "expected an integer" in lab.message.value
    monkeypatch.undo()
    lab.controls["bits"].value = 3
    assert lab.run.cfg.bits == 3 and lab.message.value == ""


def test_presets_apply_and_then_go_custom():
    lab = LayerLab(models={})
    name = "3-bit: where RTN collapses"
    lab.preset.value = name
    assert lab.run.cfg.bits == 3 and lab.preset.value == name and "RTN" in lab.message.value
    lab.controls["desc_act"].value = True
    assert lab.preset.value == "(custom)"


def test_figures_stay_synced_for_late_browsers():
    """Voila: a browser that connects after a change draws the widget's synced state; it must hold the
    change (the scene and the frame travel as float32 buffers)."""
    lab = LayerLab(models={})
    emax4 = lab.figure.shown()["emax"]
    lab.set(bits=2)
    lab.goto(7)
    state = lab.fig.get_state()
    assert state["scene"]["emax"] == lab.figure.shown()["emax"] > 1.5 * emax4
    assert state["frame"]["k"] == 7 and state["frame"]["seq"] == lab.fig.seq
    z, rows, cols = lab.view("error")
    np.testing.assert_array_equal(from_f32(state["frame"]["z"]["error"]).reshape(z.shape),
                                  z.astype(np.float32).astype(np.float64))
    assert (state["frame"]["r0"], state["frame"]["c0"]) == (rows[0], cols[0])
    np.testing.assert_array_equal(from_f32(state["scene"]["curve_gptq"]),
                                  lab.run.curve_gptq.astype(np.float32))
    bundle = lab._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == lab.root.model_id


def test_synthetic_blocks_are_seeds(lab):
    lab.set(block=2)
    assert lab.data.name == SyntheticSource(seed=2).name
    assert lab.summary["heldout_mse_gptq"] > 0
    lab.set(block=0)


def test_model_source_captures_the_sublayer_inputs(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    from gptq_explorer.models import get_weight, load_model

    folder = str(make_tiny_model("llama", tmp_path / "llama"))
    src = ModelSource(model=folder, block=1, sublayer="mlp.down_proj", corpus="prose", nsamples=4, seqlen=32,
                      heldout_tokens=64)
    data = src.load()
    assert data.W.shape == (64, 96) and data.X_calib.shape == (128, 96) and data.X_heldout.shape == (64, 96)
    assert src.load() is data  # cached
    # the captured inputs are what the linear really sees: its output is W x
    lm = load_model(folder)
    mod = lm.adapter.linears(lm.adapter.get_blocks(lm.model)[1])["mlp.down_proj"]
    np.testing.assert_allclose(data.W, get_weight(mod).double().numpy())
    x = torch.tensor(data.X_calib[:8])
    np.testing.assert_allclose(mod(x).detach().numpy(), x.numpy() @ data.W.T, rtol=1e-4, atol=1e-5)

    lab = LayerLab(source=src, threaded=False, models={})
    assert lab.errors == [] and lab.run.n == 96
    assert list(lab.controls["block"].options) == [0, 1]
    assert "mlp.down_proj" in lab.controls["sublayer"].options
    assert not lab.controls["corpus"].disabled
    lab.set(sublayer="self_attn.q_proj")
    assert lab.data.W.shape == (64, 64) and lab.state()["sublayer"] == "self_attn.q_proj"
    with pytest.raises(LabInputError):
        lab.set(block=7)
    lab.set(model="synthetic")
    assert lab.run.n == 576 and list(lab.controls["block"].options) == [0, 1, 2, 3]
    assert lab.controls["corpus"].disabled


def test_background_load_can_be_cancelled(tmp_path):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    folder = str(make_tiny_model("opt", tmp_path / "opt"))
    lab = LayerLab(models={folder: "tiny opt"})  # threaded
    lab.set(model=folder)
    lab.wait(60)
    assert lab.errors == [] and lab.state()["model"] == folder and lab.run.n == 64
    assert lab.progress_box.layout.display == "none"

    def slow_cancelled(self, progress=None, should_cancel=None):
        lab._on_cancel()
        assert should_cancel()
        from gptq_explorer.services.layer_source import Cancelled
        raise Cancelled("cancelled")

    orig = ModelSource.load
    ModelSource.load = slow_cancelled
    try:
        lab.set(block=1)
        lab.wait(60)
    finally:
        ModelSource.load = orig
    assert "Cancelled" in lab.message.value
    assert lab.state()["block"] == 0 and lab.run.n == 64  # back to what is on screen


def test_from_query_without_a_model_uses_the_given_source():
    lab = LayerLab.from_query("bits=3&col=7", source=SyntheticSource(seed=2), models={})
    assert lab.data.name == SyntheticSource(seed=2).name
    assert lab.run.cfg.bits == 3 and lab.col == 7 and lab.state()["block"] == 2


def drawn(lab, seq=None):
    """The view's answer after drawing a frame (what layer_canvas.js sends)."""
    lab.fig._handle_custom_msg({"event": "drawn", "seq": lab.fig.seq if seq is None else seq}, [])


def test_a_frozen_figure_is_rebuilt(monkeypatch):
    """anywidget gives a widget's view 2 s to start; a busy browser missed it (with plotly's 5 MB
    FigureWidget) and the figure then never drew, or dropped every later update. The view answers the frames
    it drew with their seq; frames unanswered for FIGURE_STALE_S (while the page probe says a browser shows
    the page) mean frozen: the lab replaces the figure by a fresh widget holding the same state."""
    import time

    lab = LayerLab(models={})
    assert lab.probe in lab.root.children and lab.fig in lab._fig_box.children
    assert "gptq-layer-figure" in lab.fig._dom_classes
    assert not lab.figure_frozen(time.monotonic() + 100)  # no browser has drawn it yet
    drawn(lab)  # a browser drew it
    assert lab._figure_alive and lab._answered_id == lab.fig.seq
    assert not lab.figure_frozen(time.monotonic() + 100)  # nothing waiting
    lab.set(bits=3)
    lab.goto(40)
    now = time.monotonic()
    assert lab.figure_frozen(now + animation_module.FIGURE_STALE_S + 1) and not lab.figure_frozen(now)
    drawn(lab, lab.fig.seq - 1)  # an older frame: still waiting for the last
    assert lab.figure_frozen(now + animation_module.FIGURE_STALE_S + 1)
    drawn(lab)
    assert not lab.figure_frozen(now + 100)  # answered: alive

    old, before = lab.fig, lab.view("updated")
    sent = []
    monkeypatch.setattr(lab.probe, "send", lambda content, buffers=None: sent.append(content))
    lab._figure_alive = False
    lab._on_probe(lab.probe, {"event": "figure", "drawn": False, "seconds": 60}, [])  # never drew
    assert lab.figure_rebuilds == 1 and lab.fig is not old and lab._fig_box.children[0] is lab.fig
    assert sent == [{"watch": True}] and "gptq-layer-figure" in lab.fig._dom_classes
    for a, b in zip(lab.view("updated"), before):
        np.testing.assert_array_equal(a, b)  # the same state, in the new figure
    assert lab.fig.get_state()["frame"] == old.get_state()["frame"]
    assert lab.fig.get_state()["scene"] == old.get_state()["scene"]
    lab.fig.set_state({"hover": 45})  # the new widget is wired: hover and click reach the lab
    assert lab._hover == 45
    lab.fig._handle_custom_msg({"event": "click", "col": 42}, [])
    assert lab.col == 42

    # the watchdog thread: started by the probe, rebuilds a figure whose frames go unanswered
    monkeypatch.setattr(animation_module, "FIGURE_STALE_S", 0.3)
    lab._on_probe(lab.probe, {"event": "rendered"}, [])
    lab._on_probe(lab.probe, {"event": "figure", "drawn": True, "seconds": 2}, [])  # the new one drew
    lab.goto(41)  # and takes the frame ...
    assert lab.view("updated")[2][0] <= 41 <= lab.view("updated")[2][-1]
    deadline = time.monotonic() + 20
    while lab.figure_rebuilds < 2 and time.monotonic() < deadline:  # ... but never answers it
        time.sleep(0.05)
    lab._closed = True
    assert lab.figure_rebuilds == 2
    assert lab.fig.get_state()["frame"]["k"] == 41


def test_browser_messages_wait_for_figure_updates_in_other_threads():
    """ipywidgets applies a browser message (the hover position) inside traitlets'
    hold_trait_notifications, per object, not per thread; the lab applies browser messages under the lock
    its updates hold (the background model load updates the figure from another thread)."""
    import threading
    import time

    lab = LayerLab(source=SyntheticSource(d_out=32, d_in=64, n_calib=256, n_heldout=128), models={})
    held = threading.Event()

    def update_in_background():
        with lab._lock:  # as _show_data / _render_full do
            held.set()
            time.sleep(0.5)

    t = threading.Thread(target=update_in_background)
    t.start()
    held.wait(5)
    t0 = time.monotonic()
    lab.fig.set_state({"hover": 5})  # a browser message for the figure (a hover)
    assert time.monotonic() - t0 > 0.3  # it waited for the update to finish
    t.join()
    assert lab._hover == 5


def test_the_dashboards_skip_jsonschemas_slow_iri_checker():
    """rfc3987_syntax builds a Lark grammar at import (seconds of every kernel start, via plotly's
    FigureWidget -> nbformat -> jsonschema); importing the dashboards first makes jsonschema skip it, and
    jsonschema (which nbformat uses) still validates."""
    import subprocess
    import sys

    code = ("import sys, gptq_explorer.ui, plotly.graph_objects as go, jsonschema\n"
            "go.FigureWidget()\n"
            "assert sys.modules['rfc3987_syntax'] is None\n"
            "jsonschema.validate({'a': 1}, {'properties': {'a': {'type': 'integer'}}})\n"
            "try:\n"
            "    jsonschema.validate({'a': 'x'}, {'properties': {'a': {'type': 'integer'}}})\n"
            "    raise SystemExit('jsonschema accepted a bad document')\n"
            "except jsonschema.ValidationError:\n"
            "    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]



def test_playing_sends_frames_ahead_and_the_view_runs_the_clock(monkeypatch):
    """While playing, the page's view advances the cursor itself (jslinked to the Play control, whose own
    timer is parked), through frames the kernel sends ahead: each exactly the frame the kernel would draw
    at that column, sent once per generation (run + crop), and not again as the synced frame."""
    lab = LayerLab(models={})
    assert lab.play.interval == animation_module.PLAY_PARKED_MS and lab.fig.fps == 15
    lab.controls["fps"].value = 10
    assert lab.fig.fps == 10
    sent = []
    monkeypatch.setattr(lab.fig, "send", lambda content, buffers=None: sent.append((content, buffers)))
    lab.goto(100)
    lab.fig.playing = True  # what jslink does when the Play button is pressed
    (msg, bufs), = sent
    ks = [m["k"] for m in msg["frames"]]
    assert msg["event"] == "ahead" and ks == list(range(101, 101 + animation_module.AHEAD_FRAMES))
    assert len(bufs) == 7 * len(ks) and msg["gen"] == lab.figure.gen
    # frame 105 as sent ahead == what the kernel shows at column 105
    i = ks.index(105)
    ahead = {name: from_f32(bufs[7 * i + j]) for j, name in enumerate(("W", "updated", "Q", "error",
                                                                          "compensation"))}
    seq = lab.fig.seq
    lab.controls["col"].value = 105  # the slider follows the view's cursor
    assert lab.figure.shown()["seq"] == seq  # the view has it: no synced frame sent again
    for name, z in ahead.items():
        np.testing.assert_array_equal(z, lab.view(name)[0].astype(np.float32).ravel())
    (msg2, _), = sent[1:]
    assert [m["k"] for m in msg2["frames"]] == [101 + animation_module.AHEAD_FRAMES + j for j in range(5)]
    lab.controls["col"].value = 106
    lab.play.playing = lab.fig.playing = False  # paused: the synced frame is the column shown
    assert lab.fig.seq > seq and lab.figure.shown()["k"] == 106
    gen = lab.figure.gen
    lab.set(rows=16)  # another crop: frames sent ahead are void
    assert lab.figure.gen > gen and lab.fig.scene["gen"] == lab.figure.gen
    gen = lab.figure.gen
    sent.clear()
    lab.set(bits=3)  # another run too; once the view has drawn it, it gets the next frames ...
    assert lab.figure.gen > gen and sent == []  # (not before: that would delay the redraw)
    lab.figure.on_answer({"trace_edit_id": lab.fig.seq})  # the view's "drawn"
    (msg3, _), = sent
    assert msg3["gen"] == lab.figure.gen and [m["k"] for m in msg3["frames"]] == list(range(107, 127))
    lab.figure.on_answer({"trace_edit_id": lab.fig.seq})  # once per run and crop
    assert len(sent) == 1
    sent.clear()
    lab.fig.playing = True  # ... so pressing Play needs no message from the kernel
    assert sent == []


def test_the_kernel_does_not_push_the_column_back_while_playing():
    lab = LayerLab(models={})
    lab.play.playing = True
    lab.play.value = 40  # the page's Play is ahead ...
    lab.controls["col"].value = 37  # ... of the slider value the kernel receives
    assert lab.play.value == 40
    lab.play.playing = False
    lab.controls["col"].value = 12
    assert lab.play.value == 12
    lab.controls["col"].set_state({"value": 30})  # a column from the browser: the Play has it there already
    assert lab.play.value == 12 and lab.col == 30
    lab.goto(50)  # a column set here goes to the Play (a browser connecting later copies it to the slider)
    assert lab.play.value == 50


def _tiny_llama_source(tmp_path, **kw):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    folder = str(make_tiny_model("llama", tmp_path / "llama"))
    return ModelSource(model=folder, corpus="prose", nsamples=4, seqlen=32, heldout_tokens=64, **kw)


def test_a_deferred_load_waits_for_the_figure_to_draw(tmp_path):
    """In Voila the model's layer loads once the page has drawn the figure (not while it opens); the
    timer starts it if the page never answers; a layer picked before then cancels it."""
    src = _tiny_llama_source(tmp_path, block=1)
    lab = LayerLab(source=src, models={}, defer_load_s=60)
    assert lab.data.name.startswith("synthetic") and lab._job is None and lab._deferred == src
    assert "Loading" in lab.message.value
    time.sleep(0.3)
    assert lab._job is None  # nothing drawn yet: still waiting
    drawn(lab)
    assert lab._deferred is None and lab._job is not None
    lab.wait(60)
    assert lab.errors == [] and lab.data.name == src.name and lab.run.n == 64

    # the page never answers: the timer starts it
    other = dataclasses.replace(src, block=0)
    lab2 = LayerLab(source=other, models={}, defer_load_s=0.2)
    assert lab2.data.name.startswith("synthetic")
    t0 = time.monotonic()
    while lab2._job is None and lab2.data.name != other.name and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    lab2.wait(60)
    assert lab2.data.name == other.name

    # the user picks the synthetic layer before the figure drew: the deferred load is dropped
    lab3 = LayerLab(source=dataclasses.replace(src, sublayer="mlp.up_proj"), models={}, defer_load_s=60)
    lab3.set(model="synthetic", block=2)
    drawn(lab3)
    assert lab3._deferred is None and lab3._job is None and lab3.data.name == SyntheticSource(seed=2).name


def test_a_captured_layer_shows_at_once(tmp_path):
    """A layer in the cache (the app's preload, while the preheated kernel waited) is the first view: no
    synthetic layer, no background job."""
    src = _tiny_llama_source(tmp_path, block=1, sublayer="mlp.down_proj")
    data = src.load()
    lab = LayerLab(source=src, models={}, defer_load_s=60)
    assert lab.data is data and lab._job is None and lab._deferred is None and lab.errors == []
    assert list(lab.controls["block"].options) == [0, 1] and lab.state()["sublayer"] == "mlp.down_proj"
    assert lab.message.value == ""


def test_captures_run_one_at_a_time(tmp_path):
    """Two threads capturing layers of one shared model: each forward hook stops the pass, so concurrent
    captures used to stop each other ('never reached the chosen sublayer'); now the second waits, and
    the same layer asked twice is captured once."""
    import threading

    src = _tiny_llama_source(tmp_path, block=0, sublayer="self_attn.v_proj")
    srcs = [src, src, dataclasses.replace(src, sublayer="mlp.gate_proj"),
            dataclasses.replace(src, block=1, sublayer="self_attn.o_proj")]
    results, errors = [None] * len(srcs), []

    def load(i):
        try:
            results[i] = srcs[i].load()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(srcs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert results[0] is results[1]
    assert [r.name for r in results] == [s.name for s in srcs]
    assert results[2].X_calib.shape == (128, 64) and results[3].X_calib.shape == (128, 64)


# ------------------------------------------------------------------ the methods beyond the 2022 paper


def test_every_method_knob_has_a_control_in_a_collapsed_section():
    from gptq_explorer.ui.layer_methods import METHOD_KEYS

    lab = LayerLab(models={})
    assert set(METHOD_KEYS) <= set(lab.KNOBS) and set(METHOD_KEYS) <= set(lab.CONFIG_KEYS)
    section = lab.method_section.children[0].children
    assert [lab.controls[k] for k in METHOD_KEYS] == list(section)
    assert lab.method_section.selected_index is None  # collapsed: the default view stays short
    assert lab.method.value == "GPTQ" and lab.controls["basis"].layout.display == "none"
    assert lab.controls["rotation_seed"].disabled  # no rotation: the seed does nothing


def test_the_method_menu_sets_the_knobs_and_follows_them():
    from gptq_explorer.ui.layer_methods import COMBINED, METHODS

    lab = LayerLab(source=SyntheticSource(d_out=64, d_in=256, n_calib=512, n_heldout=256), models={})
    lab.set(bits=3, ternary=True)
    for name, (changes, _) in [*METHODS.items(), ("GPTQ", ({}, ""))]:
        lab.method.value = name  # as the browser's menu does
        assert lab.errors == [] and lab.method.value == name
        cfg = lab.run.cfg
        assert cfg.bits == 3 and {k: getattr(cfg, k) for k in changes} == changes
        assert name in lab.message.value
    assert lab.run.cfg == QuantConfig(bits=3)  # "GPTQ" sets every method knob back
    lab.set(ternary=True)
    assert lab.method.value == "ternary" and lab.controls["bits"].disabled
    lab.set(ternary=False, mse_norm=2.4, gptaq_alpha=0.25)
    assert lab.method.value == COMBINED and not lab.controls["bits"].disabled
    # GAR replaces desc_act, and gives a per-row grid groups to order
    lab.set(mse_norm=0.0, gptaq_alpha=0.0, desc_act=True, group_size=-1)
    lab.method.value = "GPTQ + GAR"
    assert lab.run.cfg == QuantConfig(bits=3, group_aware=True, group_size=128)


def test_gar_and_desc_act_cannot_both_be_on():
    lab = LayerLab(models={})
    with pytest.raises(LabInputError, match="two column orders"):
        lab.set(group_aware=True, desc_act=True)
    assert not lab.controls["group_aware"].value and lab.run.cfg == QuantConfig()
    # a browser ticks both: the last one ticked wins, and the page says so
    lab.controls["desc_act"].value = True
    lab.controls["group_aware"].value = True
    assert not lab.controls["desc_act"].value and lab.run.cfg == QuantConfig(group_aware=True)
    assert "desc_act is off now" in lab.message.value
    lab.controls["group_size"].value = -1
    assert lab.run.cfg == QuantConfig(group_size=-1) and "GAR is off now" in lab.message.value
    both = LayerLab.from_query("group_aware=1&desc_act=1", models={})  # a link with both
    assert both.run.cfg == QuantConfig(desc_act=True) and both.errors == []


def test_links_round_trip_every_knob():
    a = LayerLab(models={})
    a.set(bits=3, group_size=64, mse_norm=2.4, gptaq_alpha=0.5, rotation="hadamard", rotation_seed=7,
          ternary=False, basis="original", damp_percent=0.1)
    a.goto(77)
    qs = a.state_query()
    assert "rotation=hadamard" in qs and "rotation_seed=7" in qs and "basis=original" in qs
    b = LayerLab.from_query(qs, models={})
    assert b.state() == a.state() and b.errors == [] and b.run.cfg == a.run.cfg
    np.testing.assert_array_equal(b.view("correction")[0], a.view("correction")[0])
    c = LayerLab.from_query(LayerLab(models={}).state_query(), models={})  # rotation=None reads back
    assert c.state()["rotation"] is None and c.controls["rotation"].label == "none"
    d = LayerLab.from_query("group_aware=1&ternary=1&rotation=nonsense", models={})
    assert d.run.cfg == QuantConfig(group_aware=True, ternary=True) and "rotation" in d.message.value


def test_gptaq_fits_the_full_precision_output():
    """GPTAQ on the synthetic layer: its data is both streams (the quantized model's inputs, about 11% off
    the full-precision ones), its steps carry the correction w (x) P, and on held-out tokens it is closer
    to the full-precision model's output than plain GPTQ on the same inputs (0.040 vs 0.053), at the cost
    of its own inputs' error (0.020 vs 0.018)."""
    lab = LayerLab(models={})
    assert lab.pair is None  # the default view never made the second stream
    lab.set(gptaq_alpha=0.25, rows=16, cols=40, row0=100)
    pair, s = lab.pair, lab.summary
    assert pair.has_fp and lab.data.X_calib is pair.X_calib_fp and lab.run.P is not None
    rel = np.linalg.norm(pair.X_calib - pair.X_calib_fp) / np.linalg.norm(pair.X_calib_fp)
    assert 0.05 < rel < 0.2
    assert s["heldout_fp_mse_gptq"] < 0.85 * s["heldout_fp_mse_gptq0"]
    assert s["heldout_mse_gptq"] > s["heldout_mse_gptq0"]
    assert s["heldout_fp_mse_gptq"] < s["heldout_fp_mse_rtn"]
    assert "GPTAQ" in lab.summary_html.value and "full-precision output" in lab.summary_html.value
    assert "GPTAQ (α = 0.25)" in lab.explain.value
    steps = list(gptq_steps(pair.W, pair.H, lab.run.cfg, dXXT=pair.dXXT))
    rows = np.arange(100, 116)
    for k in (0, 130, 400):
        lab.goto(k)
        comp, _, cols = lab.view("compensation")
        corr, _, _ = lab.view("correction")
        upd, _, _ = lab.view("updated")
        for j, c in enumerate(cols):
            if c > k:
                np.testing.assert_allclose(comp[:, j], steps[k].update[rows, c - k - 1], rtol=1e-6,
                                           atol=1e-10)
                np.testing.assert_allclose(corr[:, j], steps[k].correction[rows, c - k - 1], rtol=1e-6,
                                           atol=1e-12)
            if c == k + 1:  # the next column as the stepper will take it: the corrections are in the state
                np.testing.assert_allclose(upd[:, j], steps[k + 1].weight[rows], rtol=1e-6, atol=1e-10)
    assert np.abs(corr[:, cols > k]).max() > 0
    assert "correction" in lab.figure.shown()["panels"]


def test_gptaq_frames_sent_ahead_carry_the_correction(monkeypatch):
    lab = LayerLab(models={})
    lab.set(gptaq_alpha=0.25)
    sent = []
    monkeypatch.setattr(lab.fig, "send", lambda content, buffers=None: sent.append((content, buffers)))
    lab.goto(10)
    lab.fig.playing = True
    (msg, bufs), = sent
    assert msg["names"] == ["W", "updated", "Q", "error", "compensation", "correction"]
    assert len(bufs) == 8 * len(msg["frames"])  # six views, w and q
    lab.controls["col"].value = 11
    np.testing.assert_array_equal(from_f32(bufs[5]), lab.view("correction")[0].astype(np.float32).ravel())


def test_rotation_works_in_the_rotated_basis_with_a_toggle_back():
    """Rotated, the views are the stepper's (W R^T); diag(H) is diag(R H R^T), much flatter than diag(H)
    (the outlier channels spread); in the original basis the W view is W again, and the error of the first
    rounded column already touches every original input."""
    lab = LayerLab(models={})
    lab.set(rotation="hadamard", rows=16, cols=32, row0=40)
    run, data = lab.run, lab.data
    R = run.R
    assert R is not None and lab.controls["basis"].layout.display == "flex"
    np.testing.assert_allclose(R @ R.T, np.eye(576), atol=1e-12)
    shown = lab.figure.shown()
    np.testing.assert_allclose(shown["diag_h"], np.diag(R @ data.H @ R.T)[run.perm], rtol=1e-5)
    flat = shown["diag_h"].max() / np.median(shown["diag_h"])
    peaky = np.diag(data.H).max() / np.median(np.diag(data.H))
    assert flat < peaky / 10, (flat, peaky)
    assert shown["basis"] == "rotated" and "diag(R H Rᵀ)" in shown["diag_title"]
    steps = list(gptq_steps(data.W, data.H, run.cfg))
    np.testing.assert_allclose(lab.view("Q")[0][:, 0], steps[0].quantized[40:56], rtol=1e-6)
    lab.goto(0)
    err_rot = lab.view("error")[0]
    assert np.isnan(err_rot[:, 1:]).all()  # rotated: one column rounded so far
    lab.set(basis="original")
    shown = lab.figure.shown()
    assert shown["basis"] == "original" and shown["titles"]["W"] == "W (original basis)"
    np.testing.assert_allclose(lab.view("W")[0], data.W[40:56, :32], atol=1e-12)
    assert np.all(np.abs(lab.view("error")[0]) > 0)  # ... already spread over every original input
    lab.goto(575)  # the end: the layer in the original basis is the engine's result
    from gptq_explorer.engine import gptq_quantize

    Wq = gptq_quantize(data.W, data.H, run.cfg).weight
    _, _, cols = lab.view("updated")
    np.testing.assert_allclose(lab.view("updated")[0], Wq[40:56, cols], atol=1e-10)
    np.testing.assert_allclose(lab.view("Q")[0], Wq[40:56, cols], atol=1e-10)


def test_gar_keeps_groups_together_on_the_diag_strip():
    lab = LayerLab(models={})
    lab.set(group_aware=True, group_size=64)
    run, shown = lab.run, lab.figure.shown()
    bands = shown["bands"]
    assert [b - a for a, b, _ in bands] == [64] * 9 and "GAR order" in shown["diag_title"]
    diag = np.diag(lab.data.H)
    maxima = []
    for a, b, g in bands:
        assert set(run.perm[a:b] // 64) == {g}  # one original group, kept together
        assert np.all(np.diff(shown["diag_h"][a:b]) <= 0)  # inside it: by diag(H)
        maxima.append(diag[g * 64:(g + 1) * 64].max())
    assert maxima == sorted(maxima, reverse=True)  # groups by their largest diag(H)
    assert sorted(g for _, _, g in bands) == list(range(9))
    lab.goto(70)
    assert "GAR: original group" in lab.explain.value


def test_the_compare_view_has_a_row_per_method():
    """Every method on the synthetic layer, the same data: finite errors, GPTQ's number is the main view's,
    and on the quantized model's inputs GPTAQ is closer to the full-precision output than GPTQ (0.040 vs
    0.053) and RTN the farthest of the 4-bit methods; one click animates a method."""
    from gptq_explorer.ui.layer_methods import METHODS

    lab = LayerLab(models={})
    gptq_heldout = lab.summary["heldout_mse_gptq"]
    assert lab.compare_box.layout.display == "none"
    lab.compare()
    lab.wait(120)
    rows = {r["method"]: r for r in lab.compare_rows}
    assert list(rows) == ["RTN", *METHODS] and lab.errors == []
    assert lab.compare_box.layout.display == "flex" and "gptq-compare-done" in lab.compare_status.value
    for name, r in rows.items():
        assert np.isfinite(r["heldout_fp"]) and r["seconds"] > 0
        assert (r["heldout"] is None) == (name == "GPTAQ")
        assert r["heldout"] is None or np.isfinite(r["heldout"])
    assert rows["GPTQ"]["heldout"] == pytest.approx(gptq_heldout, rel=1e-9)
    assert rows["GPTAQ"]["heldout_fp"] < 0.85 * rows["GPTQ"]["heldout_fp"]
    four_bit = [r["heldout_fp"] for n, r in rows.items() if n not in ("RTN", "ternary")]
    assert rows["RTN"]["heldout_fp"] > max(four_bit)
    assert rows["GPTQ + rotation"]["heldout"] < rows["GPTQ"]["heldout"]  # the outlier channels
    assert lab.pair is not None  # GPTAQ's data is ready for its button
    cells = lab.compare_table.children
    assert len(cells) == 6 * (1 + len(rows))
    button = cells[6 * (1 + list(rows).index("GPTAQ")) + 4]
    button.click()
    assert lab.run.cfg == QuantConfig(gptaq_alpha=0.25) and lab.play.playing and lab.fig.playing
    assert lab.method.value == "GPTAQ" and "gptq-compare-done" in lab.compare_status.value  # still valid
    lab.play.playing = lab.fig.playing = False
    lab.set(bits=3)
    assert "press <b>Compare methods</b> again" in lab.compare_status.value
    lab._close_compare()
    assert lab.compare_box.layout.display == "none"


def test_the_synthetic_pair_is_deterministic():
    from gptq_explorer.services import layer_source

    a = SyntheticSource(seed=1).load_pair()
    assert SyntheticSource(seed=1).load_pair() is a  # cached
    W, X, Xh, name, _ = a  # still unpacks as five
    assert X is a.X_calib and name == SyntheticSource(seed=1).name
    layer_source._SYNTH_CACHE.clear()
    b = SyntheticSource(seed=1).load_pair()
    np.testing.assert_array_equal(a.X_calib, b.X_calib)
    np.testing.assert_array_equal(a.X_calib_fp, SyntheticSource(seed=1).load().X_calib)
    plain = SyntheticSource(seed=1).load()
    assert not plain.has_fp and plain.heldout_fp_mse(plain.W * 0.9) == pytest.approx(
        np.mean((plain.X_heldout @ (0.1 * plain.W).T) ** 2), rel=1e-9)
    with pytest.raises(ValueError, match="load_pair"):
        _ = plain.dXXT


def test_a_model_layers_two_streams(tmp_path):
    """ModelSource.load_pair: the layer's inputs in the full-precision model (equal to load()'s) and in the
    model with the blocks before it rounded; block 0 sees the same inputs in both. GPTAQ on a model's layer
    captures them once it is picked (the default view never does)."""
    src = _tiny_llama_source(tmp_path, block=1, sublayer="self_attn.q_proj")
    plain, pair = src.load(), src.load_pair()
    assert src.load_pair() is pair and src.cached_pair() is pair
    np.testing.assert_allclose(pair.X_calib_fp, plain.X_calib, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pair.X_heldout_fp, plain.X_heldout, rtol=1e-6, atol=1e-6)
    assert np.linalg.norm(pair.X_calib - pair.X_calib_fp) > 0.01 * np.linalg.norm(pair.X_calib_fp)
    first = dataclasses.replace(src, block=0).load_pair()
    np.testing.assert_array_equal(first.X_calib, first.X_calib_fp)  # nothing before it
    assert np.all(first.dXXT == 0) and "GPTAQ is GPTQ here" in first.description

    other = dataclasses.replace(src, sublayer="mlp.up_proj")
    lab = LayerLab(source=other, threaded=False, models={})
    assert lab.pair is None and other.cached_pair() is None
    lab.set(gptaq_alpha=0.25)
    assert lab.errors == [] and lab.pair is other.cached_pair() and lab.run.P is not None
    assert "heldout_fp_mse_gptq" in lab.summary
    lab.compare()
    assert {r["method"] for r in lab.compare_rows} >= {"RTN", "GPTAQ"} and lab.errors == []
