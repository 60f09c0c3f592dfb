"""Per-linear tensors of a GPTQ checkpoint: build them from engine results and read them back.

The tensor names, dtypes and shapes are those AutoGPTQ, GPTQModel, transformers and vLLM read.

Layouts. The engine keeps codes/scales/zeros in the ``nn.Linear`` layout: ``codes[out, in]``,
``scales[out, n_groups]``, ``zeros[out, n_groups]``. The checkpoint is transposed:

    qweight  int32  [in*bits/32, out]        codes packed along the input dim
    qzeros   int32  [n_groups, out*bits/32]  zero fields packed along the output dim
    scales   fp16   [n_groups, out]
    g_idx    int32  [in]                      group of each input channel
    bias     fp16   [out]                     only if the linear has one

fp16 scales. The checkpoint stores scales (and bias) in fp16, so weights dequantized from a
checkpoint equal ``fp16(scale) * (code - zero)``, not the engine's float32 ``scale * (code - zero)``.
The codes themselves are written exactly as the engine chose them; they are never re-derived by
rounding ``W / fp16(scale)`` (which AutoGPTQ does, and which can move a code by one when the fp16
scale differs from the float32 one). Export -> import is therefore exact on codes, zeros and g_idx
and exact up to the fp16 cast on scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .packing import (
    CheckpointFormatError,
    block_shape,
    check_bits,
    check_format,
    decode_zeros,
    encode_zeros,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)

TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
_FP16_MAX = float(np.finfo(np.float16).max)


def to_numpy(x) -> np.ndarray:
    """numpy view of a numpy array or torch tensor (bf16 is widened to float32, which is exact)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def whole_numbers(x, what: str) -> np.ndarray:
    """int64 NumPy of an array or tensor holding whole numbers (engine codes and zeros may be float arrays
    holding integers); anything else raises CheckpointFormatError naming `what`."""
    a = to_numpy(x)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64)
    if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
        raise CheckpointFormatError(f"{what} must hold whole numbers")
    return a.astype(np.int64)


def n_groups(in_features: int, group_size: int) -> int:
    """ceil(in / group_size); group_size -1 means a single group over the whole row (§3.1)."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise CheckpointFormatError(f"group_size must be -1 or positive, got {group_size}")
    return -(-in_features // group_size)


def default_g_idx(in_features: int, group_size: int) -> np.ndarray:
    """g_idx without act-order (or with static groups): input channel i belongs to group i // gs."""
    gs = in_features if group_size == -1 else group_size
    return (np.arange(in_features) // gs).astype(np.int32)


def check_linear_shape(in_features: int, out_features: int, bits: int, name: str = "linear") -> None:
    """Refuse a linear whose dims do not fill whole int32 words (§3.1 divisibility).

    qweight packs the input dim (needs in % block == 0), qzeros packs the output dim
    (needs out % block == 0); block is 32/bits values, or 32 values in 3 words for 3-bit.
    """
    bits = check_bits(bits)
    per_block, words = block_shape(bits)
    problems = []
    if in_features % per_block:
        problems.append(f"in_features={in_features} is not a multiple of {per_block} (qweight)")
    if out_features % per_block:
        problems.append(f"out_features={out_features} is not a multiple of {per_block} (qzeros)")
    if problems:
        how = f"{per_block} values per {words} int32 words" if words > 1 else f"{per_block} values per int32"
        raise CheckpointFormatError(f"{name}: {bits}-bit GPTQ packing stores {how}; " + "; ".join(problems))


@dataclass
class UnpackedLinear:
    """The integer view of one quantized linear, in the nn.Linear layout.

    codes int32 [out, in], scales float32 [out, n_groups] (exact values of the stored fp16),
    zeros int32 [out, n_groups] (true zero points, after the v1 +1 correction), g_idx int64 [in].
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    bits: int
    bias: np.ndarray | None = None

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.zeros, self.g_idx)


def dequantize(codes, scales, zeros, g_idx) -> np.ndarray:
    """W[o, i] = scales[o, g] * (codes[o, i] - zeros[o, g]),  g = g_idx[i]  (§3.4), float32 [out, in]."""
    c = to_numpy(codes).astype(np.float32)
    s = to_numpy(scales).astype(np.float32)
    z = to_numpy(zeros).astype(np.float32)
    g = to_numpy(g_idx).astype(np.int64)
    return s[:, g] * (c - z[:, g])


# ------------------------------------------------------------------------ writing


def pack_linear(codes, scales, zeros, g_idx, bits: int, format: str = "gptq", bias=None) -> dict:
    """Engine tensors (nn.Linear layout) -> the checkpoint tensors of one linear, as numpy arrays.

    Everything is validated before anything is packed; errors are CheckpointFormatError (a ValueError).
    """
    bits = check_bits(bits)
    format = check_format(format)
    codes = to_numpy(codes)
    scales = to_numpy(scales)
    zeros = to_numpy(zeros)
    g_idx = to_numpy(g_idx)

    if codes.ndim != 2:
        raise CheckpointFormatError(f"codes must be 2-D [out, in], got shape {codes.shape}")
    out_f, in_f = codes.shape
    check_linear_shape(in_f, out_f, bits)
    if scales.ndim != 2 or scales.shape[0] != out_f:
        raise CheckpointFormatError(f"scales must be [out={out_f}, n_groups], got shape {scales.shape}")
    if not np.issubdtype(scales.dtype, np.floating):
        raise CheckpointFormatError(f"scales must be floating point, got dtype {scales.dtype}")
    G = scales.shape[1]
    if zeros.shape != scales.shape:
        raise CheckpointFormatError(f"zeros must have the shape of scales {scales.shape}, got {zeros.shape}")
    if g_idx.shape != (in_f,):
        raise CheckpointFormatError(f"g_idx must be [in={in_f}], got shape {g_idx.shape}")
    if not np.issubdtype(g_idx.dtype, np.integer):
        raise CheckpointFormatError(f"g_idx must hold integers, got dtype {g_idx.dtype}")
    if in_f and (g_idx.min() < 0 or g_idx.max() >= G):
        raise CheckpointFormatError(
            f"g_idx out of range: values must lie in [0, {G - 1}] for {G} groups, "
            f"found min {int(g_idx.min())}, max {int(g_idx.max())}"
        )
    if not np.isfinite(scales).all() or np.abs(scales).max(initial=0) > _FP16_MAX:
        raise CheckpointFormatError("scales must be finite and fit in fp16 (|scale| <= 65504)")
    s16 = scales.astype(np.float16)
    if bias is not None:
        bias = to_numpy(bias)
        if bias.shape != (out_f,):
            raise CheckpointFormatError(f"bias must be [out={out_f}], got shape {bias.shape}")

    fields = encode_zeros(zeros, bits, format)  # range check and the v1 zero-1 convention
    tensors = {
        "qweight": pack_rows(codes.T, bits),  # pack_rows range-checks the codes
        "qzeros": pack_cols(fields.T, bits),
        "scales": np.ascontiguousarray(s16.T),
        "g_idx": g_idx.astype(np.int32),
    }
    if bias is not None:
        tensors["bias"] = bias.astype(np.float16)
    return tensors


# ------------------------------------------------------------------------ reading


def _get(tensors: Mapping, prefix: str, name: str) -> np.ndarray:
    key = f"{prefix}.{name}" if prefix else name
    if key not in tensors:
        raise CheckpointFormatError(f"missing tensor {key!r}")
    return tensors[key]


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def _read_arrays(tensors: Mapping, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """qweight, qzeros (int32), scales (as float32) and g_idx (as int64) of one linear, as numpy, once their
    stored dtypes and number of dimensions are the checkpoint's."""
    p = f"{prefix}." if prefix else ""
    raw = {name: _get(tensors, prefix, name) for name in TENSOR_NAMES}
    for name in ("qweight", "qzeros", "g_idx"):
        if _dtype_name(raw[name]) != "int32":
            raise CheckpointFormatError(f"{p}{name} must be int32, got {_dtype_name(raw[name])}")
    if _dtype_name(raw["scales"]) not in ("float16", "bfloat16", "float32"):
        raise CheckpointFormatError(
            f"{p}scales must be float16 (or bfloat16/float32), got {_dtype_name(raw['scales'])}"
        )
    qweight, qzeros = to_numpy(raw["qweight"]), to_numpy(raw["qzeros"])
    scales, g_idx = to_numpy(raw["scales"]).astype(np.float32), to_numpy(raw["g_idx"]).astype(np.int64)
    for name, a, nd in (
        ("qweight", qweight, 2),
        ("qzeros", qzeros, 2),
        ("scales", scales, 2),
        ("g_idx", g_idx, 1),
    ):
        if a.ndim != nd:
            raise CheckpointFormatError(f"{p}{name} must be {nd}-D, got shape {tuple(a.shape)}")
    return qweight, qzeros, scales, g_idx


def _check_packed_shapes(qweight, qzeros, scales, g_idx, bits: int, p: str) -> None:
    """The packed shapes agree at `bits`: in_features comes from g_idx, out_features from qweight."""
    per_block, words = block_shape(bits)
    in_f, out_f = g_idx.shape[0], qweight.shape[1]
    expect = {
        "qweight": (in_f // per_block * words, out_f),
        "scales": (scales.shape[0], out_f),
        "qzeros": (scales.shape[0], out_f // per_block * words),
    }
    if in_f % per_block:
        raise CheckpointFormatError(
            f"{p}g_idx has {in_f} input channels, which {bits}-bit packing cannot hold "
            f"(needs a multiple of {per_block})"
        )
    if qweight.shape != expect["qweight"]:
        implied = qweight.shape[0] * 32 / in_f if in_f else float("nan")
        raise CheckpointFormatError(
            f"{p}qweight has shape {tuple(qweight.shape)}, expected {expect['qweight']} for "
            f"in_features={in_f} at {bits} bits (its row count implies {implied:g} bits)"
        )
    if scales.shape != expect["scales"]:
        raise CheckpointFormatError(
            f"{p}scales has shape {tuple(scales.shape)}, expected [n_groups, out_features={out_f}]"
        )
    if out_f % per_block or qzeros.shape != expect["qzeros"]:
        raise CheckpointFormatError(
            f"{p}qzeros has shape {tuple(qzeros.shape)}, expected {expect['qzeros']} "
            f"for out_features={out_f} at {bits} bits"
        )


def _check_groups(scales, g_idx, group_size: int | None, p: str) -> None:
    """The number of groups fits `group_size` (when given), g_idx names only existing groups, and the
    scales are finite."""
    G, in_f = scales.shape[0], g_idx.shape[0]
    if group_size is not None:
        want = 1 if group_size == -1 else n_groups(in_f, group_size)
        if G != want:
            raise CheckpointFormatError(
                f"{p}scales has {G} groups, expected {want} for in_features={in_f}, group_size={group_size}"
            )
    if in_f and (g_idx.min() < 0 or g_idx.max() >= G):
        raise CheckpointFormatError(
            f"{p}g_idx out of range: values must lie in [0, {G - 1}] for {G} groups, "
            f"found min {int(g_idx.min())}, max {int(g_idx.max())}"
        )
    if not np.isfinite(scales).all():
        raise CheckpointFormatError(f"{p}scales contain inf or NaN")


def read_linear(
    tensors: Mapping, bits: int, format: str = "gptq", prefix: str = "", group_size: int | None = None
) -> UnpackedLinear:
    """Checkpoint tensors of one linear -> :class:`UnpackedLinear`, validating as it goes (§3.7).

    ``tensors`` maps names to numpy arrays or torch tensors; keys are ``{prefix}.qweight`` etc.
    ``group_size``, when given, is checked against the number of groups. Errors name the tensor.
    """
    bits = check_bits(bits)
    format = check_format(format)
    p = f"{prefix}." if prefix else ""
    bias_key = f"{p}bias"
    raw_bias = tensors.get(bias_key) if bias_key in tensors else None
    qweight, qzeros, scales, g_idx = _read_arrays(tensors, prefix)
    _check_packed_shapes(qweight, qzeros, scales, g_idx, bits, p)
    _check_groups(scales, g_idx, group_size, p)
    bias = None
    if raw_bias is not None:
        out_f = qweight.shape[1]
        bias = to_numpy(raw_bias).astype(np.float32)
        if bias.shape != (out_f,):
            raise CheckpointFormatError(f"{p}bias has shape {tuple(bias.shape)}, expected ({out_f},)")

    codes = unpack_rows(qweight, bits).T.astype(np.int32)
    zeros = decode_zeros(unpack_cols(qzeros, bits), bits, format).T.astype(np.int32)
    return UnpackedLinear(
        codes=np.ascontiguousarray(codes),
        scales=np.ascontiguousarray(scales.T),
        zeros=np.ascontiguousarray(zeros),
        g_idx=g_idx,
        bits=bits,
        bias=bias,
    )
