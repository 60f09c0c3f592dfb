"""engine.layout: the torch path's transposed copies, H in another order, buffers reused for results, and the
copy run beside the main thread."""

import threading

import pytest
import torch

from gptq_explorer.engine import layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_transpose_into(monkeypatch, dtype):
    """dst = src^T for a whole matrix, a column panel (not contiguous) and a dtype change (bytes to int32,
    the codes), in panels of rows that do not divide the matrix."""
    monkeypatch.setattr(layout, "TRANSPOSE_PANEL", 7)
    src = torch.randint(0, 250, (45, 61)).to(dtype)
    for part in (src, src[:, 10:33], src[3:40]):
        for out in (torch.float32, torch.int32):
            dst = torch.full((part.shape[1], part.shape[0]), -1, dtype=out)
            assert layout.transpose_into(dst, part) is dst
            assert torch.equal(dst, part.T.to(out))


def test_storage_as_reuses_memory_only_where_it_fits():
    buf = torch.zeros(4, 6)  # 96 bytes
    same = layout.storage_as(buf, (6, 4), torch.int32)
    assert same.data_ptr() == buf.data_ptr() and same.shape == (6, 4)
    assert layout.storage_as(buf, (3, 4), torch.float32).data_ptr() != buf.data_ptr()  # a result: exact only
    assert layout.storage_as(buf, (3, 4), torch.float32, temporary=True).data_ptr() == buf.data_ptr()
    assert layout.storage_as(buf, (5, 6), torch.float32, temporary=True).data_ptr() != buf.data_ptr()


def test_padded_rows_where_a_row_is_a_multiple_of_the_aliasing_stride():
    like = torch.empty(0)
    padded = layout.padded_empty(3, 1024, like)  # 4096 bytes a row
    assert padded.shape == (3, 1024) and padded.stride() == (1024 + layout.ROW_PAD // 4, 1)
    assert layout.padded_empty(3, 1000, like).is_contiguous()
    assert layout.padded_empty(3, 1024, torch.empty(0, dtype=torch.float64)).stride() == (1032, 1)
    # a result in a padded matrix's memory: its elements' size, the padding aside; the padding is not lost
    same = layout.storage_as(padded, (1024, 3), torch.int32)
    assert same.data_ptr() == padded.data_ptr() and same.is_contiguous() and same.shape == (1024, 3)
    assert layout.storage_as(padded, (1000, 3), torch.float32).data_ptr() != padded.data_ptr()
    big = layout.storage_as(padded, (3 * 1024 + 2 * layout.ROW_PAD // 4,), torch.float32, temporary=True)
    assert big.data_ptr() == padded.data_ptr()  # the span from the first element to the last


@pytest.mark.parametrize("n", [1, 5, 13])
def test_permuted_into_a_padded_matrix(monkeypatch, n):
    """out = A[perm][:, perm] in bands of rows (5 rows here: one band, bands dividing n, a last short band),
    into a padded matrix whose padding stays untouched."""
    monkeypatch.setattr(layout, "PERMUTE_BAND", 5)
    A = torch.arange(n * n, dtype=torch.float32).view(n, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    wide = torch.full((n, n + 3), -1.0)
    out = wide[:, :n]
    assert layout.permuted_into(out, A, perm) is out
    assert torch.equal(out, A[perm][:, perm])
    assert bool((wide[:, n:] == -1).all())


def test_beside_runs_in_another_thread_and_returns_or_raises():
    where = []

    def work():
        where.append(threading.current_thread().name)
        return torch.ones(3)

    assert torch.equal(layout.beside(work, enabled=True)(), torch.ones(3))
    assert torch.equal(layout.beside(work, enabled=False)(), torch.ones(3))
    assert where[0].startswith("gptq-copy") and where[1] == threading.current_thread().name

    def fails():
        raise ValueError("broken copy")

    later = layout.beside(fails, enabled=True)
    with pytest.raises(ValueError, match="broken copy"):
        later()


@pytest.mark.parametrize("background", [False, True])
def test_columns_in_processing_order_transposed(background):
    """A range of columns, transposed, in W's own order (each range a transposed copy) and in another order
    (W transposed whole once, a range gathered from its rows), with ranges that do not divide W."""
    W = torch.randn(9, 23)
    perm = torch.randperm(23)
    for order in (None, perm):
        columns = layout.Columns(W, order, background=background)
        columns.ready()
        assert (columns.Wt is None) == (order is None)
        for i1, i2 in ((0, 5), (5, 16), (16, 23)):
            out = torch.full((i2 - i1, 9), float("nan"))
            assert columns(i1, i2, out) is out
            expected = W[:, i1:i2] if order is None else W[:, order[i1:i2]]
            assert torch.equal(out, expected.T)
    assert columns.W is None and torch.equal(columns.Wt, W.T)  # the transposed copy replaces W
