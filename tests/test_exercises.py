"""gptq_explorer.exercises: every check passes a correct answer written as a learner would write it,
recognises each of its named wrong answers with the right diagnosis, and reports (never raises on) a raising
function, a None and a wrong shape."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

from gptq_explorer import exercises as ex
from gptq_explorer.exercises import loop as ex_loop
from gptq_explorer.exercises import obs as ex_obs

# ------------------------------------------------------------------ learners' answers, right and wrong
# Each takes `mistake=None` (the right answer) or the name of a mistake, and makes that mistake.


def rtn_grid(w, bits, sym, mistake=None):
    axis = 0 if mistake == "per_column" else 1
    maxq = 2**bits - 1
    lo, hi = w.min(axis=axis), w.max(axis=axis)
    if mistake != "range_without_zero":
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    if sym:
        amax = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -amax, lo) if mistake == "sym_not_symmetrized" else -amax
        hi = amax
    if mistake != "zero_row_not_handled":
        empty = (lo == 0) & (hi == 0)
        lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    if sym and mistake == "sym_scale_max_int":
        scale = hi / (2 ** (bits - 1) - 1)
    if sym:
        zero = np.full_like(scale, 2 ** (bits - 1) - (mistake == "sym_zero_off_by_one"))
    else:
        zero = -lo / scale if mistake == "asym_zero_not_rounded" else np.round(-lo / scale)
    return scale, zero


def obs_update(w, Hinv, q, wq, mistake=None):
    c = w[q] - wq
    M = np.linalg.inv(Hinv) if mistake == "used_H" else Hinv
    d = {"not_divided_by_hinv_qq": 1.0, "divided_by_sqrt": np.sqrt(M[q, q])}.get(mistake, M[q, q])
    delta = -c / d * M[:, q]
    if mistake == "sign_flipped":
        delta = -delta
    if mistake == "forgot_delta_q":
        delta[q] = 0.0
    return w + delta if mistake == "returned_new_weights" else delta


def obs_loss(w, Hinv, q, wq, mistake=None):
    c = w[q] - wq
    return {"missing_half": c**2 / Hinv[q, q], "multiplied_by_hinv": c**2 * Hinv[q, q] / 2,
            "no_compensation": c**2 * np.linalg.inv(Hinv)[q, q] / 2,
            "not_squared": abs(c) / (2 * Hinv[q, q])}.get(mistake, c**2 / (2 * Hinv[q, q]))


def gptq_loop(W, H, bits, mistake=None):
    W = W.astype(np.float64).copy()
    n = W.shape[1]
    damp = 0.0 if mistake == "no_damping" else 0.01
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(n)
    if mistake in ("no_downdate", "seed_lesson_loop"):
        M = np.linalg.inv(Hd)
    elif mistake == "used_H":
        M = np.linalg.cholesky(Hd).T
    else:
        M = np.linalg.cholesky(np.linalg.inv(Hd)).T  # row q: H_F^-1[q, q:] / sqrt(H_F^-1[q, q])
    maxq = 2**bits - 1
    if mistake == "asym":
        lo, hi = np.minimum(W.min(1), 0), np.maximum(W.max(1), 0)
        lo, hi = np.where(hi > lo, lo, -1.0), np.where(hi > lo, hi, 1.0)
        scale = (hi - lo) / maxq
        zero = np.round(-lo / scale)
    else:
        amax = np.abs(W).max(axis=1)
        amax = np.where(amax == 0, 1.0, amax)
        scale, zero = 2 * amax / maxq, np.full(len(W), 2 ** (bits - 1))
    Q = np.zeros_like(W)
    for q in range(n):
        w = W[:, q]
        if mistake in ("per_column_scale", "seed_lesson_loop"):
            s = np.abs(w).max() / (2 ** (bits - 1) - 1)
            codes = np.clip(np.round(w / s), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
            Q[:, q] = codes * s
        else:
            codes = np.clip(np.round(w / scale) + zero, 0, maxq)
            Q[:, q] = scale * (codes - zero)
        if mistake != "rtn":
            err = (w - Q[:, q]) if mistake == "err_not_divided" else (w - Q[:, q]) / M[q, q]
            sign = -1 if mistake == "sign_flipped" else 1
            W[:, q + 1 :] -= sign * np.outer(err, M[q, q + 1 :])
        if mistake == "returned_codes":
            Q[:, q] = codes
    return Q


def bits_per_weight(out_features, in_features, bits, group_size, mistake=None):
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    if mistake == "fractional_groups":
        groups = 1 if group_size == -1 else in_features / group_size
    if mistake == "rule_of_thumb":
        return bits + (16 + bits) / group_size
    if mistake == "swapped_in_out":
        out_features, in_features = in_features, out_features
        groups = 1 if group_size == -1 else -(-in_features // group_size)
    total = {"qweight": in_features * bits * out_features, "qzeros": groups * out_features * bits,
             "scales": groups * out_features * (32 if mistake == "scales_fp32" else 16),
             "g_idx": 32 * in_features}
    total.pop({"forgot_g_idx": "g_idx", "forgot_zeros": "qzeros"}.get(mistake, ""), None)
    return sum(total.values()) / (out_features * in_features)


def dequantize(codes, scales, zeros, g_idx, mistake=None):
    if mistake == "ignored_g_idx":
        g_idx = np.arange(codes.shape[1]) // -(-codes.shape[1] // scales.shape[1])
    s, z = scales[:, g_idx], zeros[:, g_idx].astype(np.float64)
    return {"zero_not_subtracted": s * codes, "zero_added": s * (codes + z),
            "scale_divided": (codes - z) / s}.get(mistake, s * (codes - z))


def act_order_perm(H, mistake=None):
    d = np.diag(H)
    return {"ascending": np.argsort(d, kind="stable"), "ties_reversed": np.argsort(d, kind="stable")[::-1],
            "inverse_perm": np.argsort(np.argsort(-d, kind="stable")),
            "sorted_values": np.sort(d)[::-1]}.get(mistake, np.argsort(-d, kind="stable"))


def group_index(perm, group_size, mistake=None):
    return {"perm_not_inverted": perm // group_size, "natural_groups": np.arange(len(perm)) // group_size,
            "no_division": np.argsort(perm)}.get(mistake, np.argsort(perm) // group_size)


def hessian(X, mistake=None):
    if mistake == "not_flattened":
        return 2 * X.T @ X / len(X)  # (tokens, d_in) only: raises on (batch, seq, d_in)
    n = X.shape[0] if mistake == "divided_by_sequences" else None
    X = X.reshape(-1, X.shape[-1]).astype(np.float64)
    n = n or X.shape[0]
    if mistake == "centered":
        X = X - X.mean(axis=0)
    if mistake == "tokens_by_tokens":
        return 2 / n * X @ X.T
    scale = {"missing_2_over_n": 1.0, "missing_2": 1 / n, "missing_n": 2.0}.get(mistake, 2 / n)
    return scale * X.T @ X


def damping(H, damp_percent, mistake=None):
    d = np.diag(H)
    lam = {"max_diag": damp_percent * d.max(), "trace": damp_percent * d.sum(), "absolute": damp_percent,
           "divided_by_100": damp_percent / 100 * d.mean()}.get(mistake, damp_percent * d.mean())
    if mistake == "every_entry":
        return H + lam
    if mistake == "diagonal_replaced":
        out = H.copy()
        np.fill_diagonal(out, lam)
        return out
    return H + lam * np.eye(len(H))


def perplexity(nll, mistake=None):
    nll = np.asarray(nll)
    return {"mean_of_exp": np.mean(np.exp(nll)), "exp_of_sum": math.exp(nll.sum()), "no_exp": nll.mean(),
            "base_2": 2 ** nll.mean()}.get(mistake, math.exp(nll.mean()))


def pack_int32(codes, mistake=None):
    c = codes if mistake == "shift_overflow" else codes.astype(np.uint32)
    if mistake == "not_transposed":
        out = np.zeros((c.shape[0], c.shape[1] // 8), dtype=np.uint32)
        for i in range(8):
            out |= c[:, i::8] << (4 * i)
        return out.view(np.int32)
    c = c if mistake == "packed_along_outputs" else c.T  # (inputs, outputs): pack along axis 0
    out = np.zeros((c.shape[0] // 8, c.shape[1]), dtype=np.uint32)
    for i in range(8):
        out |= c[i::8] << (4 * (7 - i) if mistake == "high_bits_first" else 4 * i)
    return out if mistake == "wrong_dtype" else out.view(np.int32)


# check -> (the learner's function, a word each named mistake's message must contain)
CHECKS = {
    "check_rtn_grid": (rtn_grid, {
        "per_column": "axis=1", "sym_zero_off_by_one": "2**(bits-1)", "sym_scale_max_int": "2 * max|w|",
        "sym_not_symmetrized": "quirk", "range_without_zero": "include 0", "asym_zero_not_rounded": "round",
        "zero_row_not_handled": "all-zero row"}),
    "check_obs_update": (obs_update, {
        "returned_new_weights": "delta itself", "sign_flipped": "minus", "not_divided_by_hinv_qq": "divide",
        "divided_by_sqrt": "sqrt", "used_H": "Hinv itself", "forgot_delta_q": "delta[q] = wq - w[q]"}),
    "check_obs_loss": (obs_loss, {
        "missing_half": "1/2", "multiplied_by_hinv": "divide by it", "no_compensation": "compensate",
        "not_squared": "**2"}),
    "check_gptq_loop": (gptq_loop, {
        "returned_codes": "de-quantized", "rtn": "round-to-nearest", "no_downdate": "downdated",
        "no_damping": "damping", "used_H": "inverse", "err_not_divided": "divided", "sign_flipped": "minus",
        "asym": "symmetric", "per_column_scale": "one symmetric scale per row",
        "seed_lesson_loop": "never downdated"}),
    "check_bits_per_weight": (bits_per_weight, {
        "rule_of_thumb": "rule of thumb", "forgot_g_idx": "g_idx", "forgot_zeros": "zero points",
        "scales_fp32": "fp16", "fractional_groups": "ceil", "swapped_in_out": "swapped"}),
    "check_dequantize": (dequantize, {
        "zero_not_subtracted": "subtracting", "zero_added": "subtract", "scale_divided": "multiplies",
        "ignored_g_idx": "g_idx"}),
    "check_act_order_perm": (act_order_perm, {
        "ascending": "largest", "ties_reversed": "stable", "inverse_perm": "inverse permutation",
        "sorted_values": "np.argsort"}),
    "check_group_index": (group_index, {
        "perm_not_inverted": "argsort(perm)", "natural_groups": "without act-order",
        "no_division": "divide"}),
    "check_hessian": (hessian, {
        "missing_2_over_n": "2 / n", "missing_2": "factor 2", "missing_n": "number of tokens",
        "divided_by_sequences": "sequences", "not_flattened": "reshape", "tokens_by_tokens": "X X^T",
        "centered": "mean"}),
    "check_damping": (damping, {
        "max_diag": "mean", "trace": "trace", "absolute": "relative", "divided_by_100": "fraction",
        "every_entry": "diagonal only", "diagonal_replaced": "replaced"}),
    "check_perplexity": (perplexity, {
        "mean_of_exp": "mean of exponentials", "exp_of_sum": "sum", "no_exp": "exponential",
        "base_2": "nats"}),
    "check_pack_int32": (pack_int32, {
        "wrong_dtype": "int32", "not_transposed": "transpose", "packed_along_outputs": "neighbouring inputs",
        "high_bits_first": "low bits first", "shift_overflow": "uint8"}),
}

ARITY = {"check_rtn_grid": 3, "check_obs_update": 4, "check_obs_loss": 4, "check_gptq_loop": 3,
         "check_bits_per_weight": 4, "check_dequantize": 4, "check_act_order_perm": 1, "check_group_index": 2,
         "check_hessian": 1, "check_damping": 2, "check_perplexity": 1, "check_pack_int32": 1}

MISTAKE_CASES = [(check, m) for check, (_, words) in CHECKS.items() for m in words]


def test_the_fixed_api_and_the_table():
    for name in ("check_rtn_grid", "check_obs_update", "check_gptq_loop", "check_pack_int32"):
        assert callable(getattr(ex, name))
    assert set(ex.CHECKS) == set(CHECKS) and len(ex.CHECKS) >= 12
    assert sorted(ex.LESSONS) == list(range(1, 9))
    for name, (_, words) in CHECKS.items():  # every named mistake is tested below, and there are at least 2
        assert set(ex.MISTAKES[name]) == set(words), name
        assert len(words) >= 2


@pytest.mark.parametrize("check", list(CHECKS))
def test_a_right_answer_passes(check):
    result = getattr(ex, check)(CHECKS[check][0])
    assert result, result.message
    assert result.passed is True and result.mistake is None and "Correct" in str(result)


@pytest.mark.parametrize(("check", "mistake"), MISTAKE_CASES)
def test_each_named_mistake_is_recognised(check, mistake):
    fn, words = CHECKS[check]
    result = getattr(ex, check)(partial(fn, mistake=mistake))
    assert not result
    assert result.mistake == mistake, result.message
    assert words[mistake] in result.message, result.message
    assert "case '" in result.message  # where it was seen
    assert "other ways too" not in result.message  # the mistake explains every case


def _raising(*args):
    raise ValueError("not written yet")


@pytest.mark.parametrize("check", list(CHECKS))
def test_a_raising_function_is_reported(check):
    result = getattr(ex, check)(_raising)
    assert not result and result.mistake == "raised"
    assert "ValueError: not written yet" in result.message and "line 2 of your function" in result.message


@pytest.mark.parametrize("check", list(CHECKS))
def test_a_function_returning_none_is_reported(check):
    def forgot_return(*args):
        pass

    result = getattr(ex, check)(forgot_return)
    assert not result and result.mistake == "returned_none" and "return" in result.message


@pytest.mark.parametrize("check", list(CHECKS))
def test_a_wrong_shape_is_reported(check):
    def wrong_shape(*args):
        out = CHECKS[check][0](*args)
        if isinstance(out, tuple):
            return tuple(np.append(np.asarray(o), 0.0) for o in out)
        return np.append(np.asarray(out), 0.0)[None] if np.ndim(out) else np.array([out, out])

    result = getattr(ex, check)(wrong_shape)
    assert not result and result.mistake == "wrong_shape", result.message
    assert "shape" in result.message


@pytest.mark.parametrize("check", list(CHECKS))
def test_odd_answers_never_crash_a_check(check):
    n = ARITY[check]
    for odd in (lambda *a: "scale", lambda *a: {"a": 1}, lambda *a: [object()], lambda *a: np.nan,
                lambda *a: (1, 2, 3), lambda *a: np.zeros((0,)), lambda *a: 1 / 0):
        result = getattr(ex, check)(odd)
        assert not result and result.message and result.mistake
    assert getattr(ex, check)(None).mistake == "not_a_function"
    assert not getattr(ex, check)(lambda: 0)  # too few parameters: a TypeError, reported
    assert n >= 1


def test_the_messages_say_where_and_what():
    # a wrong value: the entry, the expected value and the case
    r = ex.check_rtn_grid(lambda w, bits, sym: (rtn_grid(w, bits, sym)[0] * 1.5, rtn_grid(w, bits, sym)[1]))
    assert r.mistake == "wrong_values" and "scale[0] is" in r.message and "expected" in r.message
    # an exception: its type, text and the line of the learner's code
    def grid(w, bits, sym):
        scale = w.max(axis=2)
        return scale, scale

    r = ex.check_rtn_grid(grid)
    assert r.mistake == "raised" and "AxisError" in r.message and "scale = w.max(axis=2)" in r.message
    # two mistakes at once: no single diagnosis, but the case that fits one is named
    def two(w, bits, sym):
        scale, zero = rtn_grid(w, bits, sym, mistake="sym_zero_off_by_one")
        return scale, (zero if sym else -np.min(np.minimum(w, 0), axis=1) / scale)

    r = ex.check_rtn_grid(two)
    assert not r and r.mistake == "sym_zero_off_by_one" and "other ways too" in r.message


def test_the_gptq_loop_that_crashes_without_damping_is_named():
    def no_damping(W, H, bits):
        if np.linalg.matrix_rank(H) < len(H):
            raise np.linalg.LinAlgError("Matrix is not positive definite")
        return gptq_loop(W, H, bits, mistake="no_damping")

    r = ex.check_gptq_loop(no_damping)
    assert r.mistake == "no_damping" and "LinAlgError" in r.message


def test_other_forms_of_a_mistake():
    def others_only(w, Hinv, q, wq):  # delta without its q-th entry
        return np.delete(obs_update(w, Hinv, q, wq), q)

    assert ex.check_obs_update(others_only).mistake == "forgot_delta_q"

    def torch_like(W, H, bits):  # torch's Cholesky error on the singular H, no damping elsewhere
        if np.linalg.matrix_rank(H) < len(H):
            raise RuntimeError("linalg.cholesky: The factorization could not be completed because the "
                               "input is not positive-definite.")
        return gptq_loop(W, H, bits, mistake="no_damping")

    assert ex.check_gptq_loop(torch_like).mistake == "no_damping"

    def pack_outputs_int64(codes):  # along the outputs; crashes where outputs are not a multiple of 8
        c = codes.astype(np.int64)
        return sum(c[i::8] << (4 * i) for i in range(8)).astype(np.uint32).view(np.int32)

    assert ex.check_pack_int32(pack_outputs_int64).mistake == "packed_along_outputs"
    assert ex.check_pack_int32(lambda codes: pack_int32(codes).astype(np.int64)).mistake == "wrong_dtype"
    assert ex.check_pack_int32(lambda codes: pack_int32(codes).astype(np.float64)).mistake == "wrong_dtype"

    def zero_rows_scale_one(w, bits, sym):  # any positive scale on an all-zero row is fine
        scale, zero = rtn_grid(w, bits, sym)
        return np.where(np.any(w != 0, axis=1), scale, 1.0), zero

    assert ex.check_rtn_grid(zero_rows_scale_one)


def test_pack_accepts_codes_alone_or_codes_and_bits():
    assert ex.check_pack_int32(lambda codes, bits: pack_int32(codes))
    assert ex.check_pack_int32(lambda codes: pack_int32(codes))
    assert ex.check_pack_int32(lambda codes, bits=4: pack_int32(codes))


def test_answers_may_be_lists_or_tensors():
    torch = pytest.importorskip("torch")
    assert ex.check_hessian(lambda X: torch.from_numpy(hessian(X)))
    assert ex.check_act_order_perm(lambda H: act_order_perm(H).tolist())
    assert ex.check_perplexity(lambda nll: torch.tensor(math.exp(np.mean(nll)), dtype=torch.float64))


def test_the_learner_cannot_spoil_the_cases():
    def scribbles(W, H, bits):
        Q = gptq_loop(W, H, bits)
        W[:] = 0.0
        H[:] = 0.0
        return Q

    assert ex.check_gptq_loop(scribbles)
    assert ex.check_gptq_loop(gptq_loop)  # the cases are as they were


def test_the_engine_answers_are_the_textbook_formulas():
    # check_obs_update/check_obs_loss take their truth from the engine's Cholesky row; it is Eq. 3
    for case in ex_obs._update_cases():
        w, Hinv, q, wq = case.args
        eq3 = -(w[q] - wq) / Hinv[q, q] * Hinv[:, q]
        np.testing.assert_allclose(case.expected, eq3, rtol=1e-9, atol=1e-12)
    for case in ex_obs._loss_cases():
        w, Hinv, q, wq = case.args
        assert case.expected == pytest.approx((w[q] - wq) ** 2 / (2 * Hinv[q, q]), rel=1e-9, abs=1e-15)
    # the mistakes' column loop, switched to no mistake, is the engine's GPTQ
    for case in ex_loop._loop_cases():
        np.testing.assert_allclose(ex_loop.column_loop(*case.args), case.expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("check", list(CHECKS))
def test_each_mistake_differs_from_the_right_answer(check):
    """A mistake that the cases cannot tell from the right answer would be a useless name."""
    fn, words = CHECKS[check]
    right = getattr(ex, check)(fn)
    assert right
    for mistake in words:
        assert not getattr(ex, check)(partial(fn, mistake=mistake))


def test_the_result_shows_in_a_notebook():
    ok, bad = ex.Result(True, "All 4 cases match."), ex.Result(False, "Use <axis=1> & round.", "per_column")
    assert ok and not bad and bool(ok) is True
    page = ok._repr_html_()
    assert "Correct" in page and "#1a7f37" in page and 'role="status"' in page
    html = bad._repr_html_()
    assert "Not yet" in html and "&lt;axis=1&gt; &amp; round" in html and "per_column" in html
    assert bad._repr_markdown_().startswith("**✘ Not yet.**") and "`per_column`" in bad._repr_markdown_()
    assert str(bad).startswith("✘ Not yet.") and "per_column" in str(bad)
    assert ex.Result(False, "m").mistake is None


@pytest.mark.parametrize("name", sorted(ex.CHECKS))
def test_a_stub_not_yet_written_is_told_so(name):
    """The lessons' stubs raise NotImplementedError: the check says the function is not written yet; a
    function that raises it on some cases only has a bug, and is told where."""
    def stub(*args, **kwargs):
        raise NotImplementedError("write this function")

    r = ex.CHECKS[name](stub)
    assert not r and r.mistake == "not_written" and r.message.startswith("Write the function first")

    calls = []

    def partly(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise NotImplementedError("not this case")
        return stub_value

    stub_value = None
    r = ex.CHECKS[name](partly)
    assert not r and r.mistake != "not_written"
