"""gptq_explorer.lessons.bits_and_groups (lesson 4): the storage of a checkpoint against its packed tensors
and the rule of thumb, and the accuracy of each (bits, group size), on synthetic layers and a tiny random
LLaMA."""

from __future__ import annotations

import numpy as np
import pytest
from test_lessons_real_layers import as_real_layers

from gptq_explorer import QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.checkpoint import n_groups
from gptq_explorer.checkpoint.storage import linear_storage
from gptq_explorer.lessons import bits_and_groups as L
from gptq_explorer.lessons.measures import mean_error, output_rel_error


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_linear_storage_equals_the_packed_tensors(bits, group):
    rng = np.random.default_rng(0)
    d_out, d_in = 192, 576
    cfg = QuantConfig(bits=bits, group_size=group)
    res = rtn_quantize(rng.standard_normal((d_out, d_in)), cfg)
    s = linear_storage(d_out, d_in, bits, group)
    assert s.total_bits == L.packed_bits(res.codes, res.scales, res.zeros, res.g_idx, bits)
    assert n_groups(d_in, group) == res.scales.shape[1] == cfg.n_groups(d_in)
    assert sum(s.per_weight().values()) == pytest.approx(s.bits_per_weight)


def test_storage_short_last_group_and_rule_of_thumb():
    s = linear_storage(576, 576, 4, 128)
    assert n_groups(576, 128) == 5  # 4 x 128 + 64
    # scales: 5 groups x 576 rows x 16 bits; zeros: 5 x 576 x 4; g_idx: 576 x 32; codes: 4 per weight
    assert s.total_bits == 4 * 576 * 576 + 5 * 576 * 16 + 5 * 576 * 4 + 576 * 32
    assert L.rule_of_thumb_bits(4, 128) == 4 + 20 / 128 and L.rule_of_thumb_bits(4, -1) == 4
    exact_div = linear_storage(4096, 4096, 4, 128)  # divisible: only g_idx separates it from the rule
    assert exact_div.bits_per_weight - L.rule_of_thumb_bits(4, 128) == pytest.approx(32 / 4096)


def test_model_storage_on_tiny_model(tiny_lm):
    m = L.model_storage(tiny_lm, 4, 32)
    shapes = L.model_linear_shapes(tiny_lm)
    assert m["linears"] == len(shapes) == 14
    assert m["quantized weights"] == sum(o * i for _, o, i in shapes)
    total = sum(p.numel() for p in tiny_lm.model.parameters())  # tied embedding counted once
    assert m["quantized weights"] + m["other params"] == total
    bits = sum(linear_storage(o, i, 4, 32).total_bits for _, o, i in shapes)
    assert m["MB (others fp16)"] == pytest.approx((bits + 16 * m["other params"]) / 8e6)
    assert L.fp16_model_mb(tiny_lm) == pytest.approx(16 * total / 8e6)


def test_tradeoff_study_and_pareto(synth):
    layers = as_real_layers(synth)
    rows = L.tradeoff_study(layers, bits=(3, 4), groups=(32, -1))
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        cfg = QuantConfig(bits=r["bits"], group_size=r["group"])
        W = layers.W[layers.names[0]]
        H = layers.H(layers.names[0])
        Q = (rtn_quantize(W, cfg) if r["method"] == "RTN" else gptq_quantize(W, H, cfg)).weight
        assert r["held-out error"] == pytest.approx(output_rel_error(W, Q, synth.H_heldout))
    front = L.pareto(rows)
    assert all(any(f is r for r in rows) for f in front)
    # the cheapest row of each method is always on the front, and more bits never hurt GPTQ on calibration
    for m in ("RTN", "GPTQ"):
        cheapest = min((r for r in rows if r["method"] == m), key=lambda r: r["bits per weight"])
        assert cheapest in front
    g = {(r["bits"], r["group"]): r["calibration error"] for r in rows if r["method"] == "GPTQ"}
    assert g[(4, 32)] < g[(3, 32)] and g[(4, -1)] < g[(3, -1)]
    s = L.tradeoff_summary(rows)
    assert len(s) == 8
    held = next(r["held-out error"] for r in rows
                if r["method"] == "GPTQ" and r["bits"] == 4 and r["group"] == 32)
    assert mean_error(rows, method="GPTQ", bits=4, group=32) == pytest.approx(held)
    assert len(L.fig_tradeoff(s).data) == 2
