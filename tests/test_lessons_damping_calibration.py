"""gptq_explorer.lessons.damping_calibration (lesson 6): damping, the spectrum of H, dead inputs and
calibration domains on synthetic layers; whole-model runs on a tiny random LLaMA; the seed runs' reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lessons_real_layers import as_real_layers

from gptq_explorer import QuantConfig, gptq_quantize
from gptq_explorer.lessons import damping_calibration as L
from gptq_explorer.lessons.bits_and_groups import model_storage
from gptq_explorer.lessons.measures import hessian_from, output_rel_error
from gptq_explorer.services.layer_source import SyntheticSource


def test_damping_sweep_and_spectrum(synth):
    layers = as_real_layers(synth)
    name = layers.names[0]
    rows = L.damping_sweep(layers, name, token_counts=(128, 1024), damps=(1e-3, 0.01, 0.5))
    assert len(rows) == 2 * 4
    r = L.row_at(rows, tokens=1024, damp_percent=0.01)
    H = hessian_from(layers.X_calib[(name, "prose")][:1024])
    Q = gptq_quantize(layers.W[name], H, QuantConfig()).weight
    assert r["held-out error"] == pytest.approx(output_rel_error(layers.W[name], Q, synth.H_heldout))
    assert L.best_damp(rows, 128)["method"] == "GPTQ"
    # few tokens (128 < 192 inputs): H is singular, its rank is the token count
    sp = L.spectrum(hessian_from(layers.X_calib[(name, "prose")][:128]), damps=(0.01,))
    assert sp["rank"] == 128 and sp["condition"] == float("inf")
    assert sp["damped"][0]["eigenvalues below lambda"] >= 192 - 128
    full = L.spectrum(synth.H, damps=(0.01, 0.1))
    assert full["rank"] == 192
    assert full["damped"][1]["condition"] < full["damped"][0]["condition"] < full["condition"]
    assert len(L.fig_damping(rows).data) == 4


def test_diag_profile_and_dead_input(synth):
    p = L.diag_profile(synth.H)
    assert p["dead"] == 0 and p["max/mean"] > 1 > p["min/mean"] > 0
    rows = L.dead_input_demo(synth.W, synth.X_calib, synth.X_heldout, channel=7, factors=(1.0, 1e-3, 0.0))
    alive, quiet, dead = rows
    assert alive["dead inputs found"] == quiet["dead inputs found"] == 0 and dead["dead inputs found"] == 1
    assert dead["channel weights: rel. change"] == pytest.approx(1.0)  # zeroed
    assert alive["channel weights: rel. change"] < 0.5
    assert dead["held-out error"] > alive["held-out error"]


def test_domain_study(synth):
    other = SyntheticSource(d_out=64, d_in=192, n_calib=1024, n_heldout=512, seed=9, rank=20).load()
    corpora = ("prose", "code")
    layers = as_real_layers(synth, corpora=corpora,
                       X_calib={"prose": np.asarray(synth.X_calib), "code": np.asarray(other.X_calib)},
                       X_heldout={"prose": np.asarray(synth.X_heldout), "code": np.asarray(other.X_heldout)})
    rows = L.domain_study(layers)
    assert [r["calibrated on"] for r in rows] == ["- (RTN)", "prose", "code", "prose + code"]
    by = {r["calibrated on"]: r for r in rows}
    # each domain's own calibration wins on its own held-out tokens (the inputs differ a lot here)
    assert by["prose"]["error on prose"] < by["code"]["error on prose"]
    assert by["code"]["error on code"] < by["prose"]["error on code"]
    W = layers.W[layers.names[0]]
    mix = np.concatenate([np.asarray(synth.X_calib)[:512], np.asarray(other.X_calib)[:512]])
    Q = gptq_quantize(W, hessian_from(mix), QuantConfig()).weight
    expected = output_rel_error(W, Q, other.H_heldout)
    assert by["prose + code"]["error on code"] == pytest.approx(expected)
    assert len(L.domain_summary(rows)) == 4
    sim = L.input_similarity(layers, layers.names[0])
    assert sim["held-out a vs b"] > sim["calibration a vs held-out a"]


def test_whole_model_run_on_tiny_model(tiny_lm):
    from gptq_explorer.data import calibration_windows, evaluation_ids
    from gptq_explorer.metrics import perplexity

    mixed = L.calibration_set(tiny_lm.tokenizer, "prose + code", 4, 32)
    assert mixed.shape == (4, 32)
    assert torch.equal(mixed[2:], calibration_windows(tiny_lm.tokenizer, "code", 2, 32, 0))
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    fp = L.whole_model_run(tiny_lm, None, "fp", nsamples=2, seqlen=32, eval_windows=2)
    ids = evaluation_ids(tiny_lm.tokenizer, "code", n_tokens=64)
    assert fp["ppl code"] == pytest.approx(perplexity(tiny_lm.model, ids, seqlen=32, progress=False).ppl)
    q = L.whole_model_run(tiny_lm, QuantConfig(bits=3, group_size=32), "gptq", "prose + code", nsamples=2,
                          seqlen=32, eval_windows=2)
    assert q["config"] == "3-bit g32 sym" and q["dead inputs"] >= 0
    assert q["bits per weight"] == pytest.approx(model_storage(tiny_lm, 3, 32)["linear bits per weight"])
    assert q["ppl prose"] != fp["ppl prose"] and q["seed"] == 0
    q1 = L.whole_model_run(tiny_lm, QuantConfig(bits=3, group_size=32), "gptq", "prose + code", nsamples=2,
                           seqlen=32, eval_windows=2, seed=1)  # other calibration windows, same eval tokens
    assert q1["seed"] == 1 and q1["ppl prose"] != q["ppl prose"]
    # a copy was quantized: the model itself is unchanged
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())


def test_calibration_seed_runs_summary_and_winners(tmp_path):
    import json

    ppl = {("prose", 0): (19.8, 16.8), ("code", 0): (18.8, 14.9), ("prose", 1): (19.5, 16.9),
           ("code", 1): (20.5, 15.1), ("prose", 2): (19.0, 17.0)}  # seed 2 lacks the code run
    for (calib, seed), (p, c) in ppl.items():
        run = {"method": "gptq", "calib": calib, "seed": seed, "ppl prose": p, "ppl code": c}
        (tmp_path / f"{calib}-{seed}.json").write_text(json.dumps(run))
    runs = L.calibration_seed_runs(tmp_path)
    assert [(r["calib"], r["seed"]) for r in runs] == [("code", 0), ("code", 1), ("prose", 0), ("prose", 1),
                                                       ("prose", 2)]
    summ = {r["calibrated on"]: r for r in L.seed_summary(runs)}
    assert summ["prose"]["seeds"] == 3 and summ["prose"]["prose: mean"] == pytest.approx(19.433333, rel=1e-6)
    assert (summ["code"]["code: lowest"], summ["code"]["code: highest"]) == (14.9, 15.1)
    wins = L.seed_winners(runs)
    assert [w["seed"] for w in wins] == [0, 1]  # seed 2 is incomplete
    assert [w["best on prose"] for w in wins] == ["code", "prose"]
    assert {w["best on code"] for w in wins} == {"code"}
    assert wins[1]["prose, calibrated on code"] == 20.5
    (tmp_path / "broken.json").write_text("{half")
    with pytest.raises(ValueError, match="broken.json is not a readable run"):
        L.calibration_seed_runs(tmp_path)
