"""GPTQ's lazy batch updates (the paper's Step 2) for the torch path, in the R form of gptq_torch.py.

After block k, its source rows V_k reach every later block j as T[j] += C[k, j]^T V_k (transposed layout):
for the pending corrections T = S, C = R (folded: gptq_torch._factor_upper) and V_k = D_k = W0 - Q
over the block's columns; for GPTAQ's term T = Gt, C = M and V_k the block's pre-rounding values. This
module decides when and by which thread those matmuls run; it never changes what they add up to.
"""

from __future__ import annotations

import itertools
import threading

import torch


class LazyUpdates:
    """T[later] += C[k, later]^T V_k after each block k (see the module doc).

    In runs of BLOCKS_PER_MATMUL blocks (pairs): a block's V reaches the next block at once, the blocks after
    that only with the run's last block's V, as one matmul over the run's rows (the same multiply-adds with
    a larger inner dimension, which a CPU's matmul runs faster: docs/performance.md; runs of 3 to 6 blocks
    measured no faster than pairs).

    Pipelined on a multi-core CPU (worker_threads > 0): the share of the next block is applied at once by
    the main thread; the rest (most of the multiply-adds) goes to a worker thread as tasks of a few blocks
    each, nearest columns first, while the main thread quantizes the next blocks' columns (torch ops
    release the GIL). Before a block is used, the main thread waits only for the tasks that write into it,
    and runs queued tasks itself meanwhile. Two tasks never write into the same block at once, and a block
    gets its corrections in the order the blocks finished (results do not depend on the threads' timing).
    """

    BLOCKS_PER_TASK = 4
    BLOCKS_PER_MATMUL = 2

    def __init__(self, T: torch.Tensor, C: torch.Tensor, bounds, worker_threads: int = 0):
        self.T, self.C, self.bounds = T, C, bounds
        self.worker_threads = worker_threads
        self.rows = max(b - a for a, b in bounds)  # the widest block's
        self.sources = None  # room for the held blocks' source rows and the next's: one matrix, no copy
        self.held = None  # (first, last) held block: their rows have reached blocks up to last + 1 only
        self.pending = [0] * len(bounds)  # worker tasks not yet applied, per target block
        self.tasks: list = []  # queued: (first target block, sequence, source rows, end target block, V)
        self.busy = [False] * len(bounds)  # target blocks a running task writes into
        self.sequence = itertools.count()
        self.cond = threading.Condition()
        self.closed = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True) if worker_threads > 0 else None

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        if self.thread is None:
            return
        if exc_type is None:
            self.wait(0, len(self.bounds))
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join()

    def _apply(self, rows: tuple[int, int], j0: int, j1: int, V: torch.Tensor) -> None:
        """T for blocks j0..j1-1 += C[rows, their columns]^T V (V: the source rows of those rows)."""
        (a, b), c, e = rows, self.bounds[j0][0], self.bounds[j1 - 1][1]
        self.T[c:e].addmm_(self.C[a:b, c:e].T, V)

    def _ready(self) -> list:
        """The queued tasks that may start now: no running task and no earlier queued one writes into their
        blocks. Each block thus gets its corrections in the order the blocks finished, whichever thread
        applies them: the same float sums in every run (called holding self.cond)."""
        claimed, ready = list(self.busy), []
        for task in self.tasks:  # in the order they were queued
            blocks = range(task[0], task[3])
            if not any(claimed[j] for j in blocks):
                ready.append(task)
            for j in blocks:
                claimed[j] = True
        return ready

    def _take(self):
        """The ready task for the nearest blocks, marked running; None if there is none (called holding
        self.cond)."""
        ready = self._ready()
        if not ready:
            return None
        task = min(ready)
        self.tasks.remove(task)
        for j in range(task[0], task[3]):
            self.busy[j] = True
        return task

    def _run(self, task) -> None:
        j0, _, rows, j1, V = task
        try:
            self._apply(rows, j0, j1, V)
        except BaseException as exc:  # re-raised in the main thread by wait()
            self.error = exc
        with self.cond:
            for j in range(j0, j1):
                self.pending[j] -= 1
                self.busy[j] = False
            self.cond.notify_all()

    def _work(self) -> None:
        torch.set_num_threads(self.worker_threads)
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or bool(self._ready()))
                if self.closed:
                    return
                task = self._take()
            self._run(task)

    def wait(self, j0: int, j1: int) -> None:
        """Until no task still writes into blocks j0..j1-1. Meanwhile the calling thread runs queued tasks
        itself: its own work between blocks is a fraction of the worker's, which would otherwise leave its
        core idle."""
        if self.thread is None:
            return
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.error is not None or not any(self.pending[j0:j1])
                                   or bool(self._ready()))
                if self.error is not None or not any(self.pending[j0:j1]):
                    break
                task = self._take()
            self._run(task)
        if self.error is not None:
            raise self.error

    def _spread(self, rows: tuple[int, int], j: int, V: torch.Tensor) -> None:
        """V of these rows into blocks j and later: block j at once, the rest by the worker if any."""
        nb = len(self.bounds)
        if self.thread is None:
            self._apply(rows, j, nb, V)
            return
        self.wait(j, j + 1)  # no concurrent writes into block j
        self._apply(rows, j, j + 1, V)
        with self.cond:
            for j0 in range(j + 1, nb, self.BLOCKS_PER_TASK):
                j1 = min(j0 + self.BLOCKS_PER_TASK, nb)
                self.tasks.append((j0, next(self.sequence), rows, j1, V))
                for t in range(j0, j1):
                    self.pending[t] += 1
            self.cond.notify_all()

    def source(self, k: int) -> torch.Tensor:
        """Where the caller writes block k's source rows V_k before block_done(k) (D = W0 - Q; GPTAQ: the
        pre-rounding values): under the held blocks' rows, if any. The worker may still read an earlier
        run's rows, so with a worker every run gets new room."""
        a, b = self.bounds[k]
        if self.held is None:
            if self.sources is None or self.thread is not None:
                self.sources = self.T.new_empty((self.BLOCKS_PER_MATMUL * self.rows, self.T.shape[1]))
            return self.sources[: b - a]
        top = a - self.bounds[self.held[0]][0]
        return self.sources[top : top + b - a]

    def block_done(self, k: int) -> None:
        """Block k is done, its source rows written into source(k): they reach every later block, the next
        one at once."""
        nb, b = len(self.bounds), self.bounds[k][1]
        if k + 1 == nb:
            return
        first = k if self.held is None else self.held[0]
        a = self.bounds[first][0]
        V = self.sources[: b - a]
        if k - first + 1 < self.BLOCKS_PER_MATMUL and k + 2 < nb:
            # held: into block k + 1 only, where every held block's share is still missing
            self.held = (first, k)
            self.wait(k + 1, k + 2)
            self._apply((a, b), k + 1, k + 2, V)
        else:  # the held blocks' rows and block k's into every block after it, as one matmul
            self.held = None
            self._spread((a, b), k + 1, V)

    def flush(self) -> None:
        """The held blocks' rows into every later block now (a quantization group wider than a block needs
        their state)."""
        if self.held is not None:
            (first, last), self.held = self.held, None
            a, b = self.bounds[first][0], self.bounds[last][1]
            if last + 2 < len(self.bounds):
                self._spread((a, b), last + 2, self.sources[: b - a])
