"""gptq_explorer.lessons.act_order (lesson 5): the act-order variants, their g_idx layouts and the four
ways to dequantize and multiply, on a synthetic layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lessons_real_layers import as_real_layers

from gptq_explorer import QuantConfig, gptq_quantize
from gptq_explorer.lessons import act_order as L


def test_actorder_variants_and_g_idx_layout(synth):
    W, H = np.asarray(synth.W), np.asarray(synth.H)
    cfg = QuantConfig(group_size=64)
    layouts = {}
    for v in L.ACTORDER_VARIANTS:
        Q, g = L.actorder_quantize(W, H, cfg, v)
        layouts[v] = L.g_idx_layout(g)
        assert Q.shape == W.shape
    assert layouts["columns in order"] == {"sorted": True, "runs": 3, "groups": 3}
    assert layouts["desc_act"]["runs"] > 3 and not layouts["desc_act"]["sorted"]
    for v in ("static_groups", "desc_act + static_groups", "act-order inside each group"):
        assert layouts[v] == {"sorted": True, "runs": 3, "groups": 3}
    # act-order inside groups = GPTQ in that order; with one group per row it is plain desc_act
    Q, _ = L.actorder_quantize(W, H, QuantConfig(group_size=-1), "act-order inside each group")
    ref = gptq_quantize(W, H, QuantConfig(group_size=-1, desc_act=True)).weight
    assert np.allclose(Q, ref, atol=1e-12)
    order = L.group_local_order(H, 64)
    assert sorted(order) == list(range(192)) and all(set(order[s : s + 64]) == set(range(s, s + 64))
                                                     for s in (0, 64, 128))
    with pytest.raises(ValueError, match="variant"):
        L.actorder_quantize(W, H, cfg, "sideways")


def test_actorder_study_rows(synth):
    layers = as_real_layers(synth)
    rows = L.actorder_study(layers, configs=(QuantConfig(group_size=64),))
    assert len(rows) == 1 + len(L.ACTORDER_VARIANTS)
    summ = L.actorder_summary(rows)
    base = next(r for r in summ if r["variant"] == "columns in order")
    assert base["vs columns in order"] == 1.0 and base["g_idx sorted"]
    assert not next(r for r in summ if r["variant"] == "desc_act")["g_idx sorted"]


@pytest.mark.parametrize("tokens", [1, 5])
def test_dequant_ways_agree(tokens):
    b = L.dequant_bench(d_out=64, d_in=256, group_size=32, tokens=tokens, repeats=1)
    assert set(b.seconds) == set(L.DEQUANT_WAYS) and b.max_rel_diff < 1e-5
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
        y = L.dequant_matmul(way, x, codes, s, z, g_idx=torch.arange(64) // 32)
        assert torch.allclose(y, x @ W.T, atol=1e-5)
    perm, g = L.act_order_g_idx(64, 32, seed=3)
    assert np.bincount(g).tolist() == [32, 32] and sorted(perm) == list(range(64))
    with pytest.raises(ValueError, match="multiple"):
        L.dequant_bench(d_in=100, group_size=32)
