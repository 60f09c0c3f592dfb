"""Checks of GPTQ's loop and its Hessian: the column loop (lesson 3), the Hessian and its damping
(lesson 6)."""

from __future__ import annotations

from functools import cache

import numpy as np

from ..engine import GPTQStepper, Hessian, QuantConfig, gptq_quantize, rtn_quantize
from ..engine.gptq import hinv_cholesky_upper
from ..engine.grid import dequantize, grid_params, quantize_codes
from ._core import Case, Exercise, Mistake, Result, array_difference, close, fmt, run, shape_str, to_array

# ------------------------------------------------------------------ lesson 3: the GPTQ loop

DAMP = 0.01


def loop_config(bits: int, sym: bool = True) -> QuantConfig:
    """The exercise's GPTQ: one scale per row, 1% damping, columns in their natural order."""
    return QuantConfig(bits=bits, group_size=-1, sym=sym, damp_percent=DAMP, desc_act=False,
                       static_groups=False)


def column_loop(W, H, bits: int, *, damp: float = DAMP, inverse: str = "cholesky", err: str = "divided",
                sign: float = 1.0, grid: str = "row") -> np.ndarray:
    """GPTQ one column at a time with the exercise's settings, and switches that re-create known mistakes.

    inverse  "cholesky": row q of U, the upper Cholesky factor of H^-1 (the engine; downdated H^-1);
             "full": row q of H^-1, computed once and never downdated; "H": row q of H itself;
             "H_cholesky": row q of the upper Cholesky factor of H (not of its inverse).
    err      "divided": (w - q) / M[q, q]; "raw": w - q; "times": (w - q) * M[q, q].
    sign     +1: W[:, q+1:] -= outer(err, M[q, q+1:]); -1: += (the sign flipped).
    grid     "row": one symmetric scale per row from W; "column": the seed lesson's one scale per column.
    """
    W = np.array(W, dtype=np.float64, copy=True)
    H = np.asarray(H, dtype=np.float64)
    n = W.shape[1]
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(n)
    M = {"cholesky": hinv_cholesky_upper, "full": np.linalg.inv, "H": lambda A: A,
         "H_cholesky": lambda A: np.linalg.cholesky(A).T}[inverse](Hd)
    maxq, max_int = 2**bits - 1, 2 ** (bits - 1) - 1
    scale, zero = grid_params(W, bits, True)
    Q = np.empty_like(W)
    for q in range(n):
        w = W[:, q]
        if grid == "row":
            qv = dequantize(quantize_codes(w, scale, zero, maxq), scale, zero)
        else:
            peak = np.max(np.abs(w))
            s = peak / max_int if peak > 0 else 1.0
            qv = np.clip(np.round(w / s), -max_int, max_int) * s
        e = {"divided": (w - qv) / M[q, q], "raw": w - qv, "times": (w - qv) * M[q, q]}[err]
        Q[:, q] = qv
        W[:, q + 1 :] -= sign * np.outer(e, M[q, q + 1 :])
    return Q


def _layer(rng, rows: int, cols: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    mix = np.eye(cols) + 0.6 * rng.normal(size=(cols, cols)) / np.sqrt(cols)
    X = (rng.normal(size=(tokens, cols)) @ mix) * rng.uniform(0.5, 2.0, size=cols)
    W = rng.normal(size=(rows, cols))
    # Each row's largest |w| positive: its most negative weight then never sits exactly on a rounding tie.
    flip = W[np.arange(rows), np.abs(W).argmax(axis=1)] < 0
    W[flip] *= -1
    return W, Hessian(cols).add_batch(X).H


def _loop_case(label: str, W: np.ndarray, H: np.ndarray, bits: int, singular: bool = False) -> Case:
    res = gptq_quantize(W, H, loop_config(bits))
    return Case(label, (W, H, bits), f"W {shape_str(W.shape)}, bits={bits}", np.asarray(res.weight),
                {"singular": singular, "result": res})


@cache
def _loop_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(3)
    W4, H4 = _layer(rng, 4, 8, 64)
    W3, H3 = _layer(rng, 3, 5, 32)
    W2, H2 = _layer(rng, 5, 10, 4)
    We, He = _layer(rng, 6, 12, 48)
    We[0] = np.abs(We[0])
    We[3] = 0.0
    Wn, Hn = _layer(rng, 4, 6, 200)
    Hn[2, :] *= 1e-3  # input 2 nearly dead: H is badly conditioned, and damping changes the result
    Hn[:, 2] *= 1e-3
    return (
        _loop_case("4-bit", W4, H4, 4),
        _loop_case("3-bit, an odd shape", W3, H3, 3),
        _loop_case("2-bit, 4 tokens for 10 inputs: H is singular", W2, H2, 2, singular=True),
        _loop_case("row 0 has no negative weight, row 3 is all zeros", We, He, 4),
        _loop_case("input 2 is nearly dead (H badly conditioned)", Wn, Hn, 3),
    )


def _loop(**switches):
    def expect(case: Case):
        W, H, bits = case.args
        return column_loop(W, H, bits, **switches)
    return expect


def _any_of(*variants):
    """A mistake written in more than one way: the answer matches if it is any of them."""
    def matches(got, case: Case):
        seen = [v for v in (_try(f, case) for f in variants) if v is not None]
        return None if not seen else any(_loop_same(got, v, case) for v in seen)
    return matches


def _try(f, case):
    try:
        return f(case)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return None


def _rtn(case: Case):
    W, H, bits = case.args
    return rtn_quantize(W, QuantConfig(bits=bits, group_size=-1, sym=True)).weight


def _asym(case: Case):
    W, H, bits = case.args
    return gptq_quantize(W, H, loop_config(bits, sym=False)).weight


def _codes(got, case: Case):
    res = case.extra["result"]
    codes, zeros = np.asarray(res.codes, dtype=np.float64), np.asarray(res.zeros, dtype=np.float64)
    return _loop_same(got, codes, case) or _loop_same(got, codes - zeros, case)


def _singular_raise(case: Case, exc: BaseException) -> bool:
    """The error an inverse or a Cholesky factorization of a singular H raises (NumPy, SciPy or torch)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return bool(case.extra.get("singular")) and any(
        word in text for word in ("linalg", "singular", "positive definite", "positive-definite"))


_LOOP_MISTAKES = [
    Mistake("returned_codes",
            "You returned integer codes; return the de-quantized weights Q = scale * (code - zero).",
            matches=_codes),
    Mistake("rtn",
            "Your Q equals round-to-nearest: each column's rounding error never reaches the columns after "
            "it (or only the diagonal of H^-1 is used, which updates nothing). After quantizing column q, "
            "update the columns not yet quantized: "
            "W[:, q+1:] -= outer((W[:, q] - Q[:, q]) / U[q, q], U[q, q+1:]).",
            expect=_rtn),
    Mistake("seed_lesson_loop",
            "This is the seed lesson's loop, with two mistakes: one scale per column shared by all rows, "
            "and H^-1 never downdated (each update uses row q of the full H^-1, computed once). Use one "
            "symmetric scale per row from W before the loop, and the inverse Hessian of the columns not yet "
            "quantized: row q of U, the upper Cholesky factor of H^-1.",
            expect=_loop(grid="column", inverse="full")),
    Mistake("no_downdate",
            "Every update uses row q of the full H^-1, computed once: H^-1 is never downdated, so the "
            "update ignores that the columns before q are already fixed (the seed lesson's loop). Use the "
            "inverse Hessian of the columns not yet quantized: row q of U, the upper Cholesky factor of "
            "H^-1 (U[q, q+1:] and U[q, q]), or remove column q from H^-1 after each step.",
            expect=_loop(inverse="full")),
    Mistake("no_damping",
            "Your result is GPTQ without damping. Add lambda = 0.01 * mean(diag H) to H's diagonal before "
            "inverting: H + lambda * I. Without it a singular H (fewer tokens than inputs, or a dead input) "
            "cannot be inverted.",
            expect=lambda case: None if case.extra["singular"] else _loop(damp=0.0)(case),
            raises=_singular_raise),
    Mistake("used_H",
            "Your updates use H where the OBS update needs its inverse: invert the damped Hessian (or take "
            "the Cholesky factor of H^-1, not of H) before the loop.",
            matches=_any_of(_loop(inverse="H"), _loop(inverse="H_cholesky"))),
    Mistake("err_not_divided",
            "The error is not divided by the diagonal: with U's row, err = (W[:, q] - Q[:, q]) / U[q, q]; "
            "with H^-1's row, the update is -(w - q) / Hinv[q, q] * Hinv[q, q+1:].",
            matches=_any_of(_loop(err="raw"), _loop(err="times"))),
    Mistake("sign_flipped",
            "Your updates push the remaining weights the wrong way: W[:, q+1:] -= outer(err, U[q, q+1:]) "
            "(minus), with err = (W[:, q] - Q[:, q]) / U[q, q].",
            expect=_loop(sign=-1.0)),
    Mistake("asym",
            "Your grid is asymmetric (zero = round(-min / scale)); this exercise uses the symmetric one: "
            "zero = 2**(bits-1), scale = 2 * max|w| / (2**bits - 1) per row, from W before the loop.",
            expect=_asym),
    Mistake("per_column_scale",
            "Your scale is one per column, shared by all rows (the seed lesson's grid). Use one symmetric "
            "scale per row, computed from W before the loop (your check_rtn_grid function, with sym=True).",
            expect=_loop(grid="column")),
]


def _loop_same(got, expected, case: Case) -> bool:
    W = case.args[0]
    return close(got, expected, 1e-6, 1e-9 * max(1.0, float(np.abs(W).max())))


def _loop_explain(got, expected, case: Case):
    name, how = array_difference("Q", got, expected, 1e-6, 1e-9, "the shape of W")
    if name == "wrong_values" and np.asarray(got).shape == expected.shape:
        first = int(np.argwhere(~np.isclose(got, expected, 1e-6, 1e-9))[0][1])
        how += f"; the first column that differs is {first}"
        if first == 0:
            how += " (column 0 gets no update: it is plain rounding on the row's grid)"
    return name, how


def check_gptq_loop(fn) -> Result:
    """fn(W (rows, cols), H (cols, cols), bits) -> Q (rows, cols), de-quantized: GPTQ with one symmetric scale
    per row from W, 1% damping, columns in their natural order, no lazy batches; it must equal
    gptq_quantize(W, H, QuantConfig(bits=bits, group_size=-1, sym=True, damp_percent=0.01)).weight."""
    cases = list(_loop_cases())
    return run(Exercise(
        "check_gptq_loop", cases, lambda raw, case: to_array(raw, "Q").astype(np.float64), _loop_same,
        _loop_explain, _LOOP_MISTAKES,
        f"Your GPTQ loop equals the engine's gptq_quantize on all {len(cases)} cases: 2, 3 and 4 bits, a "
        "singular and a badly conditioned H, a row with no negative weight and an all-zero row."), fn)


# ------------------------------------------------------------------ lesson 6: the Hessian


@cache
def _hessian_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(6)
    dead = rng.normal(size=(20, 5))
    dead[:, 2] = 0.0
    out = []
    for label, X in (
        ("32 tokens of 6 inputs", rng.normal(0.5, 1.0, size=(32, 6))),
        ("3 sequences of 10 tokens, shape (3, 10, 4)", rng.normal(size=(3, 10, 4))),
        ("5 tokens of 8 inputs: fewer tokens than inputs", rng.normal(size=(5, 8))),
        ("input 2 is always zero (a dead input)", dead),
        ("a single token", rng.normal(size=(1, 4))),
    ):
        out.append(Case(label, (X,), f"X {shape_str(X.shape)}", Hessian(X.shape[-1]).add_batch(X).H))
    return tuple(out)


def _flat(case: Case) -> np.ndarray:
    X = case.args[0]
    return X.reshape(-1, X.shape[-1])


def _scaled(f):
    def expect(case: Case):
        X = _flat(case)
        return f(X.T @ X, X.shape[0], case.args[0])
    return expect


def _outer_tokens(got, case: Case):
    X = _flat(case)
    n = X.shape[0]
    G = np.asarray(got)
    if G.shape != (n, n):
        return False
    K = X @ X.T
    return any(close(G, c * K, 1e-9) for c in (2 / n, 1.0, 1 / n, 2.0))


def _not_flattened(got, case: Case) -> bool:
    """Right on (tokens, d_in), wrong on (batch, seq, d_in)."""
    right = _safe_close(got, case.expected)
    return not right if case.args[0].ndim == 3 else right


def _safe_close(got, expected) -> bool:
    try:
        return close(got, expected, 1e-9, 1e-12)
    except (TypeError, ValueError):
        return False


def _centered(case: Case):
    X = _flat(case)
    Xc = X - X.mean(axis=0)
    return 2.0 / X.shape[0] * Xc.T @ Xc


_HESSIAN_MISTAKES = [
    Mistake("missing_2_over_n",
            "Your H is X^T X: scale it by 2 / n (n = the number of tokens), H = 2/n X^T X. GPTQ's rounding "
            "does not change with that factor (damping is relative to mean(diag H)), but the OBS losses do, "
            "and the engine's H is 2/n X^T X.",
            expect=_scaled(lambda K, n, X: K)),
    Mistake("missing_2",
            "Your H is the mean of x x^T over tokens, X^T X / n: the Hessian of the squared error has a "
            "factor 2, H = 2/n X^T X.",
            expect=_scaled(lambda K, n, X: K / n)),
    Mistake("missing_n",
            "Your H is 2 X^T X: divide by the number of tokens n, H = 2/n X^T X, so that H does not grow "
            "with the calibration set.",
            expect=_scaled(lambda K, n, X: 2 * K)),
    Mistake("divided_by_sequences",
            "For (batch, seq, d_in) inputs you divided by the number of sequences (as the paper's reference "
            "code does): n counts tokens, batch × seq. Flatten first: X = X.reshape(-1, X.shape[-1]).",
            expect=_scaled(lambda K, n, X: 2.0 / (X.shape[0] if X.ndim == 3 else n) * K)),
    Mistake("not_flattened",
            "Your function handles (tokens, d_in) inputs but not a batch of sequences (batch, seq, d_in): "
            "flatten it first, X = X.reshape(-1, X.shape[-1]), and count n in tokens.",
            matches=_not_flattened, raises=lambda case, exc: case.args[0].ndim == 3),
    Mistake("tokens_by_tokens",
            "Your H is tokens × tokens: that is X X^T. The Hessian is over the inputs, d_in × d_in: H = 2/n "
            "X^T X with X of shape (tokens, d_in).",
            matches=_outer_tokens),
    Mistake("centered",
            "You subtracted the mean (a covariance). GPTQ's Hessian uses the inputs as the layer sees them: "
            "H = 2/n X^T X, no centring.",
            expect=_centered),
]


def _hessian_explain(got, expected, case: Case):
    d = expected.shape[0]
    return array_difference("H", got, expected, 1e-9, 1e-12, f"d_in × d_in = ({d}, {d})")


def check_hessian(fn) -> Result:
    """fn(X) -> H (d_in, d_in): the layer Hessian H = 2/n X^T X of engine.Hessian, X of shape (tokens, d_in)
    or (batch, seq, d_in), n counting tokens."""
    cases = list(_hessian_cases())
    return run(Exercise(
        "check_hessian", cases, lambda raw, case: to_array(raw, "H").astype(np.float64),
        lambda got, expected, case: close(got, expected, 1e-9, 1e-12), _hessian_explain, _HESSIAN_MISTAKES,
        f"Your Hessian equals the engine's Hessian(d_in).add_batch(X).H on all {len(cases)} cases, batches "
        "of sequences, a dead input and fewer tokens than inputs included."), fn)


# ------------------------------------------------------------------ lesson 6: damping


def _damp_case(label: str, rng, tokens: int, d: int, damp: float, spread: float = 2.0) -> Case:
    X = rng.normal(size=(tokens, d)) * np.geomspace(1.0, spread, d)[rng.permutation(d)]
    H = Hessian(d).add_batch(X).H
    cfg = QuantConfig(bits=4, group_size=-1, damp_percent=damp, desc_act=False, static_groups=False)
    damped = GPTQStepper(np.zeros((1, d)), H, cfg).prepared.H
    return Case(label, (H, damp), f"H {shape_str(H.shape)}, damp_percent={damp:g}", np.asarray(damped))


@cache
def _damp_cases() -> tuple[Case, ...]:
    rng = np.random.default_rng(7)
    return (
        _damp_case("6 inputs, 1%", rng, 40, 6, 0.01),
        _damp_case("4 inputs, 10%", rng, 30, 4, 0.1),
        _damp_case("3 tokens of 7 inputs: H is singular", rng, 3, 7, 0.01),
        _damp_case("a very uneven diagonal, 5%", rng, 50, 5, 0.05, spread=30.0),
    )


def _damped(lam):
    def expect(case: Case):
        H, p = case.args
        return H + lam(H, p) * np.eye(H.shape[0])
    return expect


def _replaced(case: Case):
    H, p = case.args
    out = H.copy()
    np.fill_diagonal(out, p * np.mean(np.diag(H)))
    return out


_DAMP_MISTAKES = [
    Mistake("max_diag",
            "Your lambda comes from the largest diagonal entry; the engine (like the reference) uses the "
            "mean: lambda = damp_percent * mean(diag H).",
            expect=_damped(lambda H, p: p * np.max(np.diag(H)))),
    Mistake("trace",
            "Your lambda uses the sum of the diagonal (the trace); use its mean: lambda = damp_percent * "
            "np.mean(np.diag(H)).",
            expect=_damped(lambda H, p: p * np.trace(H))),
    Mistake("absolute",
            "You added damp_percent itself. It is relative: lambda = damp_percent * mean(diag H), so the "
            "same setting works whatever H's scale.",
            expect=_damped(lambda H, p: p)),
    Mistake("divided_by_100",
            "damp_percent is already a fraction (0.01 means 1%): lambda = damp_percent * mean(diag H), "
            "without dividing by 100.",
            expect=_damped(lambda H, p: p / 100 * np.mean(np.diag(H)))),
    Mistake("every_entry",
            "You added lambda to every entry of H (H + lambda); damping adds it to the diagonal only: H + "
            "lambda * np.eye(n).",
            expect=lambda case: case.args[0] + case.args[1] * np.mean(np.diag(case.args[0]))),
    Mistake("diagonal_replaced",
            "You replaced the diagonal by lambda; add it to the diagonal: H + lambda * np.eye(n).",
            expect=_replaced),
]


def check_damping(fn) -> Result:
    """fn(H, damp_percent) -> the damped Hessian H + lambda I, lambda = damp_percent * mean(diag H): the H the
    engine's GPTQ factors (GPTQStepper(...).prepared.H)."""
    cases = list(_damp_cases())
    return run(Exercise(
        "check_damping", cases, lambda raw, case: to_array(raw, "the damped H").astype(np.float64),
        lambda got, expected, case: close(got, expected, 1e-10, 1e-14),
        lambda got, expected, case: array_difference("H_damped", got, expected, 1e-10, 1e-14,
                                                     "the shape of H"),
        _DAMP_MISTAKES,
        f"Your damping equals the engine's on all {len(cases)} cases (lambda = damp_percent × mean(diag H) = "
        f"{fmt(cases[0].args[1] * np.mean(np.diag(cases[0].args[0])))} on the first)."), fn)


MISTAKES = {"check_gptq_loop": _LOOP_MISTAKES, "check_hessian": _HESSIAN_MISTAKES,
            "check_damping": _DAMP_MISTAKES}
