"""Checks of lesson 2: the OBS update of a row when one weight is fixed, and the loss it costs.

The engine's answer is the first step of its column loop (engine.gptq): with column q processed first, row 0
of U, the upper Cholesky factor of H^-1 (hinv_cholesky_upper), gives the update
delta = -(w[q] - wq) / U[0, 0] * U[0, 1:] and the loss (w[q] - wq)^2 / U[0, 0]^2 / 2, with U[0, :] =
H^-1[q, :] / sqrt(H^-1[q, q]) (paper, Eq. 3 and its Cholesky form).
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ..engine.gptq import hinv_cholesky_upper
from ._core import Case, Exercise, Mistake, Result, array_difference, close, fmt, run, to_array, to_number


def engine_first_step(w: np.ndarray, Hinv: np.ndarray, q: int, wq: float) -> tuple[np.ndarray, float]:
    """(delta, loss) of fixing w[q] at wq, as the engine's column loop computes them when q comes first."""
    d = len(w)
    order = np.r_[q, np.delete(np.arange(d), q)]
    H = np.linalg.inv(Hinv)
    H = (H + H.T) / 2
    U = hinv_cholesky_upper(H[np.ix_(order, order)])
    err = (w[q] - wq) / U[0, 0]
    delta = np.empty(d)
    delta[q] = wq - w[q]
    delta[order[1:]] = -err * U[0, 1:]
    return delta, float((w[q] - wq) ** 2 / U[0, 0] ** 2 / 2)


def _spd(rng, d: int, small: int | None = None) -> np.ndarray:
    """A random H^-1: symmetric positive definite with unequal diagonal entries."""
    A = rng.normal(size=(d, d))
    M = A @ A.T / d + 0.2 * np.eye(d)
    s = rng.uniform(0.5, 2.0, size=d)
    if small is not None:
        s[small] = 0.2
    return s[:, None] * M * s[None, :]


@cache
def _obs_inputs() -> tuple[tuple[str, np.ndarray, np.ndarray, int, float], ...]:
    rng = np.random.default_rng(2)
    out = []
    for label, d, q, shift, small in (
        ("three weights, q = 0", 3, 0, 0.3, None),
        ("five weights, q in the middle, wq below w[q]", 5, 2, -0.45, None),
        ("the last of eight weights", 8, 7, 0.2, None),
        ("a small H^-1[q, q]", 4, 1, -0.25, 1),
        ("wq equal to w[q]: nothing to pay", 4, 3, 0.0, None),
    ):
        w = rng.normal(size=d)
        Hinv = _spd(rng, d, small)
        out.append((label, w, Hinv, q, float(w[q] + shift)))
    return tuple(out)


def _info(w, Hinv, q, wq) -> str:
    return f"d={len(w)}, q={q}, w[q]={fmt(w[q])}, wq={fmt(wq)}"


def _q(case: Case):
    w, Hinv, q, wq = case.args
    return w, Hinv, q, wq, w[q] - wq, np.arange(len(w)) != q


# ------------------------------------------------------------------ the update


@cache
def _update_cases() -> tuple[Case, ...]:
    return tuple(Case(label, (w, Hinv, q, wq), _info(w, Hinv, q, wq), engine_first_step(w, Hinv, q, wq)[0])
                 for label, w, Hinv, q, wq in _obs_inputs())


def _others(value):
    """A mistake that changes the other weights: delta[q] may be anything (NaN: not compared)."""
    def expect(case: Case):
        w, Hinv, q, wq, c, rest = _q(case)
        out = np.asarray(value(case, w, Hinv, q, c), dtype=np.float64).copy()
        out[q] = np.nan
        return out
    return expect


def _with_H(Hinv, q, c):
    H = np.linalg.inv(Hinv)
    return -c / H[q, q] * H[:, q]


def _forgot_delta_q(got, case: Case) -> bool:
    """The other weights' changes right, delta[q] wrong (or left out: d - 1 entries)."""
    w, Hinv, q, wq, c, rest = _q(case)
    g = np.asarray(got)
    if g.shape == (len(w) - 1,):
        return _update_same(g, case.expected[rest], case)
    if g.shape != case.expected.shape:
        return False
    return _update_same(g[rest], case.expected[rest], case) and (c == 0 or not np.isclose(g[q], -c))


_UPDATE_MISTAKES = [
    Mistake("returned_new_weights",
            "You returned the new weights w + delta; the exercise asks for the change delta itself.",
            expect=lambda case: case.args[0] + case.expected),
    Mistake("sign_flipped",
            "Your update moves the other weights the wrong way. With the error w[q] - wq, delta = -(w[q] - "
            "wq) / Hinv[q, q] * Hinv[:, q]: note the minus.",
            expect=_others(lambda case, w, Hinv, q, c: -case.expected)),
    Mistake("not_divided_by_hinv_qq",
            "You forgot to divide by Hinv[q, q]: delta = -(w[q] - wq) / Hinv[q, q] * Hinv[:, q]. The "
            "division is what makes delta[q] come out as exactly wq - w[q].",
            expect=_others(lambda case, w, Hinv, q, c: -c * Hinv[:, q])),
    Mistake("divided_by_sqrt",
            "You divided by sqrt(Hinv[q, q]): that is the Cholesky row's scaling (U[q, :] = Hinv[q, :] / "
            "sqrt(Hinv[q, q])), used with an error also divided by U[q, q]. In the plain form divide by "
            "Hinv[q, q].",
            expect=_others(lambda case, w, Hinv, q, c: -c / np.sqrt(Hinv[q, q]) * Hinv[:, q])),
    Mistake("used_H",
            "Your update uses H (the inverse of Hinv) where the OBS update needs Hinv itself: delta = "
            "-(w[q] - wq) / Hinv[q, q] * Hinv[:, q].",
            expect=_others(lambda case, w, Hinv, q, c: _with_H(Hinv, q, c))),
    Mistake("forgot_delta_q",
            "The other weights' changes are right, but delta[q] is not: weight q itself moves too, to wq, "
            "so delta[q] = wq - w[q] (the formula gives it when you apply it to every index, q included).",
            matches=_forgot_delta_q),
]


def _update_answer(raw, case: Case):
    return to_array(raw, "delta").astype(np.float64)


def _update_same(got, expected, case: Case) -> bool:
    return close(got, expected, 1e-7, 1e-12)


def _update_explain(got, expected, case: Case):
    return array_difference("delta", got, expected, 1e-7, 1e-12, "one change per weight")


def check_obs_update(fn) -> Result:
    """fn(w (d,), Hinv (d, d), q, wq) -> delta (d,): the OBS change of the row when weight q is set to wq,
    delta = -(w[q] - wq) / Hinv[q, q] * Hinv[:, q] (so delta[q] = wq - w[q])."""
    cases = list(_update_cases())
    return run(Exercise(
        "check_obs_update", cases, _update_answer, _update_same, _update_explain, _UPDATE_MISTAKES,
        f"Your OBS update equals the engine's first GPTQ step on all {len(cases)} cases (q first, in the "
        "middle and last; wq above, below and equal to w[q])."), fn)


# ------------------------------------------------------------------ the loss


@cache
def _loss_cases() -> tuple[Case, ...]:
    return tuple(Case(label, (w, Hinv, q, wq), _info(w, Hinv, q, wq), engine_first_step(w, Hinv, q, wq)[1])
                 for label, w, Hinv, q, wq in _obs_inputs())


def _loss(f):
    def expect(case: Case):
        w, Hinv, q, wq, c, rest = _q(case)
        return float(f(c, Hinv, q))
    return expect


_LOSS_MISTAKES = [
    Mistake("missing_half",
            "Your loss is twice the engine's: the OBS loss has a factor 1/2, (w[q] - wq)^2 / (2 Hinv[q, q]).",
            expect=_loss(lambda c, Hinv, q: c * c / Hinv[q, q])),
    Mistake("multiplied_by_hinv",
            "You multiplied by Hinv[q, q]; divide by it: loss = (w[q] - wq)^2 / (2 Hinv[q, q]). A weight "
            "whose Hinv[q, q] is small is expensive to move.",
            expect=_loss(lambda c, Hinv, q: c * c * Hinv[q, q] / 2)),
    Mistake("no_compensation",
            "That is the loss of moving w[q] alone, H[q, q] (w[q] - wq)^2 / 2, with H = inv(Hinv): it "
            "ignores that the other weights move to compensate. With the OBS update the loss is (w[q] - "
            "wq)^2 / (2 Hinv[q, q]), never larger.",
            expect=_loss(lambda c, Hinv, q: c * c * np.linalg.inv(Hinv)[q, q] / 2)),
    Mistake("not_squared",
            "Your loss is not squared in the error: loss = (w[q] - wq)**2 / (2 Hinv[q, q]).",
            expect=_loss(lambda c, Hinv, q: abs(c) / (2 * Hinv[q, q]))),
]


def check_obs_loss(fn) -> Result:
    """fn(w (d,), Hinv (d, d), q, wq) -> loss: the increase of the layer's loss when w[q] is set to wq and
    the others follow the OBS update, (w[q] - wq)^2 / (2 Hinv[q, q]) (the engine's per-column loss)."""
    cases = list(_loss_cases())
    return run(Exercise(
        "check_obs_loss", cases, lambda raw, case: to_number(raw, "the loss"),
        lambda got, expected, case: close(got, expected, 1e-7, 1e-15),
        lambda got, expected, case: ("wrong_values", f"your loss is {fmt(got)}, expected {fmt(expected)}"),
        _LOSS_MISTAKES,
        f"Your OBS loss equals the engine's on all {len(cases)} cases (and is 0 when wq = w[q])."), fn)


MISTAKES = {"check_obs_update": _UPDATE_MISTAKES, "check_obs_loss": _LOSS_MISTAKES}
