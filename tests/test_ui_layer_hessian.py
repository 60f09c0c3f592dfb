"""The Layer Lab's Hessian view, driven from Python: opening it, its link key, following the run on screen
(stale, then recomputed), dead inputs, a model's layer, and errors shown in the page.

Synthetic layers (instant) and one tiny random model; the numbers themselves are checked in
test_views_hessian_view.py."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from gptq_explorer.engine import QuantConfig, gptq_quantize
from gptq_explorer.services.layer_source import LayerData, ModelSource, SyntheticSource
from gptq_explorer.ui import LayerLab
from gptq_explorer.ui import layer_hessian as hessian_module
from gptq_explorer.ui.layer_hessian import DONE_CLASS, HESSIAN_CLASS, STALE_CLASS
from gptq_explorer.views.hessian_view import hessian_view


def text(lab) -> str:
    return re.sub(r"<[^>]+>", " ", lab.hessian_text.value).replace("&#x27;", "'")


@dataclass(frozen=True)
class DeadInputs:
    """A small layer whose inputs 3, 10 and 40 are zero for every calibration token."""

    dead: tuple = (3, 10, 40)

    @property
    def key(self) -> tuple:
        return ("dead-inputs", self.dead)

    @property
    def seed(self) -> int:
        return 0

    def load(self, progress=None, should_cancel=None) -> LayerData:
        rng = np.random.default_rng(0)
        X = rng.standard_normal((512, 64)) * np.r_[10.0, np.ones(63)]
        X[:, list(self.dead)] = 0.0
        return LayerData(W=rng.standard_normal((32, 64)), X_calib=X[:384], X_heldout=X[384:],
                         name="dead-input layer", description="three inputs never fire")


def test_the_view_opens_and_closes():
    lab = LayerLab(models={}, threaded=False)
    assert lab.state()["hessian"] == 0 and lab.hessian_box.layout.display == "none"
    assert lab.hessian_numbers is None  # nothing computed while closed
    assert HESSIAN_CLASS in lab.hessian_box._dom_classes
    lab.set(hessian=1)
    assert lab.errors == [] and lab.hessian_box.layout.display == "flex" and lab.hessian_button.value
    v = lab.hessian_numbers
    assert v["n"] == 576 and v["n_dead"] == 0 and v["damp_used"] == lab.summary["damp_percent_used"] == 0.01
    again = hessian_view(lab.data.H, lab.run.cfg, damp_used=0.01)
    assert v["cond_damped"] == pytest.approx(again["cond_damped"])
    assert v["diag_spread"] == again["diag_spread"]
    np.testing.assert_allclose(v["eigenvalues"], np.linalg.eigvalsh(lab.data.H)[::-1], rtol=1e-9)
    words = text(lab)
    assert re.search(r"condition number [\d.e+]+ → [\d.e+]+ after damping \(λ = 0.01 × mean diag\(H\)", words)
    assert "dead inputs: 0 of 576" in words and "desc_act is off" in words and "max/median" in words
    assert "<svg" in lab.hessian_plot.value and lab.hessian_plot.value.count("<polyline") == 3
    assert DONE_CLASS in lab.hessian_status.value
    lab.hessian_box.children[0].children[1].click()  # close
    assert lab.hessian_box.layout.display == "none" and lab.state()["hessian"] == 0
    lab.hessian_button.value = True  # the toggle in the header
    assert lab.hessian_box.layout.display == "flex" and lab.state()["hessian"] == 1


def test_the_link_key_round_trips():
    lab = LayerLab.from_query("model=synthetic&hessian=1&damp_percent=0.001", models={})
    lab.wait(60)
    assert lab.errors == [] and lab.hessian_open and lab.hessian_numbers["damp_used"] == 0.001
    assert "λ = 0.001 × mean diag(H)" in text(lab)
    qs = lab.state_query()
    assert qs.endswith("&hessian=1") and "damp_percent=0.001" in qs
    lab._on_copy_link()
    assert "hessian=1" in lab.link.value
    again = LayerLab.from_query(qs, models={})
    again.wait(60)
    assert again.state() == lab.state() and again.hessian_open
    closed = LayerLab.from_query("hessian=0", models={}, threaded=False)
    assert not closed.hessian_open and closed.hessian_numbers is None
    values, problems = LayerLab.parse_query("hessian=2&bits=3")
    assert values == {"bits": 3} and "hessian='2' ignored" in problems[0]
    with pytest.raises(Exception, match="hessian"):
        lab.set(hessian=5)


def test_copy_link_of_the_app_includes_the_view():
    from gptq_explorer.ui.app import ExplorerApp

    app = ExplorerApp("model=synthetic&hessian=1", models={})
    app.layer_lab.wait(60)
    assert app.layer_lab.hessian_open
    app.layer_lab.copy_button.click()
    assert "hessian=1" in app.layer_lab.link.value and "tab=layer" in app.layer_lab.link.value


def test_a_knob_change_marks_the_numbers_stale_then_recomputes(monkeypatch):
    """A rotation needs a new spectrum (a background job): meanwhile the old numbers say they are stale.
    Another damping is a shift of the eigenvalues: at once, no job."""
    lab = LayerLab(models={}, state={"hessian": 1})
    lab.wait(60)
    before = lab.hessian_numbers
    assert not before["rotated"] and DONE_CLASS in lab.hessian_status.value
    go = threading.Event()
    real = hessian_module.hessian_spectrum

    def slow(H, cfg):
        go.wait(30)
        return real(H, cfg)

    monkeypatch.setattr(hessian_module, "hessian_spectrum", slow)
    lab.set(rotation="hadamard")
    assert STALE_CLASS in lab.hessian_status.value and "recomputing" in lab.hessian_status.value
    assert lab.hessian_numbers is before  # the old numbers, marked stale
    go.set()
    lab.wait(60)
    after = lab.hessian_numbers
    assert after["rotated"] and DONE_CLASS in lab.hessian_status.value and lab.errors == []
    assert "H' = R H Rᵀ" in text(lab) and "before the rotation" in text(lab)
    np.testing.assert_allclose(after["eigenvalues"], before["eigenvalues"], rtol=1e-8)  # R is orthogonal
    assert after["diag_spread"] < before["diag_spread"] / 10  # the outlier channels flattened

    lab.set(damp_percent=0.1)
    assert lab._hessian_job is None and lab.hessian_numbers["lam"] == pytest.approx(10 * after["lam"])
    assert lab.hessian_numbers["cond_damped"] < after["cond_damped"]
    lab.set(desc_act=True)
    assert "desc_act is on" in text(lab)

    lab.set(block=2)  # another layer: a new spectrum
    lab.wait(60)
    assert SyntheticSource(seed=2).name in lab.hessian_status.value
    assert lab.hessian_numbers["lambda_max"] != after["lambda_max"]


def test_a_closed_view_computes_nothing_until_opened(monkeypatch):
    lab = LayerLab(models={}, threaded=False)
    calls = []
    real = hessian_module.hessian_spectrum
    monkeypatch.setattr(hessian_module, "hessian_spectrum", lambda H, cfg: calls.append(1) or real(H, cfg))
    lab.set(bits=3, damp_percent=0.1)
    assert calls == []
    lab.set(hessian=1)
    assert calls == [1] and lab.hessian_numbers["damp_percent"] == 0.1


def test_dead_inputs_are_reported_as_the_engine_handles_them():
    lab = LayerLab(source=DeadInputs(), models={}, threaded=False, state={"hessian": 1})
    assert lab.errors == []
    v = lab.hessian_numbers
    assert v["n"] == 64 and list(v["dead"]) == [3, 10, 40]
    res = gptq_quantize(lab.data.W, lab.data.H, lab.run.cfg)
    assert list(np.flatnonzero(np.asarray(res.dead_columns))) == [3, 10, 40]
    assert "dead inputs: 3 of 64 (diag(H) == 0: inputs 3, 10, 40)" in text(lab)
    assert np.count_nonzero(np.isclose(v["eigenvalues"], 1.0, rtol=1e-9)) >= 3  # each dead input: diag 1


def test_the_text_tells_what_the_engine_did_when_damping_was_not_enough():
    """The x10 retry and the failure, in words (a calibrated H is positive semi-definite, so these need an
    indefinite one: the pure functions, as test_views_hessian_view builds them)."""
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((4, 4)))
    H = Q @ np.diag([1.0, 1.0, 1.0, -0.05]) @ Q.T
    cfg = QuantConfig(damp_percent=0.001, group_size=-1)
    words = hessian_module.hessian_html(hessian_view(H, cfg, damp_used=0.1), layer="L", tokens=9,
                                        desc_act=False)
    assert "condition number ∞ → " in words and "(λ = 0.1 × mean diag(H)" in words
    assert "failed at damp_percent 0.001, 0.01 (not positive definite): it retried ×10 2 times and used 0.1" \
        in words
    assert "without damping fails: it is not positive definite (1 eigenvalue ≤ 0)" in words
    svg = hessian_module.spectrum_svg(hessian_view(H, cfg, damp_used=0.1))
    assert "(or ≤ 0) drawn at" in svg  # the negative eigenvalue sits on the floor of the log scale
    bad = hessian_view(Q[:3, :3] @ np.diag([1.0, 1.0, -5.0]) @ Q[:3, :3].T, cfg)
    assert "failed at every damp_percent from 0.001 to 1" in hessian_module.hessian_html(
        bad, layer="L", tokens=9, desc_act=False)


def test_gptaq_uses_the_quantized_models_inputs():
    lab = LayerLab(models={}, threaded=False, state={"hessian": 1})
    plain = lab.hessian_numbers
    lab.set(gptaq_alpha=0.25)
    assert lab.errors == [] and "quantized model's inputs" in text(lab)
    np.testing.assert_allclose(lab.hessian_numbers["eigenvalues"], np.linalg.eigvalsh(lab.pair.H)[::-1],
                               rtol=1e-8)
    assert lab.hessian_numbers["lambda_max"] != plain["lambda_max"]


def test_a_model_layer(tmp_path):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    folder = str(make_tiny_model("llama", tmp_path / "llama"))
    src = ModelSource(model=folder, block=1, sublayer="mlp.down_proj", corpus="prose", nsamples=4, seqlen=32,
                      heldout_tokens=64)
    lab = LayerLab(source=src, models={}, threaded=False, state={"hessian": 1})
    assert lab.errors == [] and lab.data.name == src.name
    v = lab.hessian_numbers
    assert v["n"] == lab.data.W.shape[1] and np.all(np.isfinite(v["eigenvalues"]))
    assert v["damp_used"] == lab.summary["damp_percent_used"]
    assert src.name in lab.hessian_status.value and "condition number" in text(lab)


def test_an_error_shows_in_the_page(monkeypatch):
    def broken(H, cfg):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(hessian_module, "hessian_spectrum", broken)
    lab = LayerLab(models={}, threaded=False)
    lab.set(hessian=1)  # never raises into the kernel
    assert lab.errors and "did not converge" in lab.errors[-1] and "gptq-error" in lab.message.value
    assert lab.hessian_status.value == ""
    monkeypatch.undo()
    lab.set(bits=3)  # the next run computes it again
    assert lab.hessian_numbers is not None and lab.hessian_numbers["n"] == 576


def test_state_includes_the_key_once():
    lab = LayerLab(models={}, threaded=False)
    assert list(lab.state()).count("hessian") == 1 and lab.DEFAULTS["hessian"] == 0
    knobs = {k: v for k, v in lab.state().items() if k in lab.CONFIG_KEYS}
    assert QuantConfig.from_dict(knobs) == lab.config()
