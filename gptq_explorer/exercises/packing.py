"""The check of lesson 8: packing 4-bit codes into the int32 words of a GPTQ checkpoint's qweight.

The engine's answer is checkpoint.packing.pack_rows on the transposed codes: qweight[k, o] holds
codes[o, 8k : 8k+8], code 8k+i in bits 4i .. 4i+3 (low bits first), stored as signed int32.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ..checkpoint.packing import pack_cols, pack_rows
from ._core import Case, Exercise, Mistake, Result, accepts, array_difference, close, run, shape_str, to_array

BITS = 4
PER_WORD = 32 // BITS
_MASK32 = 0xFFFFFFFF


def _pack_case(label: str, codes: np.ndarray) -> Case:
    codes = codes.astype(np.uint8)
    return Case(label, (codes,), f"codes {shape_str(codes.shape)} (outputs × inputs)",
                pack_rows(codes.T, BITS))


@cache
def _pack_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(9)
    top = rng.integers(0, 8, size=(3, 16))
    top[:, PER_WORD - 1 :: PER_WORD] = 15  # the last code of every word >= 8: the word's sign bit is set
    return (
        _pack_case("8 outputs, 16 inputs", rng.integers(0, 16, size=(8, 16))),
        _pack_case("5 outputs (odd), 24 inputs", rng.integers(0, 16, size=(5, 24))),
        _pack_case("code 15 last in every word: negative int32 words", top),
        _pack_case("16 outputs, 8 inputs", rng.integers(0, 16, size=(16, 8))),
        _pack_case("square, 8 × 8", rng.integers(0, 16, size=(8, 8))),
    )


def _call(fn, args):
    """fn(codes) or fn(codes, bits), whichever the learner wrote."""
    return fn(*args, BITS) if accepts(fn, 2) else fn(*args)


def _high_first(case: Case):
    codes = case.args[0].T.astype(np.int64)
    n, m = codes.shape
    return pack_rows(codes.reshape(n // PER_WORD, PER_WORD, m)[:, ::-1].reshape(n, m), BITS)


def _shift_overflow(case: Case):
    codes = case.args[0].T.astype(np.int64).copy()
    for k in range(PER_WORD):
        if BITS * k >= 8:  # a uint8 shifted by 8 bits or more keeps nothing
            codes[k::PER_WORD] = 0
    return pack_rows(codes, BITS)


def _along_outputs(got, case: Case):
    codes = case.args[0]
    if codes.shape[0] % PER_WORD:
        return None
    return _words_equal(got, pack_rows(codes, BITS)) or _words_equal(got, pack_cols(codes.T, BITS))


def _words_equal(got, expected) -> bool:
    return np.asarray(got).dtype == np.int32 and close(got, expected, 0, 0)


def _wrong_dtype(got, case: Case) -> bool:
    g = np.asarray(got)
    if g.dtype == np.int32 or g.shape != case.expected.shape:
        return False
    if not np.all(np.isfinite(g)) or not np.array_equal(g, np.round(g)):
        return False
    return bool(np.array_equal(g.astype(np.int64) & _MASK32, case.expected.astype(np.int64) & _MASK32))


_PACK_MISTAKES = [
    Mistake("wrong_dtype",
            "Your words are right but not int32: a checkpoint stores signed int32 (a word whose last code "
            "is 8 or more is negative). Build the words in np.uint32 (or int64) and finish with "
            ".astype(np.uint32).view(np.int32).",
            matches=_wrong_dtype),
    Mistake("not_transposed",
            "Your words are right but the array is (outputs, inputs / 8); qweight is (inputs / 8, outputs): "
            "transpose it, np.ascontiguousarray(packed.T).",
            matches=lambda got, case: _words_equal(got, pack_cols(case.args[0], BITS))),
    Mistake("packed_along_outputs",
            "You packed 8 neighbouring outputs into a word. GPTQ packs 8 neighbouring inputs: qweight[k, o] "
            "holds codes[o, 8k : 8k+8].",
            matches=_along_outputs, raises=lambda case, exc: case.args[0].shape[0] % PER_WORD != 0),
    Mistake("high_bits_first",
            "Your words hold the first code in the top 4 bits. GPTQ puts code 8k+i in bits 4i .. 4i+3, low "
            "bits first: word |= code << (4 * i).",
            matches=lambda got, case: _words_equal(got, _high_first(case))),
    Mistake("shift_overflow",
            "Only the first two codes of each word survive: the shift ran in uint8 (8 bits), where code << "
            "8 and more fall off. Widen before shifting: codes.astype(np.uint32) << (4 * i), then "
            ".view(np.int32).",
            matches=lambda got, case: _words_equal(got, _shift_overflow(case))),
]


def _pack_same(got, expected, case: Case) -> bool:
    return _words_equal(got, expected)


def _pack_explain(got, expected, case: Case):
    g = np.asarray(got)
    rows, cols = case.args[0].shape
    if g.shape != expected.shape:
        return "wrong_shape", (f"qweight has shape {g.shape}; expected {expected.shape}: "
                               f"(inputs / 8, outputs) = ({cols} // 8, {rows})")
    if g.dtype != np.int32:
        return "wrong_dtype", f"qweight has dtype {g.dtype}; a checkpoint stores int32"
    name, how = array_difference("qweight", g, expected, 0, 0)
    if name == "wrong_values":
        k, o = (int(i) for i in np.argwhere(g != expected)[0])
        word, want = int(g[k, o]) & _MASK32, int(expected[k, o]) & _MASK32
        how += (f" (as hex: {word:#010x}, expected {want:#010x}; it packs codes[{o}, {8 * k}:{8 * k + 8}] = "
                f"{case.args[0][o, 8 * k : 8 * k + 8].tolist()})")
    return name, how


def check_pack_int32(fn) -> Result:
    """fn(codes (rows, cols) uint8, 4-bit) -> qweight int32 (cols // 8, rows): the GPTQ checkpoint layout, 8
    codes per word along the input, low bits first (checkpoint.packing.pack_rows(codes.T, 4)). fn may take
    (codes) or (codes, bits)."""
    cases = list(_pack_cases())
    return run(Exercise(
        "check_pack_int32", cases, lambda raw, case: to_array(raw, "qweight"), _pack_same, _pack_explain,
        _PACK_MISTAKES,
        f"Your packing equals the checkpoint's pack_rows on all {len(cases)} cases, negative words included.",
        call=_call), fn)


MISTAKES = {"check_pack_int32": _PACK_MISTAKES}
