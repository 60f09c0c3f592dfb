"""How many threads the maths may use.

`single_blas_thread()`: GPTQ's column loop is thousands of small BLAS calls; on a busy machine each of
them waits for a second core when BLAS runs threaded (docs/performance.md has the measurement), so the
Layer Lab, the Sweeps and the lessons compute with one BLAS thread. threadpoolctl finds every loaded BLAS
(NumPy's and SciPy's bundled OpenBLAS, MKL, ...) on every platform; the limit is nested and thread-safe
here and restored on exit.

`configure_threads()`: applies GPTQ_EXPLORER_THREADS (or OMP_NUM_THREADS) to torch without importing it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

THREADS_ENV = "GPTQ_EXPLORER_THREADS"

_lock = threading.Lock()
_depth = 0
_limit = None  # the threadpoolctl limiter while at least one caller is inside single_blas_thread


@contextlib.contextmanager
def single_blas_thread():
    """Run the body with BLAS limited to one thread. Callers in several threads share one limit, set by
    the first to enter and lifted by the last to leave (threadpoolctl's own limiter is not reentrant
    across threads)."""
    global _depth, _limit
    with _lock:
        if _depth == 0:
            from threadpoolctl import threadpool_limits

            _limit = threadpool_limits(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _limit is not None:
                _limit.restore_original_limits()
                _limit = None


def blas_threads() -> list[int]:
    """The thread count of each loaded BLAS library (what single_blas_thread changes)."""
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]


def env_threads(env=None) -> int | None:
    """GPTQ_EXPLORER_THREADS, else OMP_NUM_THREADS, as a positive count; None when neither names one."""
    env = os.environ if env is None else env
    value = env.get(THREADS_ENV) or env.get("OMP_NUM_THREADS")
    try:
        threads = int(value or 0)
    except ValueError:
        threads = 0
    return threads if threads >= 1 else None


def configure_threads() -> int | None:
    """Apply env_threads() to torch; returns the count set (None when the environment names none). torch is
    not imported for this (see gptq_explorer.lazy_torch): when it is not loaded yet, OMP_NUM_THREADS is set
    instead, which torch takes as its thread count on import."""
    threads = env_threads()
    if threads is None:
        return None
    set_threads = getattr(sys.modules.get("torch"), "set_num_threads", None)  # None: not (yet) imported
    if set_threads is not None:
        set_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads
