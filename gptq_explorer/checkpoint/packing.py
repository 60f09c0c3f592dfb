"""Bit packing and zero-point conventions of the GPTQ checkpoint format.

The layout is what AutoGPTQ and GPTQModel write (docs/checkpoints.md).

Every packer in the ecosystem (AutoGPTQ ``QuantLinear.pack``, GPTQModel ``pack_block``)
lays values out as one little-endian bit stream: value ``k`` of a run occupies bits
``[bits*k, bits*(k+1))`` and the stream is cut into 32-bit words. For 2/4/8 bits a word
holds exactly ``32/bits`` values; for 3 bits the fields straddle word boundaries, so 32
values fill 3 words (96 bits), e.g. ``word0 = v0 | v1<<3 | ... | v9<<27 | (v10&3)<<30``.
One routine covers both cases with a "block" of ``lcm(bits, 32)/bits`` values stored in
``lcm(bits, 32)/32`` words.

Words are stored as *signed* int32 (the top field may set the sign bit). All arithmetic
here runs on int64 holding the unsigned 32-bit value, so shifts never sign-extend.
"""

from __future__ import annotations

import math

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
_MASK32 = 0xFFFFFFFF


class CheckpointFormatError(ValueError):
    """A tensor or request that the GPTQ checkpoint format cannot represent."""


# --------------------------------------------------------------------------- helpers


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise CheckpointFormatError(
            f"unknown bits {bits!r}: GPTQ checkpoints support bits in {SUPPORTED_BITS}"
        )
    return int(bits)


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {format!r}: expected one of {FORMATS}")
    return format


def block_shape(bits: int) -> tuple[int, int]:
    """(values per block, int32 words per block): (16,1) 2-bit, (32,3) 3-bit, (8,1) 4-bit, (4,1) 8-bit."""
    bits = check_bits(bits)
    stream = math.lcm(bits, 32)
    return stream // bits, stream // 32


def packed_length(n_values: int, bits: int) -> int:
    """Number of int32 words holding ``n_values`` codes; refuses lengths that do not fill whole words."""
    values, words = block_shape(bits)
    if n_values % values:
        raise CheckpointFormatError(
            f"{bits}-bit packing needs a length divisible by {values} ({values} values fill {words} "
            f"int32 word{'s' if words > 1 else ''}), got {n_values}"
        )
    return n_values // values * words


def _as_int_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise CheckpointFormatError(f"{name} must hold integers, got dtype {a.dtype}")
    return a


def _check_codes(codes, bits: int, name: str) -> np.ndarray:
    a = _as_int_array(codes, name)
    if a.ndim != 2:
        raise CheckpointFormatError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise CheckpointFormatError(
                f"{name} out of range for {bits} bits: values must lie in [0, {(1 << bits) - 1}], "
                f"found min {lo}, max {hi}"
            )
    return a.astype(np.int64)


def _check_packed(packed, name: str) -> np.ndarray:
    if hasattr(packed, "detach"):
        packed = packed.detach().cpu().numpy()
    a = np.asarray(packed)
    if a.dtype not in (np.int32, np.uint32):
        raise CheckpointFormatError(f"{name} must be int32 words, got dtype {a.dtype}")
    if a.ndim != 2:
        raise CheckpointFormatError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    return a.astype(np.int64) & _MASK32  # the unsigned value of each word


# ------------------------------------------------------------------ core (axis 0)


def _pack_axis0(values: np.ndarray, bits: int) -> np.ndarray:
    """values int64 [n, m] in range, n % block == 0 -> int32 [n/block*words, m]."""
    per_block, words = block_shape(bits)
    n, m = values.shape
    v = values.reshape(n // per_block, per_block, m)
    out = np.zeros((n // per_block, words, m), dtype=np.int64)
    for k in range(per_block):  # loop over the (<= 32) positions in a block, vectorized over rows
        start = bits * k
        w, off = divmod(start, 32)
        out[:, w] |= (v[:, k] << off) & _MASK32
        if off + bits > 32:  # 3-bit only: the field straddles into the next word
            out[:, w + 1] |= v[:, k] >> (32 - off)
    # reinterpret the unsigned 32-bit pattern as signed int32, as the ecosystem stores it
    return out.reshape(-1, m).astype(np.uint32).view(np.int32)


def _unpack_axis0(words: np.ndarray, bits: int) -> np.ndarray:
    """unsigned words int64 [n_words, m] -> int64 codes [n_words/words*block, m]."""
    per_block, n_w = block_shape(bits)
    mask = (1 << bits) - 1
    r, m = words.shape
    w3 = words.reshape(r // n_w, n_w, m)
    out = np.empty((r // n_w, per_block, m), dtype=np.int64)
    for k in range(per_block):
        start = bits * k
        w, off = divmod(start, 32)
        v = w3[:, w] >> off
        if off + bits > 32:
            v = v | (w3[:, w + 1] << (32 - off))
        out[:, k] = v & mask
    return out.reshape(-1, m)


# --------------------------------------------------------------------- public API


def pack_rows(codes, bits: int) -> np.ndarray:
    """Pack ``codes[in, out]`` along dim 0 (the input dim) into ``int32[in*bits/32, out]`` (qweight)."""
    bits = check_bits(bits)
    c = _check_codes(codes, bits, "codes")
    packed_length(c.shape[0], bits)  # raises on an unpackable length
    return _pack_axis0(c, bits)


def unpack_rows(packed, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: ``int32[in*bits/32, out]`` -> int64 codes ``[in, out]``."""
    bits = check_bits(bits)
    w = _check_packed(packed, "packed rows")
    _, n_w = block_shape(bits)
    if w.shape[0] % n_w:
        raise CheckpointFormatError(f"3-bit packed rows must come in triples of words, got {w.shape[0]} rows")
    return _unpack_axis0(w, bits)


def pack_cols(values, bits: int) -> np.ndarray:
    """Pack ``values[g, out]`` along dim 1 (the output dim) into ``int32[g, out*bits/32]`` (qzeros)."""
    bits = check_bits(bits)
    v = _check_codes(values, bits, "values")
    packed_length(v.shape[1], bits)
    return np.ascontiguousarray(_pack_axis0(np.ascontiguousarray(v.T), bits).T)


def unpack_cols(packed, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_cols`: ``int32[g, out*bits/32]`` -> int64 ``[g, out]``."""
    bits = check_bits(bits)
    w = _check_packed(packed, "packed cols")
    _, n_w = block_shape(bits)
    if w.shape[1] % n_w:
        raise CheckpointFormatError(
            f"3-bit packed columns must come in triples of words, got {w.shape[1]} columns"
        )
    return np.ascontiguousarray(_unpack_axis0(np.ascontiguousarray(w.T), bits).T)


# ------------------------------------------------------------ zero-point conventions


def encode_zeros(zeros, bits: int, format: str) -> np.ndarray:
    """Integer zero points -> the field values a checkpoint stores (before packing).

    "gptq" (v1, AutoGPTQ) stores ``zero - 1``; a zero of 0 would become -1, which AutoGPTQ's packer
    smears over the neighbouring fields (§3.4), so it is refused. "gptq_v2" stores the exact zero.
    """
    bits = check_bits(bits)
    format = check_format(format)
    z = _as_int_array(zeros, "zeros").astype(np.int64)
    maxq = (1 << bits) - 1
    if z.size and (z.min() < 0 or z.max() > maxq):
        raise CheckpointFormatError(
            f"zero points out of range for {bits} bits: must lie in [0, {maxq}], "
            f"found min {int(z.min())}, max {int(z.max())}"
        )
    if format == "gptq_v2":
        return z
    n_zero = int((z == 0).sum())
    if n_zero:
        raise CheckpointFormatError(
            f"format 'gptq' (v1) stores zero-1 and cannot hold a zero point of 0 ({n_zero} occur): "
            "v1 loaders would decode it as a wrong zero. Use format='gptq_v2', which stores exact zeros."
        )
    return z - 1


def decode_zeros(field, bits: int, format: str) -> np.ndarray:
    """Stored (unpacked) zero fields -> true zero points.

    v1 adds 1 back and masks to ``bits`` like AutoGPTQ's cuda_old kernel and GPTQModel's v1->v2
    conversion, so a field of ``2**bits - 1`` (only written by a corrupted zero of 0) decodes to 0.
    """
    bits = check_bits(bits)
    format = check_format(format)
    f = _as_int_array(field, "zero fields").astype(np.int64)
    maxq = (1 << bits) - 1
    if f.size and (f.min() < 0 or f.max() > maxq):
        raise CheckpointFormatError(f"zero fields out of range for {bits} bits: must lie in [0, {maxq}]")
    if format == "gptq_v2":
        return f
    return (f + 1) & maxq
