"""grid_view(layer): the figure's trace data is exactly the layer's scales, zeros, codes and g_idx."""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from gptq_explorer import QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.checkpoint import load_quantized, pack_linear, read_linear, save_quantized
from gptq_explorer.views.grid_view import grid_view, scale_histograms


def traces(fig) -> dict:
    return {t.name: t for t in fig.data}


def random_layer(out_f=48, in_f=96, seed=0, torch_in=False):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(out_f, in_f)) * np.linspace(0.5, 2.0, in_f)  # columns of different ranges
    X = rng.normal(size=(256, in_f))
    H = 2 * X.T @ X / 256
    if torch_in:
        return torch.from_numpy(W).float(), torch.from_numpy(H).float()
    return W, H


def check_panels(fig, codes, scales, zeros, g_idx, bits):
    t = traces(fig)
    levels = np.arange(2**bits)
    # code histogram: counts of every code value, 0 .. 2**bits - 1
    np.testing.assert_array_equal(t["codes"].x, levels)
    np.testing.assert_array_equal(t["codes"].y, np.bincount(codes.ravel(), minlength=2**bits))
    assert sum(t["codes"].y) == codes.size
    # zero-point usage: counts of every zero value over (row, group) pairs
    np.testing.assert_array_equal(t["zero points"].x, levels)
    np.testing.assert_array_equal(t["zero points"].y, np.bincount(zeros.ravel(), minlength=2**bits))
    # scales per group: one histogram column per group on shared bins; each column counts every row
    z = np.asarray(t["scales per group"].z)
    assert z.shape == (40, scales.shape[1])
    np.testing.assert_array_equal(z.sum(axis=0), np.full(scales.shape[1], scales.shape[0]))
    edges = np.histogram_bin_edges(scales, bins=40)
    for g in range(scales.shape[1]):
        np.testing.assert_array_equal(z[:, g], np.histogram(scales[:, g], bins=edges)[0])
    np.testing.assert_allclose(t["scales per group"].y, (edges[:-1] + edges[1:]) / 2)
    np.testing.assert_array_equal(t["scales per group"].x, np.arange(scales.shape[1]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_result_with_act_order(bits):
    W, H = random_layer()
    res = gptq_quantize(W, H, QuantConfig(bits=bits, group_size=32, sym=False, desc_act=True))
    fig = grid_view(res, "layer")
    assert isinstance(fig, go.Figure)
    codes, zeros = res.codes.astype(np.int64), res.zeros.astype(np.int64)  # the numpy engine's floats
    check_panels(fig, codes, res.scales, zeros, res.g_idx, bits)
    t = traces(fig)
    assert set(t) == {"scales per group", "zero points", "codes", "g_idx"}
    # g_idx order: the group of every input column, in column order; act-order makes it unsorted
    np.testing.assert_array_equal(t["g_idx"].x, np.arange(W.shape[1]))
    np.testing.assert_array_equal(t["g_idx"].y, res.g_idx)
    assert np.any(np.diff(res.g_idx) < 0)
    assert "act-order on" in fig.layout.title.text and fig.layout.title.text.startswith("layer: ")


def test_quant_result_without_act_order_has_no_g_idx_panel():
    W, H = random_layer(torch_in=True)
    res = gptq_quantize(W, H, QuantConfig(bits=4, group_size=32, sym=True, desc_act=False))
    fig = grid_view(res)
    t = traces(fig)
    assert set(t) == {"scales per group", "zero points", "codes"}
    check_panels(fig, res.codes.long().numpy(), res.scales.numpy(), res.zeros.long().numpy(), None, 4)
    # symmetric: every (row, group) pair uses the zero 8
    assert list(t["zero points"].y) == [0] * 8 + [res.zeros.numel()] + [0] * 7
    assert "zero 8 only" in fig.layout.title.text and "act-order off" in fig.layout.title.text


@pytest.mark.parametrize("desc_act", [False, True])
def test_checkpoint_layer(desc_act):
    """A layer read back from the checkpoint tensors: desc_act is not stored per layer, so it is read off
    g_idx (unsorted = act-order). in=80 with g32 leaves a last group of 16 columns."""
    W, H = random_layer(out_f=32, in_f=80, seed=1)
    res = gptq_quantize(W, H, QuantConfig(bits=4, group_size=32, sym=False, desc_act=desc_act))
    tensors = pack_linear(res.codes, res.scales, res.zeros, res.g_idx, 4, "gptq_v2")
    layer = read_linear(tensors, 4, "gptq_v2", group_size=32)
    fig = grid_view(layer)
    check_panels(fig, layer.codes, layer.scales, layer.zeros, layer.g_idx, 4)
    np.testing.assert_array_equal(layer.codes, res.codes)
    assert ("g_idx" in traces(fig)) == desc_act
    assert "3 group(s) of 16-32 columns" in fig.layout.title.text
    hidden = grid_view(layer, desc_act=False)  # an explicit desc_act wins
    assert "g_idx" not in traces(hidden)


def test_layers_of_a_loaded_checkpoint(tmp_path):
    from test_checkpoint_roundtrip import quantize, tiny_llama

    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=64, sym=False, desc_act=True))
    save_quantized(qm, tmp_path / "ckpt", warn=False)
    ckpt = load_quantized(tmp_path / "ckpt", tokenizer=False)
    name = "model.layers.0.mlp.down_proj"
    fig = grid_view(ckpt.layers[name], name)
    layer = ckpt.layers[name]
    check_panels(fig, layer.codes, layer.scales, layer.zeros, layer.g_idx, 4)
    np.testing.assert_array_equal(traces(fig)["g_idx"].y, qm.results[name].g_idx.numpy())
    assert len(fig.to_html(include_plotlyjs=False, full_html=False)) > 0  # serializable, no CDN needed


def test_scale_histograms_shared_edges():
    scales = np.array([[1.0, 2.0], [1.0, 4.0], [3.0, 4.0]])
    counts, edges = scale_histograms(scales, bins=3)
    np.testing.assert_allclose(edges, [1, 2, 3, 4])
    np.testing.assert_array_equal(counts, [[2, 0], [0, 1], [1, 2]])


def test_rejects_bad_input():
    W = np.random.default_rng(0).normal(size=(8, 32))
    res = rtn_quantize(W, QuantConfig(bits=4, group_size=16))
    res.codes = res.codes.astype(np.float64)  # the numpy engine may hand out float codes
    res.codes[0, 0] = 16
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        grid_view(res)
    res.codes[0, 0] = 0.5
    with pytest.raises(ValueError, match="whole numbers"):
        grid_view(res)
    with pytest.raises(TypeError, match="QuantResult"):
        grid_view(W)
