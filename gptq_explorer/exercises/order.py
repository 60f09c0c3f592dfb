"""Checks of lesson 5, act-order: the processing order desc_act picks, and the g_idx it leaves behind."""

from __future__ import annotations

from functools import cache

import numpy as np

from ..engine import QuantConfig, gptq_quantize
from ._core import Case, Exercise, Mistake, Result, array_difference, close, run, to_array


def _hessian_with_diag(rng, s: np.ndarray) -> np.ndarray:
    """A positive definite H with diag(H) = s**2 exactly (equal s: exactly equal diagonal entries)."""
    d = len(s)
    A = rng.normal(size=(d, d + 2))
    C = A @ A.T
    C = C / np.sqrt(np.outer(np.diag(C), np.diag(C)))
    np.fill_diagonal(C, 1.0)
    return s[:, None] * C * s[None, :]


def _engine(H: np.ndarray, group_size: int = -1):
    W = np.random.default_rng(0).normal(size=(2, H.shape[0]))
    return gptq_quantize(W, H, QuantConfig(bits=4, group_size=group_size, desc_act=True))


# ------------------------------------------------------------------ the act-order permutation


@cache
def _perm_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(5)
    out = []
    for label, s in (
        ("6 inputs, all diag(H) different", rng.uniform(0.5, 3.0, size=6)),
        ("inputs 1 and 4 tie, and 0 and 5", np.array([2.0, 3.0, 1.0, 1.5, 3.0, 2.0])),
        ("already in decreasing order", np.array([4.0, 3.0, 2.5, 1.0, 0.5])),
        ("every diag(H) equal", np.ones(4)),
        ("8 inputs, 2 and 6 tie", np.array([1.2, 0.7, 2.0, 0.4, 3.1, 1.9, 2.0, 0.9])),
    ):
        H = _hessian_with_diag(rng, s)
        out.append(Case(label, (H,), f"diag(H) = {np.array2string(np.diag(H), precision=3)}",
                        np.asarray(_engine(H).perm)))
    return tuple(out)


def _diag(case: Case) -> np.ndarray:
    return np.diag(case.args[0])


def _sorted_values(got, case: Case):
    d = np.sort(_diag(case))
    return close(got, d[::-1], 1e-9) or close(got, d, 1e-9)


_PERM_MISTAKES = [
    Mistake("ascending",
            "Your order starts from the smallest diag(H). Act-order processes the inputs with the largest "
            "diag(H) first: perm = np.argsort(-np.diag(H), kind='stable').",
            expect=lambda case: np.argsort(_diag(case), kind="stable")),
    Mistake("ties_reversed",
            "Right order, but tied inputs come out last-first: reversing an ascending sort "
            "(argsort(d)[::-1]) reverses the ties too. Sort -diag(H) with a stable sort, "
            "np.argsort(-np.diag(H), kind='stable'), so tied inputs keep their order, as the engine does.",
            expect=lambda case: np.argsort(_diag(case), kind="stable")[::-1]),
    Mistake("inverse_perm",
            "You returned each input's position in the order (the inverse permutation). perm[p] should be "
            "the input processed at step p: perm = np.argsort(-np.diag(H), kind='stable').",
            expect=lambda case: np.argsort(case.expected)),
    Mistake("sorted_values",
            "You returned the sorted diagonal values; the order is the input indices: np.argsort, not "
            "np.sort.",
            matches=_sorted_values),
]


def _perm_explain(got, expected, case: Case):
    g = np.asarray(got)
    if g.shape == expected.shape and not np.array_equal(np.sort(g), np.arange(len(expected))):
        return "not_a_permutation", (f"your answer {np.array2string(g, precision=3)} is not a permutation of "
                                     f"0..{len(expected) - 1}")
    name, how = array_difference("perm", got, expected, 0, 0, "one entry per input")
    return name, how + f" (expected perm = {expected.tolist()})" if name == "wrong_values" else how


def check_act_order_perm(fn) -> Result:
    """fn(H) -> perm: the order desc_act processes the inputs in (perm[p] = the input at step p), by
    decreasing diag(H), ties in their original order: the engine's gptq_quantize(..., desc_act=True).perm."""
    cases = list(_perm_cases())
    return run(Exercise(
        "check_act_order_perm", cases, lambda raw, case: to_array(raw, "perm"),
        lambda got, expected, case: close(got, expected, 0, 0), _perm_explain, _PERM_MISTAKES,
        f"Your order equals the engine's desc_act order on all {len(cases)} cases, ties included."), fn)


# ------------------------------------------------------------------ g_idx under act-order


def _g_idx_case(label: str, rng, perm: np.ndarray, group_size: int) -> Case:
    d = len(perm)
    s = np.empty(d)
    s[perm] = np.sqrt(np.arange(d, 0, -1, dtype=np.float64))  # diag(H) decreasing along perm
    res = _engine(_hessian_with_diag(rng, s), group_size)
    if not np.array_equal(res.perm, perm):  # the engine's order is the one the case is about
        raise RuntimeError(f"exercise case {label!r}: the engine chose the order {res.perm}, not {perm}")
    return Case(label, (perm, group_size), f"perm = {perm.tolist()}, group_size={group_size}",
                np.asarray(res.g_idx))


@cache
def _g_idx_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(8)
    return (
        _g_idx_case("8 inputs in groups of 4", rng, rng.permutation(8), 4),
        _g_idx_case("10 inputs in groups of 4: a short last group", rng, rng.permutation(10), 4),
        _g_idx_case("no reordering: perm = 0..7", rng, np.arange(8), 4),
        _g_idx_case("the order reversed", rng, np.arange(6)[::-1].copy(), 2),
        _g_idx_case("9 inputs in groups of 3", rng, rng.permutation(9), 3),
    )


_G_IDX_MISTAKES = [
    Mistake("perm_not_inverted",
            "You gave input j the group of step j (perm[j] // group_size). Input j is processed at step "
            "np.argsort(perm)[j], and groups are cut in processing order: g_idx = np.argsort(perm) // "
            "group_size.",
            expect=lambda case: case.args[0] // case.args[1]),
    Mistake("natural_groups",
            "Your g_idx is j // group_size, the layout without act-order (or with static groups). With "
            "desc_act the groups are runs of group_size steps of the processing order: g_idx = "
            "np.argsort(perm) // group_size.",
            expect=lambda case: np.arange(len(case.args[0])) // case.args[1]),
    Mistake("no_division",
            "You returned each input's step in the order; divide by the group size to get its group: g_idx "
            "= np.argsort(perm) // group_size.",
            expect=lambda case: np.argsort(case.args[0])),
]


def check_group_index(fn) -> Result:
    """fn(perm, group_size) -> g_idx (d_in,): the group of each input when the columns are processed in the
    order perm (desc_act): g_idx[j] = (position of j in perm) // group_size, the engine's
    QuantResult.g_idx."""
    cases = list(_g_idx_cases())
    return run(Exercise(
        "check_group_index", cases, lambda raw, case: to_array(raw, "g_idx"),
        lambda got, expected, case: close(got, expected, 0, 0),
        lambda got, expected, case: array_difference("g_idx", got, expected, 0, 0, "one group per input"),
        _G_IDX_MISTAKES,
        f"Your g_idx equals the engine's under desc_act on all {len(cases)} cases, a short last group "
        "included."),
        fn)


MISTAKES = {"check_act_order_perm": _PERM_MISTAKES, "check_group_index": _G_IDX_MISTAKES}
