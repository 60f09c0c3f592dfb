"""The GPTQ checkpoint format layer: bit packing, zero conventions, per-linear tensors, config JSON.

Expected words are written out as literals, computed by hand from the field layout (value k of a
run in bits [bits*k, bits*(k+1)) of one little-endian stream), so a wrong shift or mask fails here.
"""

import numpy as np
import pytest

from gptq_explorer.checkpoint import (
    CheckpointFormatError,
    check_linear_shape,
    decode_zeros,
    default_g_idx,
    dequantize,
    encode_zeros,
    pack_cols,
    pack_linear,
    pack_rows,
    parse_quantization_config,
    quantization_config_dict,
    read_linear,
    unpack_cols,
    unpack_rows,
)


def col(values):
    return np.array(values, dtype=np.int64).reshape(-1, 1)


def u32(words):
    """Unsigned view of int32 words, for comparing with hex literals."""
    return [int(w) & 0xFFFFFFFF for w in np.asarray(words).ravel()]


# ------------------------------------------------------------------ hand-made words


def test_documented_4bit_example():
    packed = pack_rows(col(range(8)), 4)
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    assert int(packed[0, 0]) == 0x76543210 == 1985229328
    assert unpack_rows(packed, 4).ravel().tolist() == list(range(8))


def test_4bit_top_field_makes_the_word_negative():
    packed = pack_rows(col(range(8, 16)), 4)
    assert u32(packed) == [0xFEDCBA98]
    assert int(packed[0, 0]) == -19088744  # signed reinterpretation
    assert unpack_rows(packed, 4).ravel().tolist() == list(range(8, 16))


def test_2bit_and_8bit_words():
    p2 = pack_rows(col([k % 4 for k in range(16)]), 2)
    assert u32(p2) == [0xE4E4E4E4]
    assert int(p2[0, 0]) == -454761244
    p8 = pack_rows(col([0x01, 0x02, 0x03, 0xFF, 0x80, 0x00, 0x7F, 0x10]), 8)
    assert u32(p8) == [0xFF030201, 0x107F0080]
    assert unpack_rows(p8, 8).ravel().tolist() == [1, 2, 3, 255, 128, 0, 127, 16]


@pytest.mark.parametrize(
    "values, words",
    [
        # 0..7 repeated: the 96-bit stream is the octal digits 0..7 repeated
        ([k % 8 for k in range(32)], [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
        # v10 = 5 (its bit 2 lands in word1 bit 0), v21 = 4 (bits 1-2 land in word2 bits 0-1)
        ([(5 * k + 3) % 8 for k in range(32)], [0x43C67543, 0x7543C675, 0xC67543C6]),
        ([7] * 32, [0xFFFFFFFF] * 3),
        ([0] * 32, [0, 0, 0]),
    ],
)
def test_3bit_words(values, words):
    packed = pack_rows(col(values), 3)
    assert packed.shape == (3, 1)
    assert u32(packed) == words
    assert unpack_rows(packed, 3).ravel().tolist() == values


def test_3bit_straddling_fields_individually():
    # only v10 = 4 -> bit 32 of the stream = bit 0 of word1; only v21 = 1 -> bit 63 = bit 31 of word1
    v = [0] * 32
    v[10] = 4
    assert u32(pack_rows(col(v), 3)) == [0, 1, 0]
    v = [0] * 32
    v[10] = 3
    assert u32(pack_rows(col(v), 3)) == [0xC0000000, 0, 0]
    v = [0] * 32
    v[21] = 1
    assert u32(pack_rows(col(v), 3)) == [0, 0x80000000, 0]
    v = [0] * 32
    v[21] = 6
    assert u32(pack_rows(col(v), 3)) == [0, 0, 3]
    v = [0] * 32
    v[31] = 7
    assert u32(pack_rows(col(v), 3)) == [0, 0, 0xE0000000]


def test_pack_cols_is_pack_rows_along_dim1():
    z = np.array([[3, 0, 5, 7, 1, 2, 4, 6], [8, 9, 10, 11, 12, 13, 14, 15]])
    packed = pack_cols(z, 4)
    assert packed.shape == (2, 1)
    assert u32(packed) == [0x64217503, 0xFEDCBA98]
    assert unpack_cols(packed, 4).tolist() == z.tolist()
    z3 = np.array([[k % 8 for k in range(32)]])
    assert u32(pack_cols(z3, 3)) == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]


def test_multi_column_layout():
    # column o holds codes o, o+1, ...: each column packs independently along dim 0
    codes = (np.arange(8)[:, None] + np.arange(3)[None, :]) % 16
    packed = pack_rows(codes, 4)
    assert u32(packed) == [0x76543210, 0x87654321, 0x98765432]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_random_round_trips(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(96 * 2, 40 if bits != 3 else 64))
    packed = pack_rows(codes, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (codes.shape[0] * bits // 32, codes.shape[1])
    assert np.array_equal(unpack_rows(packed, bits), codes)
    assert np.array_equal(pack_rows(unpack_rows(packed, bits), bits), packed)
    z = codes[:, :5].T.copy()  # [5, 192]: pack along dim 1
    pz = pack_cols(z, bits)
    assert pz.shape == (z.shape[0], z.shape[1] * bits // 32)
    assert np.array_equal(unpack_cols(pz, bits), z)


def test_unpack_accepts_uint32_and_random_words():
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(6, 4)).astype(np.int32)
    for bits in (2, 3, 4, 8):
        assert np.array_equal(pack_rows(unpack_rows(words, bits), bits), words)
        assert np.array_equal(unpack_rows(words.view(np.uint32), bits), unpack_rows(words, bits))


def test_verified_shapes_from_the_reference():
    # §3.1: in=256, out=64, gs=64 -> 4 groups
    expected = {2: ((16, 64), (4, 4)), 3: ((24, 64), (4, 6)), 4: ((32, 64), (4, 8)), 8: ((64, 64), (4, 16))}
    for bits, (qw, qz) in expected.items():
        t = pack_linear(
            np.zeros((64, 256), dtype=np.int64),
            np.ones((64, 4), dtype=np.float32),
            np.full((64, 4), 1),
            default_g_idx(256, 64),
            bits,
        )
        assert t["qweight"].shape == qw and t["qzeros"].shape == qz
        assert t["scales"].shape == (4, 64) and t["scales"].dtype == np.float16
        assert t["g_idx"].dtype == np.int32 and t["g_idx"].tolist() == [i // 64 for i in range(256)]


def test_large_layer_is_fast():
    import time

    codes = np.random.default_rng(1).integers(0, 16, size=(4096, 4096))
    t0 = time.perf_counter()
    packed = pack_rows(codes, 4)
    unpacked = unpack_rows(packed, 4)
    assert time.perf_counter() - t0 < 3.0  # well under a second each on an idle core
    assert np.array_equal(unpacked, codes)


# ------------------------------------------------------------------ malformed inputs


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pack_rows(np.zeros((40, 32), int), 3), "divisible by 32"),
        (lambda: pack_rows(np.zeros((12, 8), int), 4), "divisible by 8"),
        (lambda: pack_rows(np.zeros((8, 8), int), 5), "unknown bits 5"),
        (lambda: pack_rows(np.zeros((8, 8), int), True), "unknown bits"),
        (lambda: pack_rows(np.full((8, 1), 16), 4), r"out of range for 4 bits.*max 16"),
        (lambda: pack_rows(np.full((8, 1), -1), 4), r"out of range.*min -1"),
        (lambda: pack_rows(np.zeros((8, 1), np.float32), 4), "must hold integers"),
        (lambda: pack_rows(np.zeros(8, int), 4), "must be 2-D"),
        (lambda: pack_cols(np.zeros((2, 12), int), 4), "divisible by 8"),
        (lambda: pack_cols(np.zeros((2, 48), int), 3), "divisible by 32"),
        (lambda: unpack_rows(np.zeros((1, 1), np.int64), 4), "must be int32"),
        (lambda: unpack_rows(np.zeros((4, 1), np.int32), 3), "triples"),
        (lambda: unpack_cols(np.zeros((1, 2), np.int32), 3), "triples"),
        (lambda: unpack_rows(np.zeros((1, 1), np.int32), 6), "unknown bits"),
    ],
)
def test_packing_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_errors_are_checkpoint_format_errors():
    with pytest.raises(CheckpointFormatError):
        pack_rows(np.zeros((40, 32), int), 3)


# ------------------------------------------------------------------ zero-point conventions


def test_v1_stores_zero_minus_one():
    zeros = np.array([[8, 8, 8, 8, 8, 8, 8, 8]])  # symmetric 4-bit
    fields = encode_zeros(zeros, 4, "gptq")
    assert fields.tolist() == [[7] * 8]
    assert u32(pack_cols(fields, 4)) == [0x77777777]
    assert decode_zeros(fields, 4, "gptq").tolist() == zeros.tolist()
    # the symmetric v1 fields of §3.4: 3, 1, 127 for 3/2/8 bits
    assert encode_zeros(np.array([4]), 3, "gptq").tolist() == [3]
    assert encode_zeros(np.array([2]), 2, "gptq").tolist() == [1]
    assert encode_zeros(np.array([128]), 8, "gptq").tolist() == [127]
    asym = np.array([[3, 1, 5, 7, 1, 2, 4, 15]])
    assert u32(pack_cols(encode_zeros(asym, 4, "gptq"), 4)) == [0xE3106402]


def test_v1_refuses_zero_of_zero_and_points_to_v2():
    zeros = np.array([[3, 0, 5, 7, 1, 2, 4, 6]])
    with pytest.raises(CheckpointFormatError, match=r"cannot hold a zero point of 0 \(1 occur\).*gptq_v2"):
        encode_zeros(zeros, 4, "gptq")
    fields = encode_zeros(zeros, 4, "gptq_v2")
    assert fields.tolist() == zeros.tolist()
    assert u32(pack_cols(fields, 4)) == [0x64217503]
    assert decode_zeros(fields, 4, "gptq_v2").tolist() == zeros.tolist()


def test_v1_decode_masks_like_the_loaders():
    # a v1 field of 15 (what a corrupted zero 0 leaves) decodes to 0, as cuda_old / GPTQModel do
    assert decode_zeros(np.array([15, 0, 6]), 4, "gptq").tolist() == [0, 1, 7]
    assert decode_zeros(np.array([3]), 2, "gptq").tolist() == [0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: encode_zeros(np.array([16]), 4, "gptq_v2"), r"out of range for 4 bits"),
        (lambda: encode_zeros(np.array([-1]), 4, "gptq_v2"), r"out of range"),
        (lambda: encode_zeros(np.array([1]), 4, "marlin"), "unknown checkpoint format 'marlin'"),
        (lambda: encode_zeros(np.array([1.0]), 4, "gptq"), "must hold integers"),
        (lambda: decode_zeros(np.array([16]), 4, "gptq"), "out of range"),
        (lambda: decode_zeros(np.array([1]), 7, "gptq"), "unknown bits 7"),
    ],
)
def test_zero_errors(call, message):
    with pytest.raises(CheckpointFormatError, match=message):
        call()


# ------------------------------------------------------------------ per-linear tensors


def make_layer(rng, out_f=64, in_f=96, group_size=32, bits=4, asym=True, desc_act=False):
    G = in_f // group_size if group_size != -1 else 1
    codes = rng.integers(0, 2**bits, size=(out_f, in_f))
    scales = rng.uniform(0.001, 0.1, size=(out_f, G)).astype(np.float32)
    if asym:
        zeros = rng.integers(0, 2**bits, size=(out_f, G))
    else:
        zeros = np.full((out_f, G), 2 ** (bits - 1))
    g_idx = default_g_idx(in_f, group_size)
    if desc_act:
        g_idx = g_idx[rng.permutation(in_f)]
    return codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_pack_then_read_linear_is_exact(bits, desc_act):
    rng = np.random.default_rng(10 * bits + desc_act)
    codes, scales, zeros, g_idx = make_layer(rng, out_f=64, in_f=128, bits=bits, desc_act=desc_act)
    bias = rng.normal(size=64).astype(np.float32)
    t = pack_linear(codes, scales, zeros, g_idx, bits, "gptq_v2", bias=bias)
    assert t["qweight"].shape == (128 * bits // 32, 64)
    assert t["bias"].dtype == np.float16
    u = read_linear(t, bits, "gptq_v2", group_size=32)
    assert np.array_equal(u.codes, codes)
    assert np.array_equal(u.zeros, zeros)
    assert np.array_equal(u.g_idx, g_idx)
    assert np.array_equal(u.scales, scales.astype(np.float16).astype(np.float32))
    assert np.array_equal(u.bias, bias.astype(np.float16).astype(np.float32))
    # dequantized from the checkpoint = engine weights with fp16-rounded scales
    w = u.dequantize()
    s16 = scales.astype(np.float16).astype(np.float32)
    assert np.array_equal(w, dequantize(codes, s16, zeros, g_idx))
    assert not np.array_equal(w, dequantize(codes, scales, zeros, g_idx))  # fp16 rounding is visible


def test_checkpoint_layout_is_transposed():
    # one output row of codes 0..7 -> qweight column 0 word 0x76543210; scales stored [G, out]
    codes = np.zeros((8, 8), dtype=np.int64)
    codes[0] = np.arange(8)
    scales = np.arange(1, 9, dtype=np.float32).reshape(8, 1) / 4
    zeros = np.arange(1, 9).reshape(8, 1)
    t = pack_linear(codes, scales, zeros, np.zeros(8, np.int32), 4, "gptq")
    assert u32(t["qweight"]) == [0x76543210] + [0] * 7
    assert t["scales"].tolist() == [[0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]]
    assert u32(t["qzeros"]) == [0x76543210]  # v1: zeros 1..8 stored as 0..7


def test_dequantize_formula():
    codes = np.array([[0, 3, 15, 8]])
    scales = np.array([[0.5, 2.0]], dtype=np.float32)
    zeros = np.array([[8, 1]])
    g_idx = np.array([1, 0, 0, 1])
    assert dequantize(codes, scales, zeros, g_idx).tolist() == [[-2.0, -2.5, 3.5, 14.0]]


def test_read_linear_with_prefix_and_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    codes, scales, zeros, g_idx = make_layer(rng, asym=False)
    t = pack_linear(codes, scales, zeros, g_idx, 4, "gptq")
    tensors = {f"model.layers.0.mlp.up_proj.{k}": torch.from_numpy(v) for k, v in t.items()}
    u = read_linear(tensors, 4, "gptq", prefix="model.layers.0.mlp.up_proj")
    assert np.array_equal(u.codes, codes) and np.array_equal(u.zeros, zeros) and u.bias is None
    tensors["model.layers.0.mlp.up_proj.scales"] = torch.from_numpy(t["scales"]).to(torch.bfloat16)
    u = read_linear(tensors, 4, "gptq", prefix="model.layers.0.mlp.up_proj")
    assert u.scales.dtype == np.float32


def test_group_of_64_at_the_end_is_exact():
    # SmolLM2's width 576 with g128 ends with a group of 64: 5 groups, stored exactly
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, size=(64, 576))
    scales = rng.uniform(0.01, 0.1, size=(64, 5)).astype(np.float32)
    zeros = rng.integers(1, 16, size=(64, 5))
    g_idx = default_g_idx(576, 128)
    assert g_idx[-1] == 4 and (g_idx == 4).sum() == 64
    t = pack_linear(codes, scales, zeros, g_idx, 4, "gptq")
    u = read_linear(t, 4, "gptq", group_size=128)
    assert np.array_equal(u.codes, codes) and np.array_equal(u.zeros, zeros)


def test_pack_linear_refuses_bad_inputs():
    rng = np.random.default_rng(5)
    codes, scales, zeros, g_idx = make_layer(rng)
    cases = [
        (dict(codes=codes[:, :36]), "in_features=36 is not a multiple of 8"),
        (dict(codes=codes[:60]), "out_features=60 is not a multiple of 8"),
        (dict(scales=scales[:, :2]), r"zeros must have the shape of scales \(64, 2\)"),
        (dict(zeros=zeros[:, :2]), "zeros must have the shape"),
        (dict(g_idx=g_idx[:50]), r"g_idx must be \[in=96\]"),
        (dict(g_idx=g_idx + 1), r"g_idx out of range.*\[0, 2\].*max 3"),
        (dict(scales=scales * 1e6), "fit in fp16"),
        (dict(scales=np.where(scales > 0.05, np.nan, scales)), "finite"),
        (dict(codes=codes + 1), r"codes out of range for 4 bits.*max 16"),
        (dict(zeros=zeros * 0 + 16), "zero points out of range"),
        (dict(bits=3), "zero points out of range for 3 bits"),
        (
            dict(codes=codes[:, :48], g_idx=g_idx[:48], bits=3),
            "3-bit .*in_features=48 is not a multiple of 32",
        ),
        (dict(bias=np.zeros(10)), r"bias must be \[out=64\]"),
        (dict(format="gptq_v3"), "unknown checkpoint format"),
    ]
    for change, message in cases:
        args = dict(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=4, format="gptq_v2")
        args.update(change)
        with pytest.raises(CheckpointFormatError, match=message):
            pack_linear(**args)
    # the same asymmetric layer, forced to v1, is refused because a zero of 0 occurs
    assert (zeros == 0).any()
    with pytest.raises(CheckpointFormatError, match="gptq_v2"):
        pack_linear(codes, scales, zeros, g_idx, 4, "gptq")


def test_3bit_refuses_in_features_not_multiple_of_32():
    with pytest.raises(CheckpointFormatError, match=r"3-bit .*in_features=48 is not a multiple of 32"):
        check_linear_shape(48, 64, 3)
    check_linear_shape(64, 64, 3)
    check_linear_shape(576, 576, 4)
    with pytest.raises(CheckpointFormatError, match="out_features=20 is not a multiple of 8"):
        check_linear_shape(64, 20, 4)


def test_read_linear_errors():
    rng = np.random.default_rng(6)
    codes, scales, zeros, g_idx = make_layer(rng)
    good = {f"m.{k}": v for k, v in pack_linear(codes, scales, zeros, g_idx, 4, "gptq_v2").items()}

    def broken(**change):
        t = dict(good)
        for k, v in change.items():
            if v is None:
                del t[f"m.{k}"]
            else:
                t[f"m.{k}"] = v
        return t

    cases = [
        (broken(qzeros=None), {}, "missing tensor 'm.qzeros'"),
        (broken(g_idx=None), {}, "missing tensor 'm.g_idx'"),
        (broken(qweight=good["m.qweight"].astype(np.int64)), {}, "m.qweight must be int32, got int64"),
        (broken(g_idx=good["m.g_idx"].astype(np.int64)), {}, "m.g_idx must be int32, got int64"),
        (broken(scales=good["m.scales"].astype(np.int32)), {}, "m.scales must be float16"),
        (broken(qweight=good["m.qweight"][:-1]), {}, r"m.qweight has shape \(11, 64\), expected \(12, 64\)"),
        (broken(qweight=good["m.qweight"][:, :-8]), {}, r"m.scales has shape \(3, 64\)"),
        (broken(qzeros=good["m.qzeros"][:, :-1]), {}, r"m.qzeros has shape \(3, 7\), expected \(3, 8\)"),
        (broken(scales=good["m.scales"][:2]), {}, r"m.qzeros has shape \(3, 8\), expected \(2, 8\)"),
        (broken(g_idx=(good["m.g_idx"] + 1).astype(np.int32)), {}, r"m.g_idx out of range.*max 3"),
        (broken(g_idx=(good["m.g_idx"] - 1).astype(np.int32)), {}, r"m.g_idx out of range.*min -1"),
        (broken(g_idx=good["m.g_idx"][:90]), {}, "90 input channels"),
        (broken(qweight=good["m.qweight"][None]), {}, "m.qweight must be 2-D"),
        (broken(scales=np.full_like(good["m.scales"], np.inf)), {}, "inf or NaN"),
        (broken(bias=np.zeros(3, np.float16)), {}, r"m.bias has shape \(3,\)"),
        (good, {"group_size": 64}, "3 groups, expected 2"),
        (good, {"bits": 3}, r"expected \(9, 64\) for in_features=96 at 3 bits.*implies 4 bits"),
        (broken(g_idx=good["m.g_idx"][:88]), {"bits": 3}, "m.g_idx has 88 input channels, which 3-bit"),
        (good, {"bits": 8}, r"expected \(24, 64\).*implies 4 bits"),
        (good, {"bits": 5}, "unknown bits 5"),
        (good, {"format": "marlin"}, "unknown checkpoint format"),
    ]
    for tensors, kw, message in cases:
        args = dict(bits=4, format="gptq_v2", prefix="m")
        args.update(kw)
        with pytest.raises(CheckpointFormatError, match=message):
            read_linear(tensors, **args)
    assert read_linear(good, 4, "gptq_v2", prefix="m", group_size=32).n_groups == 3


def test_v1_checkpoint_read_as_v2_is_off_by_one():
    # the format flag matters: the same words decode to zero-1 when read with the wrong convention
    rng = np.random.default_rng(7)
    codes, scales, zeros, g_idx = make_layer(rng, asym=False)
    t = pack_linear(codes, scales, zeros, g_idx, 4, "gptq")
    assert (read_linear(t, 4, "gptq").zeros == 8).all()
    assert (read_linear(t, 4, "gptq_v2").zeros == 7).all()


# ------------------------------------------------------------------ config JSON


def test_quantization_config_dict():
    d = quantization_config_dict(
        bits=4,
        group_size=128,
        desc_act=True,
        sym=False,
        damp_percent=0.01,
        static_groups=False,
        true_sequential=True,
        format="gptq_v2",
        version="0.1.0",
    )
    assert d["quant_method"] == "gptq"
    assert (d["bits"], d["group_size"], d["desc_act"], d["sym"]) == (4, 128, True, False)
    assert d["damp_percent"] == 0.01 and d["static_groups"] is False and d["true_sequential"] is True
    assert d["checkpoint_format"] == "gptq_v2" and d["format"] == "gptq_v2"
    assert d["meta"]["quantizer"] == ["gptq_explorer:0.1.0"]
    assert d["pack_dtype"] == "int32"
    import json

    assert json.loads(json.dumps(d)) == d  # plain JSON
    back = parse_quantization_config(d)
    assert (back.bits, back.group_size, back.desc_act, back.sym, back.format) == (
        4,
        128,
        True,
        False,
        "gptq_v2",
    )
    assert back.quantizer == ["gptq_explorer:0.1.0"]
    for bad, message in [
        (dict(bits=5), "unknown bits"),
        (dict(group_size=0), "group_size"),
        (dict(format="marlin"), "unknown checkpoint format"),
    ]:
        args = dict(bits=4, group_size=128, desc_act=False, sym=True, damp_percent=0.01)
        args.update(bad)
        with pytest.raises(CheckpointFormatError, match=message):
            quantization_config_dict(**args)


def test_config_is_accepted_by_transformers_gptqconfig():
    pytest.importorskip("transformers")
    from transformers import GPTQConfig

    d = quantization_config_dict(bits=3, group_size=-1, desc_act=False, sym=True, damp_percent=0.01)
    cfg = GPTQConfig.from_dict(d)
    assert cfg.bits == 3 and cfg.group_size == -1 and cfg.format == "gptq"


def test_parse_other_tools_configs():
    autogptq = {
        "bits": 4,
        "group_size": 128,
        "damp_percent": 0.01,
        "desc_act": True,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    c = parse_quantization_config(autogptq)
    assert (c.bits, c.group_size, c.desc_act, c.sym, c.format) == (4, 128, True, True, "gptq")
    gptqmodel = {
        "bits": 2,
        "group_size": 128,
        "desc_act": True,
        "sym": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": ["gptqmodel:4.0.0-dev"], "damp_percent": 0.01, "static_groups": False},
    }
    c = parse_quantization_config(gptqmodel)
    assert c.bits == 2 and c.damp_percent == 0.01 and c.quantizer == ["gptqmodel:4.0.0-dev"]
    legacy = {"w_bit": 8, "q_group_size": 64}
    c = parse_quantization_config(legacy)
    assert (c.bits, c.group_size, c.format, c.sym) == (8, 64, "gptq", True)  # missing format -> v1
    for bad, message in [
        ({"bits": 6}, "unknown bits 6"),
        ({"group_size": 128}, "no 'bits'"),
        ({"bits": 4, "quant_method": "awq"}, "not a GPTQ checkpoint"),
        ({"bits": 4, "format": "marlin"}, "'marlin' is not supported"),
        ({"bits": 4, "group_size": -2}, "group_size"),
    ]:
        with pytest.raises(CheckpointFormatError, match=message):
            parse_quantization_config(bad)


def test_dynamic_per_layer_overrides():
    d = quantization_config_dict(
        bits=4,
        group_size=128,
        desc_act=False,
        sym=True,
        damp_percent=0.01,
        dynamic={r"+:^model\.layers\.0\.mlp\.down_proj$": {"bits": 8, "group_size": 64}, r"-:.*lm_head": {}},
    )
    c = parse_quantization_config(d)
    assert c.layer("model.layers.0.mlp.down_proj").bits == 8
    assert c.layer("model.layers.0.mlp.down_proj").group_size == 64
    assert c.layer("model.layers.10.mlp.down_proj").bits == 4
    assert c.layer("lm_head") is None
