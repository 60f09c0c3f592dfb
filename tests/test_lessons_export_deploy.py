"""gptq_explorer.lessons.export_deploy (lesson 8): a tiny random LLaMA exported, unpacked by hand and
reloaded; the zero-point conventions; GPTQ's grids in GGUF; the other formats and the outside-loader pins.
The GGUF reader itself: tests/test_models_gguf.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq_explorer import QuantConfig, rtn_quantize
from gptq_explorer.checkpoint import encode_zeros, pack_cols
from gptq_explorer.checkpoint.storage import storage_of
from gptq_explorer.lessons import export_deploy as L
from gptq_explorer.models.gguf import ggml_block, gguf_dequantize, gguf_model_name


@pytest.fixture(scope="module")
def exported(tiny_lm, tmp_path_factory):
    from gptq_explorer.checkpoint import save_quantized
    from gptq_explorer.models.quantize import quantize_model

    qm = quantize_model(tiny_lm, None, QuantConfig(group_size=64), method="rtn", inplace=False,
                        progress=False)
    folder = tmp_path_factory.mktemp("export") / "ckpt"
    save_quantized(qm, folder, warn=False)
    return qm, folder


def test_file_storage_matches_shapes_and_reload_is_exact(exported):
    from gptq_explorer.checkpoint import load_quantized

    qm, folder = exported
    fs = L.file_storage(folder)
    st = storage_of(qm)
    assert fs["linears"] == st.layers == 14
    assert {k: 8 * v for k, v in fs["quantized"].items()} == st.bits
    assert "model.embed_tokens.weight" in fs["other"] and "lm_head.weight" not in fs["other"]
    assert {r["file"] for r in L.folder_files(folder)} >= {"model.safetensors", "config.json",
                                                             "quantize_config.json"}
    ckpt = load_quantized(folder)
    check = L.reload_check(qm, ckpt)
    assert check["codes_equal"] and check["zeros_equal"] and check["g_idx_equal"]
    assert check["scales_are_fp16_of_engine"] and 0 < check["max_rel_weight_diff"] <= 2**-11 * 1.001
    agree = L.logits_agreement(ckpt.model, qm.model, torch.arange(40) % 256)
    assert agree["tokens"] == 40 and agree["rel_error"] < 1e-3 and agree["top1_agreement"] >= 0.9
    # the down projection has 96 inputs: g64 leaves a short last group of 32; the others have 64 inputs
    assert L.short_last_groups(qm) == {96: 2} and L.short_last_groups(qm, group_size=32) == {}


def test_word_unpacked_by_hand_is_the_engine_codes(exported):
    qm, folder = exported
    name = "model.layers.1.mlp.down_proj"
    t = L.layer_tensors(folder, name)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"} and t["qweight"].shape == (12, 64)
    assert [r["tensor"] for r in L.tensor_rows(t)] == list(t)
    res = qm.results[name]
    codes = np.asarray(res.codes)
    for row in (0, 5, 11):
        for col in (0, 17, 63):
            fields = L.unpack_word(t["qweight"][row, col])
            assert fields == codes[col, row * 8 : row * 8 + 8].tolist()
    col = L.negative_word(t["qweight"], row=2)
    assert t["qweight"][2, col] < 0 and L.unpack_word(t["qweight"][2, col])[-1] >= 8
    rows = L.word_rows(t, res, row=11, col=3, zero=8)  # inputs 88-95: the short last group (g_idx 1)
    assert [r["input column"] for r in rows] == list(range(88, 96))
    assert [r["value"] for r in rows] == [r["engine code"] for r in rows]
    s16 = np.float32(np.float16(np.asarray(res.scales)[3, 1]))
    for r in rows:
        assert r["fp16(scale) * (value - zero)"] == s16 * np.float32(r["value"] - 8)
        assert r["fp16(scale) * (value - zero)"] == pytest.approx(r["engine weight (float32)"], rel=2**-11)
    with pytest.raises(KeyError, match="no qweight"):
        L.layer_tensors(folder, "model.embed_tokens")


def test_unpack_word_and_hex():
    w = np.array([0xF7654321], dtype=np.uint32).view(np.int32)[0]
    assert w < 0 and L.unpack_word(w) == [1, 2, 3, 4, 5, 6, 7, 15] and L.hex32(w) == "0xf7654321"
    assert L.unpack_word(0b11_10_01_00, bits=2)[:4] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no negative word"):
        L.negative_word(np.zeros((2, 3), dtype=np.int32))


def test_zero_conventions_and_the_autogptq_corruption():
    sym = L.zero_words([8] * 8)
    assert sym["gptq"] == {"word": "0x77777777", "fields": [7] * 8, "error": ""}
    assert sym["gptq_v2"]["word"] == "0x88888888"
    zeros = [3, 0, 5, 7, 1, 2, 4, 6]
    corrupt = L.autogptq_v1_qzeros_word(zeros)
    assert corrupt == 0xFFFFFFF2 and L.v1_decode(corrupt) == [3, 0, 0, 0, 0, 0, 0, 0]
    z = L.zero_words(zeros)
    assert z["gptq_v2"]["fields"] == zeros and z["gptq"]["word"] == ""
    assert "zero point of 0" in z["gptq"]["error"]
    # without a zero of 0, AutoGPTQ's arithmetic and ours write the same v1 word, and it decodes back
    rng = np.random.default_rng(0)
    for _ in range(20):
        zz = rng.integers(1, 16, 8)
        ours = int(pack_cols(encode_zeros(zz[None], 4, "gptq"), 4)[0, 0]) & 0xFFFFFFFF
        assert L.autogptq_v1_qzeros_word(zz) == ours and L.v1_decode(ours) == zz.tolist()


def test_asym_zero_counts_match_rtn():
    W = np.random.default_rng(1).normal(size=(16, 64))
    W[:4, :32] = np.abs(W[:4, :32])  # four (row, group) pairs with no negative weight: zero 0 at g32
    rows = L.asym_zero_counts(W, group_sizes=(32,), bits_list=(4,))
    assert rows == [{"bits": 4, "group size": 32, "(row, group) pairs": 32, "zero = 0": 4}]
    z = rtn_quantize(W, QuantConfig(bits=4, group_size=32, sym=False)).zeros
    assert int((np.asarray(z) == 0).sum()) == 4


def test_q4_1_integer_zero_share_on_constructed_blocks():
    d = np.full(4, 0.5, np.float32)
    m = np.array([-4.0, -3.5, -1.25, 0.0], np.float32)  # -m/d = 8, 7, 2.5, 0
    q = {"d": d, "m": m, "codes": np.zeros((4, 32), np.uint8), "weight": np.zeros((4, 32), np.float32)}
    W = np.random.default_rng(0).normal(size=(4, 32))
    assert L.q4_1_vs_integer_zero(q, W)["integer_zero_share"] == 0.75


def test_sym4_g32_is_q4_0():
    W = np.random.default_rng(2).normal(size=(8, 96))
    r = rtn_quantize(W, QuantConfig(bits=4, group_size=32, sym=True))
    raw = L.sym4_g32_as_q4_0(r.codes, r.scales)
    assert raw.shape == (8, 3 * 18) and raw.dtype == np.uint8
    s16 = np.asarray(r.scales, np.float32).astype(np.float16).astype(np.float32)
    assert np.array_equal(gguf_dequantize(raw, "Q4_0", 96), s16[:, np.arange(96) // 32] * (r.codes - 8))
    with pytest.raises(ValueError, match="in % 32"):
        L.sym4_g32_as_q4_0(r.codes[:, :40], r.scales)


def test_gguf_names_and_formats(tmp_path):
    assert gguf_model_name("model.layers.5.mlp.down_proj") == "blk.5.ffn_down.weight"
    assert gguf_model_name("model.layers.12.self_attn.o_proj") == "blk.12.attn_output.weight"
    assert ggml_block("Q4_1") == (32, 20) and ggml_block("Q4_K") == (256, 144)
    assert L.nf4_bits_per_weight() == 4.5
    assert L.nf4_bits_per_weight(double_quant=True) == pytest.approx(4 + 0.127, abs=5e-4)
    rows = {r["format"].split(" (")[0]: r["bits per weight"] for r in L.format_rows(4.21, 5.0)}
    assert rows["GGUF Q4_0"] == 4.5 and rows["GGUF Q8_0"] == 8.5 and rows["GPTQ 4-bit g128 sym"] == 4.21
    (tmp_path / "requirements").mkdir()
    pins = "# comment\nGPTQModel==7.6.0\noptimum==2.3.0  # why\n"
    (tmp_path / "requirements" / "outside-loader.txt").write_text(pins)
    assert L.outside_loader_pins(tmp_path) == {"gptqmodel": "7.6.0", "optimum": "2.3.0"}
    with pytest.raises(FileNotFoundError, match="outside-loader"):
        L.outside_loader_pins(tmp_path / "nowhere")
