"""Memory and layout for the torch path (gptq_torch): tensors shared or copied in, transposed copies,
W's columns and H in the processing order, rows padded against cache aliasing, results written into buffers
whose work is done, and a copy run beside the main thread.

On a CPU, GPTQ's work outside the matmuls is mostly moving memory: transposing a layer, gathering its
columns into another order, touching fresh layer-sized buffers for the first time (page faults). These
helpers do each of those the cheapest way measured (docs/performance.md, "One layer").
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def shared_tensor(x, device, dtype=None) -> torch.Tensor:
    """x as a tensor on device (and of dtype), sharing x's memory where it already is one: for inputs that
    are only read (a read-only NumPy array is copied: torch warns on sharing it)."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        x = torch.as_tensor(x) if x.flags.writeable else torch.tensor(x)
    return x.detach().to(device=device or x.device, dtype=dtype)


def to_tensor(x, device, dtype) -> torch.Tensor:
    """A copy of x as a tensor on device, of dtype (never x's memory)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device or x.device, dtype=dtype, copy=True)
    return torch.tensor(np.asarray(x), device=device or "cpu", dtype=dtype)


# Rows of the source that transpose_into converts per panel when the dtype changes (the codes: bytes in,
# int32 out): a panel transposed in the source's dtype stays in cache until it is converted.
TRANSPOSE_PANEL = 512


def transpose_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst = src^T (converted to dst's dtype). On CPU always as torch's blocked transposed copy, which it
    takes only for the transpose of a contiguous matrix of dst's dtype: a column panel is made contiguous
    first, a dtype change goes panel by panel. Other ways measured 2-3 times slower on one of our machines
    and no faster on another (docs/performance.md)."""
    if src.device.type != "cpu":
        return dst.copy_(src.T)
    if src.dtype == dst.dtype:
        return dst.copy_(src.contiguous().T)
    src = src.contiguous()
    p = TRANSPOSE_PANEL
    panel = src.new_empty(src.shape[1] * min(p, src.shape[0]))
    for a in range(0, src.shape[0], p):
        b = min(a + p, src.shape[0])
        dst[:, a:b].copy_(panel[: src.shape[1] * (b - a)].view(src.shape[1], b - a).copy_(src[a:b].T))
    return dst


# Rows whose length in bytes is a multiple of this fall on few cache sets: a matmul over panels of such a
# matrix runs 5-8% slower on a CPU (docs/performance.md), so padded_empty gives them ROW_PAD bytes more.
ALIASING_STRIDE = 4096
ROW_PAD = 64


def padded_empty(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized (rows, cols) matrix of like's dtype and device: on a CPU, where a row's bytes are a
    multiple of ALIASING_STRIDE, a view of a matrix ROW_PAD bytes wider."""
    size = like.element_size()
    pad = ROW_PAD // size if like.device.type == "cpu" and cols * size % ALIASING_STRIDE == 0 else 0
    return like.new_empty((rows, cols + pad))[:, :cols]


# Rows per band in permuted_into: a band and its column gather stay in the CPU's caches.
PERMUTE_BAND = 64


def permuted_into(out: torch.Tensor, A: torch.Tensor, perm: torch.Tensor,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """out = A[perm][:, perm] (a square matrix in another order, as H for act-order). On a CPU a band of
    PERMUTE_BAND rows at a time: its rows gathered, then its columns, in two small buffers, then copied
    into out: one pass over A and one over out, where gathering all columns and then all rows is two
    passes over a layer-sized intermediate (and torch's column gather straight into a padded_empty
    matrix takes a slow path: docs/performance.md). Elsewhere two whole gathers, the first into scratch
    (A's shape; a new tensor if None)."""
    if A.device.type != "cpu":
        return torch.index_select(torch.index_select(A, 1, perm, out=scratch), 0, perm, out=out)
    n, band = A.shape[1], min(PERMUTE_BAND, A.shape[0])
    rows, both = A.new_empty((band, n)), A.new_empty((band, n))
    for a in range(0, A.shape[0], band):
        b = min(a + band, A.shape[0])
        torch.index_select(A, 0, perm[a:b], out=rows[: b - a])
        out[a:b].copy_(torch.index_select(rows[: b - a], 1, perm, out=both[: b - a]))
    return out


def _span(buf: torch.Tensor) -> torch.Tensor:
    """buf's memory as one flat tensor, from its first element to its last (a padded_empty matrix's row
    padding included)."""
    if buf.is_contiguous():
        return buf.view(-1)
    return buf.as_strided((1 + sum((n - 1) * st for n, st in zip(buf.shape, buf.stride())),), (1,))


def storage_as(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
               temporary: bool = False) -> torch.Tensor:
    """A tensor of shape and dtype in buf's memory (buf's contents are dead), or a new one where buf does
    not fit: a layer-sized buffer already touched costs no page faults, a fresh one does. Not temporary (a
    result): only where buf's elements are exactly the size of the result (a padded_empty matrix's row
    padding aside), so that a result holds no memory beyond its own."""
    flat = _span(buf)
    size, have = torch.empty((), dtype=dtype).element_size(), flat.element_size()
    need, got = size * int(np.prod(shape)), have * flat.numel()
    if have % size == 0 and got >= need and (temporary or need == buf.numel() * buf.element_size()):
        return flat.view(dtype)[: need // size].view(shape)
    return torch.empty(shape, device=buf.device, dtype=dtype)


def beside(fn: Callable[[], torch.Tensor], enabled: bool) -> Callable[[], torch.Tensor]:
    """Start fn() in a thread of its own (enabled) or run it now; returns a function that gives its result
    (waiting for it; fn's exception is raised there). For a copy that runs on one core (a gather: torch
    does not split it between threads) while the main thread does another: on a 2-core machine two such
    copies take about the time of one."""
    if not enabled:
        value = fn()
        return lambda: value
    pool = ThreadPoolExecutor(1, thread_name_prefix="gptq-copy")
    future = pool.submit(fn)
    pool.shutdown(wait=False)  # the thread ends once fn has
    return future.result


class Columns:
    """W's columns in the processing order, transposed (row i: the i-th column processed), a range at a time.

    In W's own order (perm None) a range is a transposed copy of its columns. In another order W is first
    transposed whole, in a thread of its own where `background` (see beside), and a range is a gather of
    its rows: the whole transposed copy costs less than gathering W's columns into the new order and then
    transposing each range (docs/performance.md). Call ready() before work that takes every thread."""

    def __init__(self, W: torch.Tensor, perm: torch.Tensor | None = None, background: bool = False):
        self.W, self.perm, self.Wt = W, perm, None
        self._later = None
        if perm is not None:
            self._later = beside(lambda: transpose_into(W.new_empty(W.shape[::-1]), W), background)

    def ready(self) -> None:
        """Wait for W's transposed copy, if any (then W itself is no longer referenced)."""
        if self._later is not None:
            self.Wt, self._later, self.W = self._later(), None, None

    def __call__(self, i1: int, i2: int, out: torch.Tensor) -> torch.Tensor:
        """Columns i1..i2-1 (processing order) into out, (i2 - i1, rows)."""
        if self.perm is None:
            return transpose_into(out, self.W[:, i1:i2])
        self.ready()
        return torch.index_select(self.Wt, 0, self.perm[i1:i2], out=out)
