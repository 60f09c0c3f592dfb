"""gptq_explorer.lessons_design: the logic behind notebooks 04-06, checked against direct computations.

Synthetic layers and a tiny random LLaMA keep these fast; the notebooks assert the real-model numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_models import make_tiny_model, one_thread  # noqa: F401

from gptq_explorer import QuantConfig, gptq_quantize, lessons, rtn_quantize
from gptq_explorer import lessons_design as D
from gptq_explorer.ui.layer_source import SyntheticSource


@pytest.fixture(scope="module")
def synth():
    """A correlated synthetic layer 64 x 192 (g128 leaves a last group of 64, like SmolLM2's 576)."""
    return SyntheticSource(d_out=64, d_in=192, n_calib=1024, n_heldout=512, seed=5, rank=20).load()


def as_real_layers(data, name="model.layers.3.mlp.down_proj", corpora=("prose",), X_calib=None,
                   X_heldout=None):
    """Wrap LayerData as RealLayers (one layer, one or more 'corpora')."""
    X_calib = X_calib or {c: np.asarray(data.X_calib) for c in corpora}
    X_heldout = X_heldout or {c: np.asarray(data.X_heldout) for c in corpora}
    return D.RealLayers([name], {name: np.asarray(data.W, dtype=np.float64)},
                        {(name, c): X_calib[c] for c in corpora}, {(name, c): X_heldout[c] for c in corpora},
                        tuple(corpora), 4, 256, X_heldout[corpora[0]].shape[0])


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from gptq_explorer.models import load_model

    folder = make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")
    return load_model(str(folder))


# ---------------------------------------------------------------------------------------------------------
# common


def test_capture_inputs_matches_a_plain_hook(tiny_lm):
    from gptq_explorer.models import quantizable_modules

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ids = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    got = D.capture_inputs(tiny_lm, names, ids, batch_size=2)
    seen = {n: [] for n in names}
    mods = quantizable_modules(tiny_lm.model)
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
          for n in names]
    with torch.no_grad():
        tiny_lm.model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    for n in names:
        assert got[n].shape == (48, mods[n].in_features)
        assert np.allclose(got[n], seen[n][0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="unknown layer"):
        D.capture_inputs(tiny_lm, ["model.layers.9.mlp.down_proj"], ids)


def test_load_real_layers(tiny_lm):
    L = D.load_real_layers(tiny_lm, [(1, "mlp.down_proj")], corpora=("prose", "code"), nsamples=2, seqlen=32,
                           heldout_tokens=64)
    name = "model.layers.1.mlp.down_proj"
    assert L.names == [name] and L.short(name) == "block 1 down_proj"
    assert L.X_calib[(name, "code")].shape == (64, 96) and L.X_heldout[(name, "prose")].shape == (64, 96)
    assert not np.allclose(L.H(name, "prose"), L.H(name, "code"))
    X = L.X_calib[(name, "prose")].astype(np.float64)
    assert np.allclose(L.H(name), 2 / X.shape[0] * X.T @ X)
    W = D.weight_of(tiny_lm, name)
    assert W.dtype == np.float64 and W.shape == (64, 96)


# ---------------------------------------------------------------------------------------------------------
# lesson 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_linear_storage_equals_the_packed_tensors(bits, group):
    rng = np.random.default_rng(0)
    d_out, d_in = 192, 576
    cfg = QuantConfig(bits=bits, group_size=group)
    res = rtn_quantize(rng.standard_normal((d_out, d_in)), cfg)
    s = D.linear_storage(d_out, d_in, bits, group)
    assert s.total_bits == D.packed_bits(res.codes, res.scales, res.zeros, res.g_idx, bits)
    assert s.n_groups == res.scales.shape[1] == cfg.n_groups(d_in)
    assert sum(s.parts_per_weight().values()) == pytest.approx(s.bits_per_weight)


def test_storage_short_last_group_and_rule_of_thumb():
    s = D.linear_storage(576, 576, 4, 128)
    assert s.n_groups == 5  # 4 x 128 + 64
    # scales: 5 groups x 576 rows x 16 bits; zeros: 5 x 576 x 4; g_idx: 576 x 32; codes: 4 per weight
    assert s.total_bits == 4 * 576 * 576 + 5 * 576 * 16 + 5 * 576 * 4 + 576 * 32
    assert D.rule_of_thumb_bits(4, 128) == 4 + 20 / 128 and D.rule_of_thumb_bits(4, -1) == 4
    exact_div = D.linear_storage(4096, 4096, 4, 128)  # divisible: only g_idx separates it from the rule
    assert exact_div.bits_per_weight - D.rule_of_thumb_bits(4, 128) == pytest.approx(32 / 4096)


def test_model_storage_on_tiny_model(tiny_lm):
    m = D.model_storage(tiny_lm, 4, 32)
    shapes = D.model_linear_shapes(tiny_lm)
    assert m["linears"] == len(shapes) == 14
    assert m["quantized weights"] == sum(o * i for _, o, i in shapes)
    total = sum(p.numel() for p in tiny_lm.model.parameters())  # tied embedding counted once
    assert m["quantized weights"] + m["other params"] == total
    bits = sum(D.linear_storage(o, i, 4, 32).total_bits for _, o, i in shapes)
    assert m["MB (others fp16)"] == pytest.approx((bits + 16 * m["other params"]) / 8e6)
    assert D.fp16_model_mb(tiny_lm) == pytest.approx(16 * total / 8e6)


def test_tradeoff_study_and_pareto(synth):
    L = as_real_layers(synth)
    rows = D.tradeoff_study(L, bits=(3, 4), groups=(32, -1))
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        cfg = QuantConfig(bits=r["bits"], group_size=r["group"])
        W = L.W[L.names[0]]
        H = L.H(L.names[0])
        Q = (rtn_quantize(W, cfg) if r["method"] == "RTN" else gptq_quantize(W, H, cfg)).weight
        assert r["held-out error"] == pytest.approx(lessons.output_rel_error(W, Q, synth.H_heldout))
    front = D.pareto(rows)
    assert all(any(f is r for r in rows) for f in front)
    # the cheapest row of each method is always on the front, and more bits never hurt GPTQ on calibration
    for m in ("RTN", "GPTQ"):
        cheapest = min((r for r in rows if r["method"] == m), key=lambda r: r["bits per weight"])
        assert cheapest in front
    g = {(r["bits"], r["group"]): r["calibration error"] for r in rows if r["method"] == "GPTQ"}
    assert g[(4, 32)] < g[(3, 32)] and g[(4, -1)] < g[(3, -1)]
    s = D.tradeoff_summary(rows)
    assert len(s) == 8
    held = next(r["held-out error"] for r in rows
                if r["method"] == "GPTQ" and r["bits"] == 4 and r["group"] == 32)
    assert D.mean_error(rows, method="GPTQ", bits=4, group=32) == pytest.approx(held)
    assert len(D.fig_tradeoff(s).data) == 2


# ---------------------------------------------------------------------------------------------------------
# lesson 5


def test_actorder_variants_and_g_idx_layout(synth):
    W, H = np.asarray(synth.W), np.asarray(synth.H)
    cfg = QuantConfig(group_size=64)
    layouts = {}
    for v in D.ACTORDER_VARIANTS:
        Q, g = D.actorder_quantize(W, H, cfg, v)
        layouts[v] = D.g_idx_layout(g)
        assert Q.shape == W.shape
    assert layouts["columns in order"] == {"sorted": True, "runs": 3, "groups": 3}
    assert layouts["desc_act"]["runs"] > 3 and not layouts["desc_act"]["sorted"]
    for v in ("static_groups", "desc_act + static_groups", "act-order inside each group"):
        assert layouts[v] == {"sorted": True, "runs": 3, "groups": 3}
    # act-order inside groups = GPTQ in that order; with one group per row it is plain desc_act
    Q, _ = D.actorder_quantize(W, H, QuantConfig(group_size=-1), "act-order inside each group")
    ref = gptq_quantize(W, H, QuantConfig(group_size=-1, desc_act=True)).weight
    assert np.allclose(Q, ref, atol=1e-12)
    order = D.group_local_order(H, 64)
    assert sorted(order) == list(range(192)) and all(set(order[s : s + 64]) == set(range(s, s + 64))
                                                     for s in (0, 64, 128))
    with pytest.raises(ValueError, match="variant"):
        D.actorder_quantize(W, H, cfg, "sideways")


def test_actorder_study_rows(synth):
    L = as_real_layers(synth)
    rows = D.actorder_study(L, configs=(QuantConfig(group_size=64),))
    assert len(rows) == 1 + len(D.ACTORDER_VARIANTS)
    summ = D.actorder_summary(rows)
    base = next(r for r in summ if r["variant"] == "columns in order")
    assert base["vs columns in order"] == 1.0 and base["g_idx sorted"]
    assert not next(r for r in summ if r["variant"] == "desc_act")["g_idx sorted"]


@pytest.mark.parametrize("tokens", [1, 5])
def test_dequant_ways_agree(tokens):
    b = D.dequant_bench(d_out=64, d_in=256, group_size=32, tokens=tokens, repeats=1)
    assert set(b.seconds) == set(D.DEQUANT_WAYS) and b.max_rel_diff < 1e-5
    assert b.scale_reads["g_idx gather, act-order g_idx"] == 32 * b.scale_reads["contiguous groups"]
    assert len(b.rows()) == 4 and b.rows()[0]["vs contiguous"] == 1.0
    b.seconds = {"contiguous groups": 1.0, "g_idx gather, sorted g_idx": 3.0,
                 "g_idx gather, act-order g_idx": 3.0, "sorted at load, x permuted": 1.5}
    assert b.sorting_removes == pytest.approx(0.75)
    b.seconds["g_idx gather, act-order g_idx"] = 0.9  # gather no slower than contiguous: nothing to remove
    assert b.sorting_removes == 0.0
    # the direct formula
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8, generator=gen)
    s, z = torch.rand(8, 2, generator=gen), torch.full((8, 2), 8.0)
    x = torch.randn(3, 64, generator=gen)
    W = torch.stack([s[:, j // 32] * (codes[:, j].float() - 8) for j in range(64)], dim=1)
    for way in ("contiguous groups", "g_idx gather"):
        y = D.dequant_matmul(way, x, codes, s, z, g_idx=torch.arange(64) // 32)
        assert torch.allclose(y, x @ W.T, atol=1e-5)
    perm, g = D.act_order_g_idx(64, 32, seed=3)
    assert np.bincount(g).tolist() == [32, 32] and sorted(perm) == list(range(64))
    with pytest.raises(ValueError, match="multiple"):
        D.dequant_bench(d_in=100, group_size=32)


# ---------------------------------------------------------------------------------------------------------
# lesson 6


def test_damping_sweep_and_spectrum(synth):
    L = as_real_layers(synth)
    name = L.names[0]
    rows = D.damping_sweep(L, name, token_counts=(128, 1024), damps=(1e-3, 0.01, 0.5))
    assert len(rows) == 2 * 4
    r = D.row_at(rows, tokens=1024, damp_percent=0.01)
    Q = gptq_quantize(L.W[name], D.hessian_from(L.X_calib[(name, "prose")][:1024]), QuantConfig()).weight
    assert r["held-out error"] == pytest.approx(lessons.output_rel_error(L.W[name], Q, synth.H_heldout))
    assert D.best_damp(rows, 128)["method"] == "GPTQ"
    # few tokens (128 < 192 inputs): H is singular, its rank is the token count
    sp = D.spectrum(D.hessian_from(L.X_calib[(name, "prose")][:128]), damps=(0.01,))
    assert sp["rank"] == 128 and sp["condition"] == float("inf")
    assert sp["damped"][0]["eigenvalues below lambda"] >= 192 - 128
    full = D.spectrum(synth.H, damps=(0.01, 0.1))
    assert full["rank"] == 192
    assert full["damped"][1]["condition"] < full["damped"][0]["condition"] < full["condition"]
    assert len(D.fig_damping(rows).data) == 4


def test_diag_profile_and_dead_input(synth):
    p = D.diag_profile(synth.H)
    assert p["dead"] == 0 and p["max/mean"] > 1 > p["min/mean"] > 0
    rows = D.dead_input_demo(synth.W, synth.X_calib, synth.X_heldout, channel=7, factors=(1.0, 1e-3, 0.0))
    alive, quiet, dead = rows
    assert alive["dead inputs found"] == quiet["dead inputs found"] == 0 and dead["dead inputs found"] == 1
    assert dead["channel weights: rel. change"] == pytest.approx(1.0)  # zeroed
    assert alive["channel weights: rel. change"] < 0.5
    assert dead["held-out error"] > alive["held-out error"]


def test_domain_study(synth):
    other = SyntheticSource(d_out=64, d_in=192, n_calib=1024, n_heldout=512, seed=9, rank=20).load()
    corpora = ("prose", "code")
    L = as_real_layers(synth, corpora=corpora,
                       X_calib={"prose": np.asarray(synth.X_calib), "code": np.asarray(other.X_calib)},
                       X_heldout={"prose": np.asarray(synth.X_heldout), "code": np.asarray(other.X_heldout)})
    rows = D.domain_study(L)
    assert [r["calibrated on"] for r in rows] == ["- (RTN)", "prose", "code", "prose + code"]
    by = {r["calibrated on"]: r for r in rows}
    # each domain's own calibration wins on its own held-out tokens (the inputs differ a lot here)
    assert by["prose"]["error on prose"] < by["code"]["error on prose"]
    assert by["code"]["error on code"] < by["prose"]["error on code"]
    W = L.W[L.names[0]]
    mix = np.concatenate([np.asarray(synth.X_calib)[:512], np.asarray(other.X_calib)[:512]])
    Q = gptq_quantize(W, D.hessian_from(mix), QuantConfig()).weight
    expected = lessons.output_rel_error(W, Q, other.H_heldout)
    assert by["prose + code"]["error on code"] == pytest.approx(expected)
    assert len(D.domain_summary(rows)) == 4
    sim = D.input_similarity(L, L.names[0])
    assert sim["held-out a vs b"] > sim["calibration a vs held-out a"]


# ---------------------------------------------------------------------------------------------------------
# whole-model runs


def test_whole_model_run_on_tiny_model(tiny_lm):
    from gptq_explorer.data import calibration_windows, evaluation_ids
    from gptq_explorer.metrics import perplexity

    mixed = D.calibration_set(tiny_lm.tokenizer, "prose + code", 4, 32)
    assert mixed.shape == (4, 32)
    assert torch.equal(mixed[2:], calibration_windows(tiny_lm.tokenizer, "code", 2, 32, 0))
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    fp = D.whole_model_run(tiny_lm, None, "fp", nsamples=2, seqlen=32, eval_windows=2)
    ids = evaluation_ids(tiny_lm.tokenizer, "code", n_tokens=64)
    assert fp["ppl code"] == pytest.approx(perplexity(tiny_lm.model, ids, seqlen=32, progress=False).ppl)
    q = D.whole_model_run(tiny_lm, QuantConfig(bits=3, group_size=32), "gptq", "prose + code", nsamples=2,
                          seqlen=32, eval_windows=2)
    assert q["config"] == "3-bit g32 sym" and q["dead inputs"] >= 0
    assert q["bits per weight"] == pytest.approx(D.model_storage(tiny_lm, 3, 32)["linear bits per weight"])
    assert q["ppl prose"] != fp["ppl prose"] and q["seed"] == 0
    q1 = D.whole_model_run(tiny_lm, QuantConfig(bits=3, group_size=32), "gptq", "prose + code", nsamples=2,
                           seqlen=32, eval_windows=2, seed=1)  # other calibration windows, same eval tokens
    assert q1["seed"] == 1 and q1["ppl prose"] != q["ppl prose"]
    # a copy was quantized: the model itself is unchanged
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())


def test_whole_model_results_are_consistent():
    runs = D.WHOLE_MODEL_RESULTS
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    bits = sum(D.linear_storage(o, i, 4, 128).total_bits for o, i in shapes) / sum(o * i for o, i in shapes)
    for key, r in runs.items():
        assert r["ppl prose"] > 1 and r["ppl code"] > 1
        if key != "fp":
            assert r["bits per weight"] == pytest.approx(bits, abs=1e-4) and r["dead inputs"] == 0
            assert r["ppl prose"] > runs["fp"]["ppl prose"] and r["ppl code"] > runs["fp"]["ppl code"]


def test_calibration_seed_runs_summary_and_winners(tmp_path):
    import json

    ppl = {("prose", 0): (19.8, 16.8), ("code", 0): (18.8, 14.9), ("prose", 1): (19.5, 16.9),
           ("code", 1): (20.5, 15.1), ("prose", 2): (19.0, 17.0)}  # seed 2 lacks the code run
    for (calib, seed), (p, c) in ppl.items():
        run = {"method": "gptq", "calib": calib, "seed": seed, "ppl prose": p, "ppl code": c}
        (tmp_path / f"{calib}-{seed}.json").write_text(json.dumps(run))
    runs = D.calibration_seed_runs(tmp_path)
    assert [(r["calib"], r["seed"]) for r in runs] == [("code", 0), ("code", 1), ("prose", 0), ("prose", 1),
                                                       ("prose", 2)]
    summ = {r["calibrated on"]: r for r in D.seed_summary(runs)}
    assert summ["prose"]["seeds"] == 3 and summ["prose"]["prose: mean"] == pytest.approx(19.433333, rel=1e-6)
    assert (summ["code"]["code: lowest"], summ["code"]["code: highest"]) == (14.9, 15.1)
    wins = D.seed_winners(runs)
    assert [w["seed"] for w in wins] == [0, 1]  # seed 2 is incomplete
    assert [w["best on prose"] for w in wins] == ["code", "prose"]
    assert {w["best on code"] for w in wins} == {"code"}
    assert wins[1]["prose, calibrated on code"] == 20.5
    (tmp_path / "broken.json").write_text("{half")
    with pytest.raises(ValueError, match="broken.json is not a readable run"):
        D.calibration_seed_runs(tmp_path)
