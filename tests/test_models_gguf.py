"""gptq_explorer.models.gguf: GGUF files read with llama.cpp's gguf package, on a small file written here with
the same package and on the offline model's file; lesson 8's by-hand Q4_1 decode checked against both."""

from __future__ import annotations

import numpy as np
import pytest

from gptq_explorer.lessons.export_deploy import q4_1_block_rows, q4_1_dequantize, q4_1_vs_integer_zero
from gptq_explorer.models import gguf as G


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A GGUF written by llama.cpp's own gguf package: string arrays in the metadata, Q4_1/Q4_0/Q8_0/F32."""
    import gguf
    from gguf.quants import quantize

    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    rng = np.random.default_rng(0)
    tensors = {"blk.0.ffn_down.weight": ("Q4_1", rng.normal(size=(8, 64)).astype(np.float32)),
               "blk.0.attn_v.weight": ("Q4_0", rng.normal(size=(4, 96)).astype(np.float32)),
               "token_embd.weight": ("Q8_0", rng.normal(size=(3, 32)).astype(np.float32)),
               "blk.0.attn_norm.weight": ("F32", rng.normal(size=(64,)).astype(np.float32))}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores([0.5] * 300)
    w.add_string("general.name", "tiny test")
    for name, (t, x) in tensors.items():
        qt = gguf.GGMLQuantizationType[t]
        data = x if t == "F32" else quantize(x, qt)
        w.add_tensor(name, data, raw_dtype=None if t == "F32" else qt)  # quantized: shape from the bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def test_read_gguf_and_decode_q4_1(small_gguf):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    path, tensors = small_gguf
    g = G.read_gguf(path)
    assert g.version == 3 and g.metadata["general.name"] == "tiny test"
    assert g.metadata["llama.block_count"] == 1
    assert g.metadata["tokenizer.ggml.tokens"] == "<array of 300>"
    assert g.type_counts() == {"Q4_1": 1, "Q4_0": 1, "Q8_0": 1, "F32": 1}
    assert g.bits_per_weight("Q4_1") == 5.0 and g.bits_per_weight("Q8_0") == 8.5
    for name, (t, x) in tensors.items():
        raw = g.raw(name)
        if t == "F32":
            assert np.array_equal(raw.view(np.float32), x)
            continue
        assert g.tensors[name].shape == x.shape[::-1]  # ggml order: contiguous dimension first
        assert np.array_equal(raw, quantize(x, GGMLQuantizationType[t]).reshape(-1))  # offsets are right
        assert np.array_equal(G.gguf_dequantize(raw, t, x.shape[1]),
                              dequantize(quantize(x, GGMLQuantizationType[t]), GGMLQuantizationType[t]))
    t41 = g.tensors["blk.0.ffn_down.weight"]
    q = q4_1_dequantize(g.raw(t41.name), t41.shape)
    assert np.array_equal(q["weight"], G.gguf_dequantize(g.raw(t41.name), "Q4_1", 64))
    b = q4_1_block_rows(q, 3)
    assert b["values"] == pytest.approx([b["d"] * c + b["m"] for c in b["codes"]], abs=0)
    cmp = q4_1_vs_integer_zero(q, q["weight"])
    assert cmp["blocks"] == 16 and 0 <= cmp["integer_zero_share"] <= 1
    assert 0 < cmp["rtn_asym_g32_rel_error"] < 0.2
    with pytest.raises(ValueError, match="not a GGUF"):
        G.read_gguf(__file__)


@pytest.mark.slow
def test_real_gguf_is_the_fp_baseline():
    """The offline model's GGUF: 210 Q4_1 linears at 5.0 bits, and its Q4_1 decode is our float32 weight."""
    from gptq_explorer.models import load_model
    from gptq_explorer.models.loading import smollm2_gguf_path

    g = G.read_gguf(smollm2_gguf_path())
    assert g.type_counts() == {"Q4_1": 210, "Q8_0": 1, "F32": 61} and g.bits_per_weight("Q4_1") == 5.0
    name = "model.layers.29.mlp.up_proj"
    t = g.tensors[G.gguf_model_name(name)]
    W = load_model("smollm2-135m").model.get_submodule(name).weight.detach().numpy()
    assert np.array_equal(q4_1_dequantize(g.raw(t.name), t.shape)["weight"], W)
