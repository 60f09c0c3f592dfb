"""Limit OpenBLAS threads while the Layer Lab computes a run.

The column loop of GPTQ is thousands of small NumPy/BLAS calls. With OpenBLAS threads on a busy 2-core
machine each of them waits for a second core: measured here, one config change took 1.8 s with the default
2 threads and 0.35 s with 1. `single_blas_thread()` sets every loaded OpenBLAS (NumPy's and SciPy's
bundled copies) to one thread and restores the previous count afterwards. Linux only (it finds the
libraries in /proc/self/maps); elsewhere, or if anything is unexpected, it does nothing.
OMP_NUM_THREADS=1 in the kernel's environment has the same effect for the whole process.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

_PAIRS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)
_lock = threading.Lock()
_found: list | None = None
_depth = 0
_saved: list[int] = []


def _libraries() -> list:
    global _found
    if _found is not None:
        return _found
    found = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for get, set_ in _PAIRS:
                if hasattr(lib, get) and hasattr(lib, set_):
                    g, s = getattr(lib, get), getattr(lib, set_)
                    g.restype, s.argtypes, s.restype = ctypes.c_int, [ctypes.c_int], None
                    found.append((g, s))
                    break
    except Exception:  # noqa: BLE001 - best effort: never fail the caller
        found = []
    _found = found
    return found


@contextlib.contextmanager
def single_blas_thread():
    """Run the body with OpenBLAS limited to one thread (nested and thread-safe; restores on exit)."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            libs = _libraries()
            _saved = [g() for g, _ in libs]
            for _, s in libs:
                s(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for (_, s), n in zip(_libraries(), _saved):
                    s(n)
