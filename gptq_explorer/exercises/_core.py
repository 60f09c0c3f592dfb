"""What every check shares: the Result, the cases, the named mistakes, and the loop that runs a learner's
function.

A check is an `Exercise`: a few small seeded `Case`s, each with the engine's own answer (`expected`), a way
to read the learner's answer (`answer`), to compare two answers (`same`) and to say how they differ
(`explain`), and the `Mistake`s it knows. `run(exercise, fn)` calls fn on every case and never raises:

1. every case answered and equal to the engine's answer: passed;
2. else the first mistake that explains every case (each answer equals what the mistake produces, or the
   exception is the one the mistake raises) and at least one of the failures: failed, with its name;
3. else the first failing case: the exception, a None, a wrong type or shape, or the first entry that
   differs, and a mistake that explains that case alone if there is one.
"""

from __future__ import annotations

import html
import inspect
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Result:
    """A check's verdict: truthy when passed; `message` says what was checked or what looks wrong and the fix;
    `mistake` names the recognised mistake (None when passed)."""

    passed: bool
    message: str
    mistake: str | None = None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def verdict(self) -> str:
        return "Correct" if self.passed else "Not yet"

    def __str__(self) -> str:
        tail = f" [mistake: {self.mistake}]" if self.mistake else ""
        return f"{'✔' if self.passed else '✘'} {self.verdict}. {self.message}{tail}"

    def _repr_markdown_(self) -> str:
        tail = f" *(mistake: `{self.mistake}`)*" if self.mistake else ""
        return f"**{'✔' if self.passed else '✘'} {self.verdict}.** {self.message}{tail}"

    def _repr_html_(self) -> str:
        # The verdict is a word as well as a colour and a sign; dark text on a light tint reads in both
        # themes.
        colour, tint = ("#1a7f37", "#e8f5ec") if self.passed else ("#b42318", "#fdeceb")
        sign = "✔" if self.passed else "✘"
        tail = ("" if not self.mistake else
                '<div style="font-size:smaller;margin-top:2px">mistake: '
                f"<code>{html.escape(self.mistake)}</code></div>")
        return (f'<div role="status" style="border-left:6px solid {colour};background:{tint};color:#1f2328;'
                f'padding:6px 10px;margin:4px 0;border-radius:4px">'
                f'<strong style="color:{colour}"><span aria-hidden="true">{sign}</span> '
                f"{self.verdict}.</strong> {html.escape(self.message)}{tail}</div>")


class BadAnswer(Exception):
    """An answer not even of the right kind (not a pair, not numbers, ...): a message and a mistake name."""

    def __init__(self, message: str, mistake: str = "wrong_type"):
        super().__init__(message)
        self.message = message
        self.mistake = mistake


@dataclass
class Case:
    """One call of the learner's function: what is special about it (label), its arguments, a short
    description of them (info), the engine's answer (expected) and anything else the mistakes need (extra)."""

    label: str
    args: tuple
    info: str
    expected: Any = None
    extra: dict = field(default_factory=dict)

    def where(self) -> str:
        return f"case '{self.label}' ({self.info})"


@dataclass
class Mistake:
    """A named wrong answer. Either `expect(case)` gives what the mistake returns (None or an exception:
    cannot tell on this case), compared with the exercise's `same`; or `matches(got, case)` says whether an
    answer is that mistake's (None: cannot tell). `raises(case, exc)`: the mistake fails this way here."""

    name: str
    message: str
    expect: Callable[[Case], Any] | None = None
    matches: Callable[[Any, Case], bool | None] | None = None
    raises: Callable[[Case, BaseException], bool] | None = None


@dataclass
class Exercise:
    name: str
    cases: list[Case]
    answer: Callable[[Any, Case], Any]  # the learner's raw answer -> what `same` compares; raises BadAnswer
    same: Callable[[Any, Any, Case], bool]  # answer vs an expected answer (NaN in expected: any value)
    explain: Callable[[Any, Any, Case], tuple[str, str]]  # (mistake name, how the answer differs)
    mistakes: list[Mistake]
    passed: str
    call: Callable[[Callable, tuple], Any] | None = None  # how to call fn with a case's (copied) args


# ------------------------------------------------------------------ outcomes of one call


@dataclass
class _Raised:
    exc: Exception
    line: str


@dataclass
class _Bad:
    message: str
    mistake: str


@dataclass
class _Got:
    value: Any


def _copy(x):
    return x.copy() if isinstance(x, np.ndarray) else x


def _where_in(fn, exc: BaseException) -> str:
    """' (line 3 of your function: `scale = ...`)' when the traceback passes through fn's own code."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename == code.co_filename and f.name == code.co_name]
    if not frames:
        return ""
    f = frames[-1]
    src = f": `{f.line.strip()}`" if f.line else ""
    return f" (line {f.lineno - code.co_firstlineno + 1} of your function{src})"


def _call(ex: Exercise, fn, case: Case):
    args = tuple(_copy(a) for a in case.args)  # the learner may change its inputs in place
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # a division by zero is reported by the verdict
            raw = ex.call(fn, args) if ex.call else fn(*args)
    except Exception as exc:  # the learner's code may raise anything; the check reports it
        return _Raised(exc, _where_in(fn, exc))
    if raw is None:
        return _Bad("your function returned None: did it forget to `return` its answer?", "returned_none")
    try:
        return _Got(ex.answer(raw, case))
    except BadAnswer as bad:
        return _Bad(bad.message, bad.mistake)
    except Exception as exc:  # an answer too odd even to read
        return _Bad(f"its answer could not be read ({type(exc).__name__}: {exc})", "wrong_type")


def _safe(f, *args):
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return f(*args)
    except Exception:
        return None


def _verdict(ex: Exercise, m: Mistake, got, case: Case) -> bool | None:
    """Is this answer the mistake's on this case? None: the mistake cannot be told on it."""
    if m.matches is not None:
        return _safe(m.matches, got, case)
    expected = _safe(m.expect, case)
    if expected is None:
        return None
    return bool(_safe(ex.same, got, expected, case))


def _explains(ex: Exercise, m: Mistake, outcomes: list) -> bool:
    evidence = False
    for case, out in zip(ex.cases, outcomes, strict=True):
        if isinstance(out, _Raised):
            if m.raises is not None and _safe(m.raises, case, out.exc):
                evidence = True
                continue
            return False
        if not isinstance(out, _Got):
            return False
        verdict = _verdict(ex, m, out.value, case)
        if verdict is None:
            continue
        if not verdict:
            return False
        if not _safe(ex.same, out.value, case.expected, case):
            evidence = True
    return evidence


def run(ex: Exercise, fn) -> Result:
    """Run fn on every case of the exercise and judge it. Never raises (but KeyboardInterrupt)."""
    if not callable(fn):
        return Result(False, f"{ex.name} needs your function itself: {ex.name}(my_function), without "
                             f"parentheses after its name; it got {type(fn).__name__} {_short(fn)}.",
                      "not_a_function")
    outcomes = [_call(ex, fn, case) for case in ex.cases]
    ok = [isinstance(o, _Got) and bool(_safe(ex.same, o.value, c.expected, c))
          for c, o in zip(ex.cases, outcomes, strict=True)]
    if all(ok):
        return Result(True, ex.passed)
    if all(isinstance(o, _Raised) and isinstance(o.exc, NotImplementedError) for o in outcomes):
        return Result(False, "Write the function first: replace the `raise NotImplementedError` line with "
                             "your code, run that cell, then this one again.", "not_written")
    for m in ex.mistakes:
        if _explains(ex, m, outcomes):
            i = next(i for i, o in enumerate(outcomes) if not ok[i])
            return Result(False, f"{m.message} {_detail(ex, ex.cases[i], outcomes[i])}", m.name)
    i = ok.index(False)
    case, out = ex.cases[i], outcomes[i]
    if isinstance(out, _Raised):
        exc = out.exc
        return Result(False, f"Your function raised {type(exc).__name__}: {_short(str(exc), 160)} on "
                             f"{case.where()}{out.line}.", "raised")
    if isinstance(out, _Bad):
        end = "" if out.message.endswith((".", "?", "!")) else "."
        return Result(False, f"On {case.where()}: {out.message}{end}", out.mistake)
    name, how = _safe(ex.explain, out.value, case.expected, case) or ("wrong_values", "its answer differs")
    for m in ex.mistakes:  # a mistake that explains this case, though not every case
        if _verdict(ex, m, out.value, case):
            return Result(False, f"On {case.where()}: {how}. On this case it looks like this mistake: "
                                 f"{m.message} (Other cases differ in other ways too.)", m.name)
    return Result(False, f"On {case.where()}: {how}.", name)


def _detail(ex: Exercise, case: Case, out) -> str:
    if isinstance(out, _Raised):
        return f"(On {case.where()} it raised {type(out.exc).__name__}: {_short(str(out.exc), 100)}.)"
    if isinstance(out, _Got):
        explained = _safe(ex.explain, out.value, case.expected, case)
        if explained:
            return f"(On {case.where()}: {explained[1]}.)"
    return f"(Seen on {case.where()}.)"


# ------------------------------------------------------------------ helpers for the exercises


def _short(x, n: int = 60) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[: n - 1] + "…"


def fmt(x) -> str:
    """A number as a person reads it: 4 significant digits."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return _short(x, 30)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def to_array(raw, what: str) -> np.ndarray:
    """NumPy view of an answer (a torch tensor or a list too); BadAnswer if it holds no numbers."""
    if hasattr(raw, "detach") and hasattr(raw, "cpu"):
        raw = raw.detach().cpu()
        if str(getattr(raw, "dtype", "")) == "torch.bfloat16":
            raw = raw.float()
        raw = raw.numpy()
    try:
        a = np.asarray(raw)
    except Exception:
        raise BadAnswer(f"{what} should be a NumPy array; got {type(raw).__name__}") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise BadAnswer(f"{what} should be an array of numbers; got {type(raw).__name__} {_short(raw)}")
    return a


def to_number(raw, what: str) -> float:
    a = to_array(raw, what)
    if a.size != 1:
        raise BadAnswer(f"{what} should be one number; got an array of shape {a.shape}", "wrong_shape")
    return float(a.reshape(()))


def close(got, expected, rtol: float = 1e-7, atol: float = 1e-12) -> bool:
    """Same shape and equal within tolerance; entries where `expected` is NaN or infinite accept anything."""
    g, e = np.asarray(got), np.asarray(expected, dtype=np.float64)
    if g.shape != e.shape:
        return False
    g = g.astype(np.float64)
    care = np.isfinite(e)
    return bool(np.all(np.isfinite(g[care])) and np.allclose(g[care], e[care], rtol=rtol, atol=atol))


def _index(idx: tuple) -> str:
    return ", ".join(str(int(i)) for i in idx)


def array_difference(name: str, got, expected, rtol: float = 1e-7, atol: float = 1e-12,
                     shape_hint: str = "") -> tuple[str, str]:
    """(mistake, text): how an array answer differs from the expected one: its shape, or its first wrong
    entry."""
    g, e = np.asarray(got), np.asarray(expected)
    if g.shape != e.shape:
        hint = f" ({shape_hint})" if shape_hint else ""
        return "wrong_shape", f"{name} has shape {g.shape}; expected {e.shape}{hint}"
    g64, e64 = g.astype(np.float64), e.astype(np.float64)
    bad = ~np.isclose(g64, e64, rtol=rtol, atol=atol) | (np.isfinite(e64) & ~np.isfinite(g64))
    if not bad.any():
        return "wrong_values", f"{name} is close, but not within the tolerance"
    where = tuple(np.argwhere(bad)[0])
    more = int(bad.sum()) - 1
    tail = f" ({more} more {'entry differs' if more == 1 else 'entries differ'})" if more else ""
    label = f"{name}[{_index(where)}]" if g.ndim else name
    return "wrong_values", f"{label} is {fmt(g64[where])}, expected {fmt(e64[where])}{tail}"


def accepts(fn, n: int) -> bool:
    """Can fn be called with n positional arguments? (True when its signature cannot be read.)"""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def shape_str(shape) -> str:
    return "×".join(str(s) for s in shape)
