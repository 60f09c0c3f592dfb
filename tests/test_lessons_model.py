"""gptq_explorer.lessons_model: the logic behind notebooks 07 and 08, checked against direct computations.

Tiny random LLaMAs and a small GGUF file written here with llama.cpp's own `gguf` package; one test reads
the real offline GGUF (the notebooks assert the numbers they quote under nbval).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_models import make_tiny_model, one_thread  # noqa: F401

from gptq_explorer import QuantConfig, rtn_quantize
from gptq_explorer import lessons_model as L
from gptq_explorer.checkpoint import encode_zeros, n_groups, pack_cols, pack_linear


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from gptq_explorer.models import load_model

    return load_model(str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")))


@pytest.fixture(scope="module")
def calib(tiny_lm):
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------------
# storage


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_layer_bits_are_the_packed_tensor_sizes(bits, group_size):
    rng = np.random.default_rng(bits)
    out_f, in_f = 64, 96  # g64 on 96 inputs leaves a short last group of 32
    G = n_groups(in_f, group_size)
    codes = rng.integers(0, 2**bits, (out_f, in_f))
    zeros = rng.integers(1, 2**bits, (out_f, G))
    g_idx = np.arange(in_f) // (in_f if group_size == -1 else group_size)
    packed = pack_linear(codes, rng.random((out_f, G)) + 0.1, zeros, g_idx, bits)
    want = L.gptq_layer_bits(out_f, in_f, bits, group_size)
    assert {k: v.nbytes * 8 for k, v in packed.items()} == want
    s = L.Storage()
    s.add(out_f, in_f, bits, group_size)
    assert s.bits_per_weight == pytest.approx(sum(want.values()) / (out_f * in_f))
    assert s.per_weight()["qweight"] == bits


def test_storage_from_configs_with_overrides(tiny_lm):
    from gptq_explorer.models.quantize import layer_configs

    model = tiny_lm.model
    ad = tiny_lm.adapter
    shapes = {f"{ad.block_prefix(i)}.{n}": tuple(m.weight.shape) for i, b in enumerate(ad.get_blocks(model))
              for n, m in ad.linears(b).items()}
    base = QuantConfig(group_size=32)
    cfgs = layer_configs(list(shapes), base, {"blocks.-1.*": {"bits": 8}}, ad, 2)
    s = L.storage_from_configs(shapes, cfgs)
    direct = 0
    for name, (o, i) in shapes.items():
        b = 8 if name.startswith("model.layers.1.") else 4
        direct += o * i * b + (i // 32) * o * (b + 16) + i * 32
    assert s.total_bits == direct and s.layers == 14


# ---------------------------------------------------------------------------------------------------------
# lesson 8: export, unpack, reload


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
    st = L.storage_of(qm)
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


# ---------------------------------------------------------------------------------------------------------
# GGUF


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
    g = L.read_gguf(path)
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
        assert np.array_equal(L.gguf_dequantize(raw, t, x.shape[1]),
                              dequantize(quantize(x, GGMLQuantizationType[t]), GGMLQuantizationType[t]))
    t41 = g.tensors["blk.0.ffn_down.weight"]
    q = L.q4_1_dequantize(g.raw(t41.name), t41.shape)
    assert np.array_equal(q["weight"], L.gguf_dequantize(g.raw(t41.name), "Q4_1", 64))
    b = L.q4_1_block_rows(q, 3)
    assert b["values"] == pytest.approx([b["d"] * c + b["m"] for c in b["codes"]], abs=0)
    cmp = L.q4_1_vs_integer_zero(q, q["weight"])
    assert cmp["blocks"] == 16 and 0 <= cmp["integer_zero_share"] <= 1
    assert 0 < cmp["rtn_asym_g32_rel_error"] < 0.2
    with pytest.raises(ValueError, match="not a GGUF"):
        L.read_gguf(__file__)


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
    assert np.array_equal(L.gguf_dequantize(raw, "Q4_0", 96), s16[:, np.arange(96) // 32] * (r.codes - 8))
    with pytest.raises(ValueError, match="in % 32"):
        L.sym4_g32_as_q4_0(r.codes[:, :40], r.scales)


def test_gguf_names_and_formats(tmp_path):
    assert L.gguf_model_name("model.layers.5.mlp.down_proj") == "blk.5.ffn_down.weight"
    assert L.gguf_model_name("model.layers.12.self_attn.o_proj") == "blk.12.attn_output.weight"
    assert L.ggml_block("Q4_1") == (32, 20) and L.ggml_block("Q4_K") == (256, 144)
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


@pytest.mark.slow
def test_real_gguf_is_the_fp_baseline():
    """The offline model's GGUF: 210 Q4_1 linears at 5.0 bits, and its Q4_1 decode is our float32 weight."""
    from gptq_explorer.models import load_model
    from gptq_explorer.models.loading import smollm2_gguf_path

    g = L.read_gguf(smollm2_gguf_path())
    assert g.type_counts() == {"Q4_1": 210, "Q8_0": 1, "F32": 61} and g.bits_per_weight("Q4_1") == 5.0
    name = "model.layers.29.mlp.up_proj"
    t = g.tensors[L.gguf_model_name(name)]
    W = load_model("smollm2-135m").model.get_submodule(name).weight.detach().numpy()
    assert np.array_equal(L.q4_1_dequantize(g.raw(t.name), t.shape)["weight"], W)


# ---------------------------------------------------------------------------------------------------------
# lesson 7: sensitive layers and mixed precision


def test_mixed_precision_from_the_report(tiny_lm, calib):
    from gptq_explorer.models import get_weight
    from gptq_explorer.models.quantize import quantize_model

    cfg = QuantConfig(group_size=32)
    qm = quantize_model(tiny_lm, calib, cfg, method="rtn", inplace=False, progress=False,
                        hessian_condition=False)
    errs = {r.name: r.output_rel_error for r in qm.layers}
    top = L.sensitive_layers(qm.layers, 3)
    assert top == sorted(errs, key=lambda n: -errs[n])[:3]
    as_dicts = [r.__dict__ for r in qm.layers]
    assert L.sensitive_layers(as_dicts, 3) == top  # a JSON report's rows work the same
    assert L.sensitive_layers(qm.layers, 3, key="output_rel_norm") == top  # sqrt keeps the order
    r0 = qm.layers[0]
    assert L._get(r0, "output_rel_norm") == pytest.approx(r0.output_rel_error**0.5)
    rtn_only = quantize_model(tiny_lm, None, cfg, method="rtn", inplace=False, progress=False)
    with pytest.raises(ValueError, match="pass calib_ids"):
        L.sensitive_layers(rtn_only.layers, 3)

    ov = L.overrides_for(top, bits=8)
    assert ov == {n: {"bits": 8} for n in top}
    with pytest.raises(ValueError, match="say what"):
        L.overrides_for(top)
    mixed = quantize_model(tiny_lm, None, cfg, method="rtn", inplace=False, progress=False, overrides=ov)
    assert {r.name for r in mixed.layers if r.bits == 8} == set(top)
    for name in top:  # RTN is per layer: the 8-bit layers are RTN-8 of the original weights
        W = get_weight(tiny_lm.model.get_submodule(name)).detach().float()
        Q8 = rtn_quantize(W.clone(), cfg.replace(bits=8)).weight
        assert torch.allclose(get_weight(mixed.model.get_submodule(name)).float(), torch.as_tensor(Q8))
    base, mix = L.storage_of(rtn_only), L.storage_of(mixed)
    extra = sum(4 * r.shape[0] * r.shape[1] + 4 * r.shape[0] * (r.shape[1] // 32) for r in mixed.layers
                if r.bits == 8)
    assert mix.total_bits - base.total_bits == extra and mix.bits_per_weight > base.bits_per_weight

    rows = L.report_rows(qm.layers)
    assert len(rows) == 7 and all(r["min"] <= r["output_rel_norm (median)"] <= r["max"] for r in rows)
    quarter = [r | {"output_rel_error": r["output_rel_error"] / 4} for r in as_dicts]
    cmp = L.report_comparison(qm.layers, quarter)
    assert len(cmp) == 7 and all(r["GPTQ / RTN"] == pytest.approx(0.5) for r in cmp)  # sqrt(1/4)
    with pytest.raises(ValueError, match="different layer types"):
        L.report_comparison(qm.layers, as_dicts[:3])
    fig = L.fig_layer_report(qm.layers, highlight=top)
    assert len(fig.data) == 8 and len(fig.data[-1].x) == 3
    assert L.sublayer("model.layers.1.self_attn.v_proj") == "self_attn.v_proj"
    assert L.ppl_gap_closed(10.0, 20.0, 12.0) == pytest.approx(0.8)
    ids = torch.arange(64) % 256
    assert L.eval_ppl(qm.model, ids, 32) > 1


def test_mixed_precision_runs_measure_bits_and_ppl(tiny_lm):
    from gptq_explorer.models.quantize import quantize_model

    cfg = QuantConfig(group_size=32)
    ids = torch.arange(64) % 256
    choices = {"uniform": {}, "last block": {"blocks.-1.*": {"bits": 8}}}
    runs = L.mixed_precision_runs(tiny_lm, cfg, choices, ids, 32)
    assert [r.label for r in runs] == ["uniform", "last block"] and [r.layers_8bit for r in runs] == [0, 7]
    direct = quantize_model(tiny_lm, None, cfg, method="rtn", inplace=False, progress=False,
                            overrides=choices["last block"])
    assert runs[1].bits_per_weight == L.storage_of(direct).bits_per_weight > runs[0].bits_per_weight
    assert runs[1].total_bits == L.storage_of(direct).total_bits
    assert runs[1].weights == sum(r.shape[0] * r.shape[1] for r in direct.layers) == 2 * 30720
    again = L.mixed_run("again", direct, runs[1].ppl, base_bits=4)
    assert (again.layers_8bit, again.total_bits) == (7, runs[1].total_bits)
    assert again.overrides == choices["last block"]
    assert runs[1].ppl == pytest.approx(L.eval_ppl(direct.model, ids, 32), rel=1e-6)
    fp = L.eval_ppl(tiny_lm.model, ids, 32)
    rows = L.mixed_rows(runs, fp, runs[0])
    assert rows[0]["extra bits per weight"] == 0 and np.isnan(rows[0]["removed per 0.01 extra bits"])
    closed = (runs[0].ppl - runs[1].ppl) / (runs[0].ppl - fp)
    assert rows[1]["share of the gap removed"] == pytest.approx(closed)


def test_shipped_comparison_reads_results(tmp_path, monkeypatch):
    import json

    from gptq_explorer.results import run_id

    monkeypatch.setenv("GPTQ_EXPLORER_RESULTS", str(tmp_path))
    empty = L.shipped_comparison("m")
    assert len(empty["missing"]) == 9 and empty["rows"] == [] and "bench_models.py" in empty["message"]
    (tmp_path / "m").mkdir()
    ppl = {"fp": 10.0, "rtn-w4-g128-sym": 14.0, "gptq-w4-g128-sym": 12.0}
    for rid, p in ppl.items():
        method = rid.split("-")[0]
        calib = {"corpus": "prose", "nsamples": 128, "seqlen": 512} if method == "gptq" else None
        report = {"method": method, "config": QuantConfig().to_dict(), "overrides": {}, "calibration": calib,
                  "evaluation": {"tokens": 65536}, "perplexity": {"prose": p, "code": p / 2},
                  "timings": {"quantize": 1.5} if method != "fp" else {}, "created": "2026-11-27T00:00:00"}
        assert rid == (run_id(method) if method != "fp" else "fp")
        (tmp_path / "m" / f"{rid}.json").write_text(json.dumps(report))
    got = L.shipped_comparison("m")
    assert got["missing"] == ["rtn-w3-g128-sym", "gptq-w3-g128-sym", "rtn-w4-g128-asym", "gptq-w4-g128-asym",
                              "rtn-w3-g128-asym", "gptq-w3-g128-asym"]
    rows = {r["run"]: r for r in got["rows"]}
    assert rows["gptq-w4-g128-sym"]["prose ppl"] == 12.0 and rows["gptq-w4-g128-sym"]["code ppl"] == 6.0
    assert rows["gptq-w4-g128-sym"]["calibration"] == "128 x 512 prose" and rows["fp"]["bits"] == 32
    assert rows["rtn-w4-g128-sym"]["calibration"] == "none" and rows["fp"]["quantize s"] == 0.0


def test_samples_rows_side_by_side():
    from gptq_explorer.metrics import SAMPLE_PROMPTS

    runs = {"fp": {"samples": {p: f"fp {i}" for i, p in enumerate(SAMPLE_PROMPTS)}},
            "q": {"samples": {p: f"q {i}" for i, p in enumerate(SAMPLE_PROMPTS)}}, "old": {"perplexity": {}}}
    rows = L.samples_rows(runs, {"FP": "fp", "GPTQ": "q"})
    assert [r["prompt"] for r in rows] == list(SAMPLE_PROMPTS)
    assert rows[1] == {"prompt": SAMPLE_PROMPTS[1], "FP": "fp 1", "GPTQ": "q 1"}
    with pytest.raises(ValueError, match=r"no samples in the stored run\(s\) \['old'\].*--samples"):
        L.samples_rows(runs, {"FP": "fp", "old": "old"})
