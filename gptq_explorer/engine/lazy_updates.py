"""GPTQ's lazy batch updates (the paper's Step 2) for the torch path, in the R form of gptq_torch.py.

After block k is quantized, D_k = W0 - Q over its columns, and every later column's pending correction
grows by D_k R[k, later] (S in gptq_torch's module doc, kept transposed as St). This module decides when
and by which thread those matmuls run; it never changes what they add up to.
"""

from __future__ import annotations

import heapq
import itertools
import threading

import torch


class LazyUpdates:
    """The paper's lazy batch updates (Step 2) in the R form: after block k, S[:, later] += D_k R[k, later].

    In pairs of blocks: a block's D reaches the next block at once, the blocks after that only with the
    next block's D, as one matmul over both (the same multiply-adds with twice the inner dimension, which a
    CPU's matmul runs faster: docs/performance.md).

    Pipelined on a multi-core CPU: the share of the next block is applied at once by the main thread;
    the rest (most of the multiply-adds) goes to a worker thread as tasks of a few blocks each, nearest
    columns first, while the main thread quantizes the next blocks' columns (torch ops release the GIL).
    Before a block is used, the main thread waits only for the tasks that write into it.
    """

    BLOCKS_PER_TASK = 4

    def __init__(self, St, R, W0t, bounds, worker_threads: int):
        self.St, self.R, self.W0t, self.bounds = St, R, W0t, bounds
        self.worker_threads = worker_threads
        self.held = None  # (block k, D over blocks k and k + 1): D_k, so far only in block k + 1
        self.pending = [0] * len(bounds)  # worker tasks not yet applied, per target block
        self.tasks: list = []  # heap: (first target block, sequence, source rows, end target block, D)
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

    def _apply(self, rows: tuple[int, int], j0: int, j1: int, D: torch.Tensor) -> None:
        """St for blocks j0..j1-1 += D R[rows, their columns], transposed (D: the D of those rows)."""
        (a, b), c, e = rows, self.bounds[j0][0], self.bounds[j1 - 1][1]
        self.St[c:e].addmm_(self.R[a:b, c:e].T, D)

    def _work(self) -> None:
        torch.set_num_threads(self.worker_threads)
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.tasks or self.closed)
                if self.closed:
                    return
                j0, _, rows, j1, D = heapq.heappop(self.tasks)
            try:
                self._apply(rows, j0, j1, D)
            except BaseException as exc:  # re-raised in the main thread by wait()
                self.error = exc
            with self.cond:
                for j in range(j0, j1):
                    self.pending[j] -= 1
                self.cond.notify_all()

    def wait(self, j0: int, j1: int) -> None:
        """Until no worker task still writes into blocks j0..j1-1."""
        if self.thread is None:
            return
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or not any(self.pending[j0:j1]))
        if self.error is not None:
            raise self.error

    def _spread(self, rows: tuple[int, int], j: int, D: torch.Tensor) -> None:
        """D of these rows into blocks j and later: block j at once, the rest by the worker if any."""
        nb = len(self.bounds)
        if self.thread is None:
            self._apply(rows, j, nb, D)
            return
        self.wait(j, j + 1)  # no concurrent writes into block j
        self._apply(rows, j, j + 1, D)
        with self.cond:
            for j0 in range(j + 1, nb, self.BLOCKS_PER_TASK):
                j1 = min(j0 + self.BLOCKS_PER_TASK, nb)
                heapq.heappush(self.tasks, (j0, next(self.sequence), rows, j1, D))
                for t in range(j0, j1):
                    self.pending[t] += 1
            self.cond.notify_all()

    def block_done(self, k: int, Q: torch.Tensor) -> None:
        """Block k is quantized to Q: its share of every later block's correction (D = W0 - Q)."""
        (a, b), nb = self.bounds[k], len(self.bounds)
        if k + 1 == nb:
            return
        if self.held is None and k + 2 < nb:  # the first of a pair: D_k into block k + 1 only, for now
            D = torch.empty((self.bounds[k + 1][1] - a, Q.shape[1]), device=Q.device, dtype=Q.dtype)
            torch.sub(self.W0t[a:b], Q, out=D[: b - a])
            self.held = (k, D)
            self.wait(k + 1, k + 2)
            self._apply((a, b), k + 1, k + 2, D[: b - a])
            return
        if self.held is None:
            self._spread((a, b), k + 1, self.W0t[a:b] - Q)
            return
        first, D = self.held  # the second of a pair: both blocks' D into every block after it
        self.held = None
        a0 = self.bounds[first][0]
        torch.sub(self.W0t[a:b], Q, out=D[a - a0 :])
        self._spread((a0, b), k + 1, D)

    def flush(self) -> None:
        """A held D into every later block now (a group wider than a block needs their full state)."""
        if self.held is not None:
            first, D = self.held
            self.held = None
            a, b = self.bounds[first]
            if first + 2 < len(self.bounds):
                self._spread((a, b), first + 2, D[: b - a])
