"""services.threads: one BLAS thread inside single_blas_thread (nested, from several threads), restored after;
the thread count from the environment."""

import threading

import numpy as np  # noqa: F401 - loads NumPy's BLAS, which single_blas_thread limits
import pytest
from threadpoolctl import threadpool_limits

from gptq_explorer.services import threads


def test_single_blas_thread_limits_and_restores():
    if not threads.blas_threads():
        pytest.skip("no BLAS library that threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas"):
        before = threads.blas_threads()
        assert max(before) == 2
        inside_other = []

        def other():
            with threads.single_blas_thread():
                inside_other.append(threads.blas_threads())

        with threads.single_blas_thread():
            assert set(threads.blas_threads()) == {1}
            with threads.single_blas_thread():  # nested in the same thread
                assert set(threads.blas_threads()) == {1}
            assert set(threads.blas_threads()) == {1}
            t = threading.Thread(target=other)
            t.start()
            t.join(10)
            assert set(threads.blas_threads()) == {1}  # the other thread left; this one is still inside
        assert inside_other == [[1] * len(before)]
        # the last one out restores (OpenBLAS takes a larger count only from the thread that set it:
        # raising it from a worker thread is ignored, so this checks the restore in the main thread)
        assert threads.blas_threads() == before


@pytest.mark.parametrize(
    "env, want",
    [({}, None), ({"GPTQ_EXPLORER_THREADS": "3"}, 3), ({"OMP_NUM_THREADS": "2"}, 2),
     ({"GPTQ_EXPLORER_THREADS": "4", "OMP_NUM_THREADS": "2"}, 4), ({"GPTQ_EXPLORER_THREADS": "x"}, None),
     ({"GPTQ_EXPLORER_THREADS": "0"}, None)],
)
def test_env_threads(env, want):
    assert threads.env_threads(env) == want
