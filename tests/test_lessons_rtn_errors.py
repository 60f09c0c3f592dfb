"""gptq_explorer.lessons.rtn_errors (lesson 1) on a synthetic layer and a tiny random LLaMA, checked against
direct computations (the notebook asserts the real model's numbers under nbval)."""

from __future__ import annotations

import copy

import pytest
import torch

from gptq_explorer import QuantConfig, rtn_quantize
from gptq_explorer.lessons import rtn_errors as L
from gptq_explorer.lessons.measures import rel_error
from gptq_explorer.services.layer_source import SyntheticSource


@pytest.fixture(scope="module")
def small():
    return SyntheticSource(d_out=24, d_in=48, n_calib=512, n_heldout=256, seed=1, rank=12).load()


def test_grid_facts(small):
    f = L.grid_facts(small.W, QuantConfig(group_size=16))
    assert f["max_scale_rel_gap"] < 1e-12 and f["zeros"] == [8] and f["codes"] == (0, 15)
    f3 = L.grid_facts(small.W, QuantConfig(bits=3, group_size=-1))
    assert f3["zeros"] == [4] and f3["codes"][1] <= 7



def test_rtn_error_study_tiny_model(tiny_lm):
    from gptq_explorer.data import evaluation_ids
    from gptq_explorer.metrics import perplexity
    from gptq_explorer.models import (
        catch_block_inputs,
        get_weight,
        quantizable_modules,
        run_blocks,
        set_weight,
    )

    model = tiny_lm.model
    before = copy.deepcopy(model.state_dict())
    cfg = QuantConfig(bits=3, group_size=32)
    s = L.rtn_error_study(tiny_lm, cfg, n_windows=2, seqlen=32, layer_token_stride=1, top_channels=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is restored

    assert s.n_blocks == 2 and len(s.layers) == 2 * 7 and len(s.cumulative_rest) == 2
    assert s.cumulative[0] == pytest.approx(s.isolated[0], abs=1e-12)
    assert all(0 < e < 1 for e in s.isolated) and all(0 < x <= 1 for x in s.top_share)
    assert s.amplification()[0] == pytest.approx(1.0)

    ids = evaluation_ids(tiny_lm.tokenizer, "prose", n_tokens=64)
    assert s.ppl_fp == pytest.approx(perplexity(model, ids, seqlen=32, progress=False).ppl, rel=1e-5)

    # one layer's own output error, from its FP input captured with a hook
    mod = quantizable_modules(model)["model.layers.1.mlp.down_proj"]
    seen = []
    handle = mod.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids.view(2, 32), use_cache=False)
    handle.remove()
    X, W = seen[0].double(), get_weight(mod).double()
    Q = torch.as_tensor(rtn_quantize(get_weight(mod).float().clone(), cfg).weight).double()
    direct = float((X @ (W - Q).T).norm() / (X @ W.T).norm())
    got = next(e for e in s.layers if e.name == "model.layers.1.mlp.down_proj")
    assert got.block == 1 and got.sublayer == "mlp.down_proj"
    assert got.output_rel == pytest.approx(direct, rel=1e-4)

    # every block rounded: the last hidden state and the perplexity match a fully RTN-quantized copy
    qmodel = copy.deepcopy(model)
    for m in quantizable_modules(qmodel).values():
        set_weight(m, rtn_quantize(get_weight(m).float().clone(), cfg).weight)
    assert s.ppl_rtn == pytest.approx(perplexity(qmodel, ids, seqlen=32, progress=False).ppl, rel=1e-5)
    inp = catch_block_inputs(model, ids.view(2, 32))
    fp_last = run_blocks(tiny_lm.adapter.get_blocks(model), inp)
    q_last = run_blocks(tiny_lm.adapter.get_blocks(qmodel), inp)
    assert s.cumulative[-1] == pytest.approx(rel_error(q_last, fp_last), rel=1e-4)

    summary = L.study_summary(s)
    assert summary["ppl_increase"] == pytest.approx(s.ppl_rtn / s.ppl_fp - 1)
    assert summary["largest_rms_jump_block"] == 1
    assert len(s.block_rows(blocks=(0, 1))) == 2 and len(s.layer_rows()) == 7
    assert len(L.fig_layer_errors(s).data) == 7 and len(L.fig_propagation(s).data) == 4
