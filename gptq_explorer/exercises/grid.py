"""Checks on the grid and what a checkpoint stores: the RTN grid (lesson 1), de-quantizing with g_idx and the
bits per weight (lesson 4)."""

from __future__ import annotations

from functools import cache

import numpy as np

from ..checkpoint.format import dequantize
from ..checkpoint.storage import linear_bits, linear_storage
from ..engine.grid import grid_params
from ._core import (
    BadAnswer,
    Case,
    Exercise,
    Mistake,
    Result,
    array_difference,
    close,
    fmt,
    run,
    shape_str,
    to_array,
    to_number,
)

# ------------------------------------------------------------------ lesson 1: the RTN grid


def _grid_case(label: str, w: np.ndarray, bits: int, sym: bool) -> Case:
    return Case(label, (w, bits, sym), f"w {shape_str(w.shape)}, bits={bits}, sym={sym}",
                grid_params(w, bits, sym))


@cache
def _grid_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(1)
    one_signed = rng.normal(size=(5, 8))
    one_signed[1] = np.abs(one_signed[1]) + 0.05  # no negative weight
    one_signed[3] = -np.abs(one_signed[3]) - 0.05  # no positive weight
    zero_row = rng.normal(size=(3, 5))
    zero_row[0] = 0.0
    square = rng.normal(size=(6, 6))
    square[2] = 0.0
    return (
        _grid_case("4-bit symmetric", rng.normal(size=(4, 6)), 4, True),
        _grid_case("4-bit asymmetric", rng.normal(0.3, 1.0, size=(4, 6)), 4, False),
        _grid_case("row 1 has no negative weight, row 3 no positive one", one_signed, 3, True),
        _grid_case("the same rows, asymmetric", one_signed, 3, False),
        _grid_case("row 0 is all zeros", zero_row, 2, False),
        _grid_case("8-bit, square, row 2 all zeros", square, 8, True),
        _grid_case("more rows than columns", rng.normal(size=(7, 3)), 4, False),
    )


def _w(case: Case):
    w, bits, sym = case.args
    return w, bits, sym, 2**bits - 1


def _per_column(case: Case):
    w, bits, sym, _ = _w(case)
    return grid_params(w.T, bits, sym)


def _sym_only(change):
    """A mistake of the symmetric grid: on asymmetric cases it answers like the engine."""
    def expect(case: Case):
        w, bits, sym, maxq = _w(case)
        scale, zero = case.expected
        return change(w, bits, maxq, scale.copy(), zero.copy()) if sym else (scale, zero)
    return expect


def _asym_only(change):
    def expect(case: Case):
        w, bits, sym, maxq = _w(case)
        if sym:
            return case.expected
        xmin, xmax = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        return change(w, maxq, xmin, xmax)
    return expect


def _zero_off_by_one(w, bits, maxq, scale, zero):
    return scale, zero - 1


def _scale_max_int(w, bits, maxq, scale, zero):
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / (2 ** (bits - 1) - 1), np.nan)
    return scale, np.full_like(zero, np.nan)  # whatever zero goes with it


def _not_symmetrized(w, bits, maxq, scale, zero):
    positive = (w.min(axis=1) >= 0) & (w.max(axis=1) > 0)
    return np.where(positive, w.max(axis=1) / maxq, scale), zero


def _range_without_zero(w, maxq, xmin, xmax):
    lo, hi = w.min(axis=1), w.max(axis=1)
    scale = np.where(hi > lo, (hi - lo) / maxq, np.nan)
    return scale, np.round(-lo / scale)


def _zero_not_rounded(w, maxq, xmin, xmax):
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(empty, -1.0, xmin), np.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    return scale, -xmin / scale


def _zero_row_unhandled(got, case: Case) -> bool:
    w = case.args[0]
    empty = ~np.any(w != 0, axis=1)
    scale, zero = got
    (es, ez) = case.expected
    if not empty.any():
        return _grid_same(got, case.expected, case)
    if scale.shape != es.shape or zero.shape != ez.shape:
        return False
    rest = ~empty
    bad = scale[empty]
    return (close(scale[rest], es[rest], 1e-9) and close(zero[rest], ez[rest], 1e-9)
            and bool(np.all((bad == 0) | ~np.isfinite(bad))))


_GRID_MISTAKES = [
    Mistake("per_column",
            "Your scale has one entry per column: the min and max were taken down the columns (axis=0). The "
            "grid has one (scale, zero) per row, i.e. per output channel: use w.min(axis=1) and "
            "w.max(axis=1).",
            expect=_per_column),
    Mistake("sym_zero_off_by_one",
            "Your symmetric zero is 2**(bits-1) - 1 (7 at 4 bits). The engine, like every GPTQ kernel, uses "
            "zero = 2**(bits-1) (8 at 4 bits): codes 0..15 then stand for -8..7 steps.",
            expect=_sym_only(_zero_off_by_one)),
    Mistake("sym_scale_max_int",
            "Your symmetric scale is max|w| / (2**(bits-1) - 1) (max|w| / 7 at 4 bits), which leaves code 0 "
            "unused. The engine spreads all 2**bits - 1 steps over [-max|w|, max|w|]: scale = 2 * max|w| / "
            "(2**bits - 1).",
            expect=_sym_only(_scale_max_int)),
    Mistake("sym_not_symmetrized",
            "A row with no negative weight gets the range [0, max] (scale = max / (2**bits - 1)): that is "
            "the reference code's quirk, which clips such a row at about half its maximum. Symmetric means "
            "[-max|w|, max|w|] for every row: amax = max(-min, max).",
            expect=_sym_only(_not_symmetrized)),
    Mistake("range_without_zero",
            "Your asymmetric range is the row's [min, max]. The engine first widens it to include 0 (xmin = "
            "min(w.min(axis=1), 0), xmax = max(w.max(axis=1), 0)), so that 0 is exactly on the grid; it "
            "matters for rows with no negative (or no positive) weight.",
            expect=_asym_only(_range_without_zero)),
    Mistake("asym_zero_not_rounded",
            "Your asymmetric zero is not a whole number: round it, zero = np.round(-xmin / scale). The zero "
            "point is an integer code (the checkpoint stores it as one).",
            expect=_asym_only(_zero_not_rounded)),
    Mistake("zero_row_not_handled",
            "An all-zero row gets scale 0 (or NaN) from your code: its range is empty, and rounding w / 0 "
            "then fails. Give such a row the range [-1, 1] as the engine does (any positive scale will do).",
            matches=_zero_row_unhandled),
]


def _grid_answer(raw, case: Case):
    if isinstance(raw, dict) or isinstance(raw, str) or not hasattr(raw, "__len__") or len(raw) != 2:
        length = f" of length {len(raw)}" if hasattr(raw, "__len__") else ""
        raise BadAnswer("your function should return a pair (scale, zero); it returned "
                        f"{type(raw).__name__}{length}")
    return to_array(raw[0], "scale").astype(np.float64), to_array(raw[1], "zero").astype(np.float64)


def _grid_same(got, expected, case: Case) -> bool:
    """Equal to the expected grid, except that on an all-zero row any positive scale and any zero code on the
    grid will do (each quantizes the row to exactly 0; the engine's range [-1, 1] is one choice)."""
    (scale, zero), (es, ez) = got, expected
    w, bits = case.args[0], case.args[1]
    if scale.shape != es.shape or zero.shape != ez.shape:
        return False
    if scale.shape != (w.shape[0],) or zero.shape != (w.shape[0],):
        return close(scale, es, 1e-9) and close(zero, ez, 1e-9)
    empty = ~np.any(w != 0, axis=1)
    rest = ~empty
    s, z = scale[empty], zero[empty]
    with np.errstate(invalid="ignore"):
        any_grid = (np.isfinite(s) & (s > 0) & np.isfinite(z) & (z == np.round(z))
                    & (z >= 0) & (z <= 2**bits - 1))
    as_expected = (np.isclose(s, es[empty], 1e-9, 1e-12) | ~np.isfinite(es[empty])) & (
        np.isclose(z, ez[empty], 1e-9, 1e-12) | ~np.isfinite(ez[empty]))
    return (bool(np.all(any_grid | as_expected)) and close(scale[rest], es[rest], 1e-9)
            and close(zero[rest], ez[rest], 1e-9))


def _grid_explain(got, expected, case: Case):
    for name, g, e in (("scale", got[0], expected[0]), ("zero", got[1], expected[1])):
        if not close(g, e, 1e-9):
            return array_difference(name, g, e, 1e-9, shape_hint="one per row of w")
    return "wrong_values", "it differs"


def check_rtn_grid(fn) -> Result:
    """fn(w (rows, cols), bits, sym) -> (scale (rows,), zero (rows,)): the per-row min-max grid of
    engine.grid.grid_params. Asymmetric: range [min, max] widened to include 0, scale = (max - min) /
    (2**bits - 1), zero = round(-min / scale). Symmetric: range [-max|w|, max|w|], zero = 2**(bits-1). An
    all-zero row may have any positive scale and any zero code (the engine uses the range [-1, 1])."""
    cases = list(_grid_cases())
    return run(Exercise(
        "check_rtn_grid", cases, _grid_answer, _grid_same, _grid_explain, _GRID_MISTAKES,
        f"Your grid equals the engine's grid_params on all {len(cases)} cases: symmetric and asymmetric, 2 "
        "to 8 bits, rows with no negative or no positive weight, all-zero rows."), fn)


# ------------------------------------------------------------------ lesson 4: de-quantize with g_idx


def _deq_case(label: str, rng, rows: int, cols: int, bits: int, group_size: int, scattered: bool = False,
              sym: bool = False) -> Case:
    G = -(-cols // group_size)
    maxq = 2**bits - 1
    codes = rng.integers(0, maxq + 1, size=(rows, cols)).astype(np.int32)
    scales = rng.uniform(0.01, 0.1, size=(rows, G)).astype(np.float32)
    zeros = (np.full((rows, G), 2 ** (bits - 1)) if sym else rng.integers(0, maxq + 1, size=(rows, G)))
    zeros = zeros.astype(np.int32)
    g_idx = np.arange(cols) // group_size
    if scattered:
        g_idx = np.argsort(rng.permutation(cols)) // group_size
    g_idx = g_idx.astype(np.int32)
    info = f"codes {shape_str(codes.shape)}, {G} group{'s' if G > 1 else ''}, {bits}-bit"
    return Case(label, (codes, scales, zeros, g_idx), info, dequantize(codes, scales, zeros, g_idx))


@cache
def _deq_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(4)
    return (
        _deq_case("groups of 4 in order", rng, 3, 8, 4, 4),
        _deq_case("act-order: a scattered g_idx", rng, 4, 12, 4, 4, scattered=True),
        _deq_case("a short last group (10 inputs, groups of 4)", rng, 2, 10, 4, 4),
        _deq_case("one group per row, symmetric zeros", rng, 5, 6, 4, 6, sym=True),
        _deq_case("3-bit, groups of 3", rng, 3, 6, 3, 3),
    )


def _deq_parts(case: Case):
    codes, scales, zeros, g_idx = (np.asarray(a, dtype=np.float64) for a in case.args)
    return codes, scales, zeros, g_idx.astype(np.int64)


def _deq(f):
    def expect(case: Case):
        codes, scales, zeros, g = _deq_parts(case)
        return f(codes, scales[:, g], zeros[:, g])
    return expect


def _ignored_g_idx(got, case: Case):
    codes, scales, zeros, g_idx = _deq_parts(case)
    cols, G = codes.shape[1], scales.shape[1]
    for width in {-(-cols // G), max(1, cols // G)}:
        g = np.minimum(np.arange(cols) // width, G - 1)
        if _deq_same(got, scales[:, g] * (codes - zeros[:, g]), case):
            return True
    return False


_DEQ_MISTAKES = [
    Mistake("zero_not_subtracted",
            "You multiplied the codes by the scale without subtracting the zero point: W[o, i] = scales[o, "
            "g] * (codes[o, i] - zeros[o, g]) with g = g_idx[i].",
            expect=_deq(lambda c, s, z: s * c)),
    Mistake("zero_added",
            "You added the zero point; subtract it: W[o, i] = scales[o, g] * (codes[o, i] - zeros[o, g]).",
            expect=_deq(lambda c, s, z: s * (c + z))),
    Mistake("scale_divided",
            "You divided by the scale; de-quantizing multiplies: W = scale * (code - zero) (quantizing is "
            "the step that divides).",
            expect=_deq(lambda c, s, z: (c - z) / s)),
    Mistake("ignored_g_idx",
            "You took input i's group as i // group_size, which is right only without act-order. Read it "
            "from g_idx: W = scales[:, g_idx] * (codes - zeros[:, g_idx]).",
            matches=_ignored_g_idx),
]


def _deq_answer(raw, case: Case):
    return to_array(raw, "the de-quantized weights").astype(np.float64)


def _deq_same(got, expected, case: Case) -> bool:
    return close(got, expected, rtol=2e-6, atol=1e-9)


def _deq_explain(got, expected, case: Case):
    return array_difference("W", got, expected, 2e-6, 1e-9, "the shape of codes")


def check_dequantize(fn) -> Result:
    """fn(codes (rows, cols), scales (rows, G), zeros (rows, G), g_idx (cols,)) -> W (rows, cols): the
    checkpoint's de-quantization (checkpoint.format.dequantize): W[o, i] = scales[o, g] * (codes[o, i] -
    zeros[o, g]) with g = g_idx[i]."""
    cases = list(_deq_cases())
    return run(Exercise(
        "check_dequantize", cases, _deq_answer, _deq_same, _deq_explain, _DEQ_MISTAKES,
        f"Your de-quantization equals the checkpoint's on all {len(cases)} cases, a scattered act-order "
        "g_idx and a short last group included."), fn)


# ------------------------------------------------------------------ lesson 4: bits per weight


@cache
def _bpw_cases() -> tuple[Case, ...]:
    shapes = (
        ("SmolLM2's q_proj: 576 inputs in groups of 128 (a short last group of 64)", 576, 576, 4, 128),
        ("an MLP's down_proj, 3-bit, groups of 64", 576, 1536, 3, 64),
        ("an MLP's up_proj, 4-bit, groups of 128", 1536, 576, 4, 128),
        ("2-bit, one group per row (-1)", 256, 512, 2, -1),
        ("8-bit, groups of 32", 64, 96, 8, 32),
    )
    return tuple(Case(label, (o, i, b, g), f"out_features={o}, in_features={i}, bits={b}, group_size={g}",
                      linear_storage(o, i, b, g).bits_per_weight) for label, o, i, b, g in shapes)


def _parts(f):
    def expect(case: Case):
        o, i, b, g = case.args
        return f(linear_bits(o, i, b, g), o, i, b, g) / (o * i)
    return expect


def _fractional(p, o, i, b, g):
    share = 1.0 if g == -1 else (i / g) / -(-i // g)
    return p["qweight"] + p["g_idx"] + (p["qzeros"] + p["scales"]) * share


def _rule_of_thumb(case: Case):
    o, i, b, g = case.args
    return None if g == -1 else b + (16 + b) / g


def _swapped(case: Case):
    o, i, b, g = case.args
    return linear_storage(i, o, b, g).bits_per_weight


_BPW_MISTAKES = [
    Mistake("rule_of_thumb",
            "That is the rule of thumb bits + (16 + bits) / group_size. The checkpoint also stores g_idx "
            "(one int32 per input column) and a full set of scales and zeros for a short last group: count "
            "every tensor (qweight, qzeros, scales in fp16, g_idx) and divide by out × in.",
            expect=_rule_of_thumb),
    Mistake("forgot_g_idx",
            "You left out g_idx: the checkpoint stores one int32 per input column (32 × in_features bits).",
            expect=_parts(lambda p, o, i, b, g: sum(p.values()) - p["g_idx"])),
    Mistake("forgot_zeros",
            "You left out the zero points (qzeros): bits bits per output row and group, packed along the "
            "outputs.",
            expect=_parts(lambda p, o, i, b, g: sum(p.values()) - p["qzeros"])),
    Mistake("scales_fp32",
            "You counted the scales at 32 bits; the checkpoint stores them in fp16 (16 bits per row and "
            "group).",
            expect=_parts(lambda p, o, i, b, g: sum(p.values()) + p["scales"])),
    Mistake("fractional_groups",
            "You counted in_features / group_size groups. A short last group costs a full set of scales and "
            "zeros: the number of groups is ceil(in_features / group_size) (576 inputs in groups of 128: 5 "
            "groups).",
            expect=_parts(_fractional)),
    Mistake("swapped_in_out",
            "You swapped the inputs and the outputs: groups (and g_idx) run along the inputs, in_features; "
            "the scales and zeros exist per output row.",
            expect=_swapped),
]


def _bpw_explain(got, expected, case: Case):
    return "wrong_values", f"your answer is {fmt(got)} bits per weight, expected {fmt(expected)}"


def check_bits_per_weight(fn) -> Result:
    """fn(out_features, in_features, bits, group_size) -> bits per weight of that linear in a GPTQ checkpoint
    (checkpoint.storage.linear_storage): qweight, qzeros, fp16 scales and g_idx, over out × in weights."""
    cases = list(_bpw_cases())
    return run(Exercise(
        "check_bits_per_weight", cases, lambda raw, case: to_number(raw, "the bits per weight"),
        lambda got, expected, case: close(got, expected, 1e-9), _bpw_explain, _BPW_MISTAKES,
        f"Your bits per weight equal the checkpoint's storage accounting on all {len(cases)} cases (e.g. "
        f"{cases[0].expected:.3f} for SmolLM2's 576 × 576 layer at 4 bits with groups of 128)."), fn)


MISTAKES = {"check_rtn_grid": _GRID_MISTAKES, "check_dequantize": _DEQ_MISTAKES,
            "check_bits_per_weight": _BPW_MISTAKES}
