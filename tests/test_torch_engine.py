"""The torch path equals the NumPy engine: exactly in float64, to the issue's bounds in float32."""

import itertools
import threading
import time

import numpy as np
import pytest
import torch

from gptq_explorer import Hessian, QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.engine.lazy_updates import LazyUpdates


def smollm_like_layer(d_out=128, d_in=576, tokens=2048, seed=0):
    """A SmolLM2-width layer: correlated activations with a few large-scale channels and dead inputs."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((tokens, 64)) @ rng.standard_normal((64, d_in)) * 0.5
    X += rng.standard_normal((tokens, d_in))
    X[:, :8] *= 8.0  # outlier channels, as in real transformers
    X[:, [100, 333]] = 0.0  # dead inputs
    W = rng.standard_normal((d_out, d_in)) * 0.04
    return W, X


@pytest.fixture(scope="module")
def layer():
    W, X = smollm_like_layer()
    return W, X, Hessian(X.shape[1]).add_batch(X).H


def out_err(X, W, Q):
    return float(np.sum((X @ (W - Q).T) ** 2))


COMBOS = list(itertools.product((2, 3, 4, 8), (True, False), (-1, 32, 128), (False, True), (False, True)))


@pytest.mark.parametrize("bits,sym,group_size,desc_act,static_groups", COMBOS)
def test_torch_matches_numpy(layer, bits, sym, group_size, desc_act, static_groups):
    W, X, H = layer
    cfg = QuantConfig(bits=bits, sym=sym, group_size=group_size, desc_act=desc_act,
                      static_groups=static_groups)
    ref = gptq_quantize(W, H, cfg)
    t64 = gptq_quantize(torch.tensor(W), torch.tensor(H), cfg, dtype=torch.float64)
    assert isinstance(t64.weight, torch.Tensor) and t64.weight.dtype == torch.float64
    np.testing.assert_array_equal(t64.codes.numpy(), ref.codes)  # float64: the same codes, exactly
    np.testing.assert_array_equal(t64.g_idx.numpy(), ref.g_idx)
    np.testing.assert_array_equal(t64.perm.numpy(), ref.perm)
    np.testing.assert_array_equal(t64.zeros.numpy(), ref.zeros)
    np.testing.assert_allclose(t64.scales.numpy(), ref.scales, rtol=1e-12)
    np.testing.assert_allclose(t64.losses.numpy(), ref.losses, rtol=1e-8, atol=1e-14)
    t32 = gptq_quantize(torch.tensor(W, dtype=torch.float32), torch.tensor(H, dtype=torch.float32), cfg)
    assert t32.weight.dtype == torch.float32
    # float32: a near-tie can round the other way, and that row's later columns then compensate
    # differently (NumPy's own float32 run diverges as often); the aggregate bound is tested below.
    agree = float(np.mean(t32.codes.numpy() == ref.codes))
    assert agree >= 0.995, f"float32 codes agree on {agree:.4%}"
    e32, e64 = out_err(X, W, t32.weight.double().numpy()), out_err(X, W, ref.weight)
    assert abs(e32 - e64) / e64 < 0.005
    np.testing.assert_array_equal(t32.weight.numpy(), t32.dequantize().numpy())


def test_float32_agreement_over_a_real_sized_layer():
    """At least 99.9% of float32 codes agree with float64 on a 576x576 layer, over typical configs."""
    W, X = smollm_like_layer(d_out=576, seed=1)
    H = Hessian(576).add_batch(X).H
    same = total = 0
    for cfg in (QuantConfig(), QuantConfig(bits=3, sym=False), QuantConfig(desc_act=True, group_size=32),
                QuantConfig(bits=8, group_size=-1), QuantConfig(bits=2, sym=False, static_groups=True,
                                                                 desc_act=True)):
        ref = gptq_quantize(W, H, cfg)
        t32 = gptq_quantize(torch.tensor(W, dtype=torch.float32), torch.tensor(H, dtype=torch.float32), cfg)
        same += int(np.sum(t32.codes.numpy() == ref.codes))
        total += ref.codes.size
    assert same / total >= 0.999, f"{same / total:.5%}"


def test_numpy_in_numpy_out_and_rtn(layer):
    W, _, H = layer
    cfg = QuantConfig(bits=3, sym=False, group_size=32)
    res = gptq_quantize(W, H, cfg, backend="torch")
    assert isinstance(res.weight, np.ndarray) and isinstance(res.codes, np.ndarray)
    r_np, r_t = rtn_quantize(W, cfg), rtn_quantize(torch.tensor(W), cfg, dtype=torch.float64)
    np.testing.assert_array_equal(r_t.codes.numpy(), r_np.codes)
    np.testing.assert_array_equal(rtn_quantize(W, cfg, backend="torch").codes, r_np.codes)


def test_torch_bad_input_matches_numpy(layer):
    W, _, H = layer
    for backend in ("numpy", "torch"):
        with pytest.raises(ValueError, match=r"H must be \(d_in, d_in\)"):
            gptq_quantize(W, H[:10, :10], backend=backend)
        bad = W.copy()
        bad[0, 0] = np.inf
        with pytest.raises(ValueError, match="W contains NaN or Inf"):
            gptq_quantize(bad, H, backend=backend)
        with pytest.raises(ValueError, match="not positive definite even after"):
            gptq_quantize(W[:, :4], -np.eye(4), backend=backend)
    with pytest.raises(ValueError, match="NumPy engine runs on the CPU"):
        gptq_quantize(W, H, backend="numpy", device="cuda")


def test_torch_damping_retry_warns(layer):
    W, _, H = layer
    evals, evecs = np.linalg.eigh(H)
    evals[0] = -0.05 * evals.mean()
    bad = evecs @ np.diag(evals) @ evecs.T
    bad = (bad + bad.T) / 2
    with pytest.warns(RuntimeWarning, match=r"quantized with damp_percent=0\.1"):
        res = gptq_quantize(torch.tensor(W), torch.tensor(bad), dtype=torch.float64)
    assert res.damp_percent_used == pytest.approx(0.1)


def test_hessian_chunked_float32_accumulation():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10_000, 64)).astype(np.float32)
    h = Hessian(64, backend="torch")
    h.add_batch(torch.from_numpy(X).to(torch.bfloat16).reshape(4, 2500, 64))
    assert h.H.dtype == torch.float32 and h.n_tokens == 10_000
    Xb = torch.from_numpy(X).to(torch.bfloat16).double().numpy()
    np.testing.assert_allclose(h.H.numpy(), 2 * Xb.T @ Xb / 10_000, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d_in", [5, 300, 577, 1100])
def test_hessian_upper_tiles_equal_the_full_product(d_in):
    """The torch path multiplies only the tiles on and above the diagonal and mirrors them when H is read:
    several tiles with a short last one, H read between batches, a float32 batch used as it is and a
    half-precision one copied in chunks all give the float64 sum."""
    rng = np.random.default_rng(d_in)
    X = [rng.standard_normal((n, d_in)).astype(np.float32) for n in (700, 5000)]
    h = Hessian(d_in, backend="torch").add_batch(torch.from_numpy(X[0]))
    first = h.H.numpy()
    np.testing.assert_allclose(first, 2 * X[0].astype(np.float64).T @ X[0] / 700, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(first, first.T)
    h.add_batch(torch.from_numpy(X[1]).to(torch.bfloat16))
    Xb = np.concatenate([X[0], torch.from_numpy(X[1]).to(torch.bfloat16).float().numpy()]).astype(np.float64)
    H = h.H.numpy()
    np.testing.assert_array_equal(H, H.T)
    np.testing.assert_allclose(H, 2 * Xb.T @ Xb / 5700, rtol=1e-4, atol=1e-4)


def test_hessian_rejects_a_non_finite_batch_and_keeps_a_huge_finite_one():
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.standard_normal((600, 300)).astype(np.float32))
    h = Hessian(300, backend="torch").add_batch(X)
    before = h.H.clone()
    for bad in (float("nan"), float("inf")):
        Y = X.clone()
        Y[3, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf in 1 of 600 tokens"):
            h.add_batch(Y)
        assert torch.equal(h.H, before) and h.n_tokens == 600
    # finite values whose sum overflows float32: the cheap check falls back to the elementwise one
    big = torch.full((4, 300), 3e36)
    assert not torch.isfinite(big.sum()) and torch.isfinite(Hessian(300, backend="torch").add_batch(
        big / 1e20).H).all()
    Hessian(300, backend="torch").add_batch(big)  # accepted: every entry is finite


def test_device_auto_and_explicit_cpu(layer):
    W, _, H = layer
    res = gptq_quantize(torch.tensor(W), torch.tensor(H), device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert res.weight.device.type == expected
    assert Hessian(8, backend="torch", device="auto").device.type == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(layer):
    W, X, H = layer
    cfg = QuantConfig(bits=4, group_size=128, desc_act=True)
    cpu = gptq_quantize(torch.tensor(W, dtype=torch.float64), torch.tensor(H, dtype=torch.float64), cfg)
    gpu = gptq_quantize(torch.tensor(W, dtype=torch.float64, device="cuda"),
                        torch.tensor(H, dtype=torch.float64, device="cuda"), cfg)
    assert gpu.weight.device.type == "cuda"
    assert float((gpu.codes.cpu() == cpu.codes).float().mean()) >= 0.999
    h = Hessian(X.shape[1], backend="torch", device="cuda").add_batch(torch.tensor(X, dtype=torch.float32))
    assert h.H.device.type == "cuda"


PIPELINE_CONFIGS = [
    QuantConfig(bits=4, group_size=128),
    QuantConfig(bits=3, group_size=32, sym=False, desc_act=True),
    QuantConfig(bits=4, group_size=128, desc_act=True, static_groups=True),
    QuantConfig(bits=4, group_size=256, block_size=128),  # a group wider than a block
    QuantConfig(bits=2, group_size=100, sym=False),  # groups and blocks that do not align
    QuantConfig(bits=8, group_size=-1),
]


@pytest.mark.parametrize("cfg", PIPELINE_CONFIGS, ids=lambda c: c.label())
def test_pipelined_lazy_updates_give_the_same_codes(layer, monkeypatch, cfg):
    """Big layers on a multi-core CPU run the lazy updates in a worker thread (and, reordered, W's transposed
    copy beside the main thread); force that path on a small layer and check it changes
    nothing: float64 codes equal the NumPy engine's exactly."""
    import gptq_explorer.engine.gptq_torch as gt
    import gptq_explorer.engine.layout as layout

    W, X, H = layer
    ref = gptq_quantize(W, H, cfg)
    threads = torch.get_num_threads()
    monkeypatch.setattr(gt, "SINGLE_THREAD_WORK", 0)
    besides, beside = [], layout.beside

    def spy(fn, enabled):
        besides.append(enabled)
        return beside(fn, enabled)

    monkeypatch.setattr(layout, "beside", spy)
    monkeypatch.setattr(LazyUpdates, "BLOCKS_PER_TASK", 2)
    started = []
    original_work = LazyUpdates._work
    monkeypatch.setattr(LazyUpdates, "_work", lambda self: (started.append(1), original_work(self)))
    torch.set_num_threads(2)
    try:
        res = gptq_quantize(torch.tensor(W), torch.tensor(H), cfg, dtype=torch.float64)
    finally:
        torch.set_num_threads(threads)
    assert started, "the pipelined path did not run"
    assert besides == ([True] if cfg.desc_act else [])
    np.testing.assert_array_equal(res.codes.numpy(), ref.codes)
    np.testing.assert_allclose(res.losses.numpy(), ref.losses, rtol=1e-8, atol=1e-14)
    assert torch.get_num_threads() == threads


def test_the_waiting_thread_runs_queued_lazy_updates(layer, monkeypatch):
    """While the main thread waits for a block's corrections it runs queued tasks itself: with a worker that
    never takes one, every task runs on the main thread, and float64 codes still equal the NumPy engine's."""
    import gptq_explorer.engine.gptq_torch as gt

    W, X, H = layer
    cfg = QuantConfig(bits=4, group_size=256, block_size=64)  # 9 blocks; groups wider than a block
    ref = gptq_quantize(W, H, cfg)
    ran_on = []
    original_run, original_work = LazyUpdates._run, LazyUpdates._work

    def idle_worker(self):  # takes nothing; after 20 s (a main thread that only waits) it works after all
        with self.cond:
            if self.cond.wait_for(lambda: self.closed, timeout=20):
                return
        original_work(self)

    def run(self, task):
        ran_on.append(threading.current_thread() is threading.main_thread())
        original_run(self, task)

    monkeypatch.setattr(gt, "SINGLE_THREAD_WORK", 0)
    monkeypatch.setattr(LazyUpdates, "BLOCKS_PER_TASK", 2)
    monkeypatch.setattr(LazyUpdates, "_work", idle_worker)
    monkeypatch.setattr(LazyUpdates, "_run", run)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = gptq_quantize(torch.tensor(W), torch.tensor(H), cfg, dtype=torch.float64)
    finally:
        torch.set_num_threads(threads)
    assert ran_on and all(ran_on)
    np.testing.assert_array_equal(res.codes.numpy(), ref.codes)


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=128, block_size=32),
                                 QuantConfig(bits=4, group_size=96, block_size=32, desc_act=True),
                                 QuantConfig(bits=3, group_size=256, block_size=64)],  # groups wider
                         ids=lambda c: c.label())
def test_each_block_gets_its_corrections_in_order(layer, monkeypatch, cfg):
    """Whichever thread applies them and however the threads are timed, every block gets the finished
    blocks' corrections in the order those blocks finished: the same float sums, so float32 results do not
    change from run to run with a worker thread. The worker is slowed at random so that tasks queue up."""
    import random

    import gptq_explorer.engine.gptq_torch as gt

    W, X, H = layer
    arrivals: dict[int, list[int]] = {}
    original_apply = LazyUpdates._apply
    rng = random.Random(0)

    def apply(self, rows, j0, j1, V):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(rng.random() * 0.004)
        for j in range(j0, j1):
            arrivals.setdefault(j, []).append(rows[0])
        original_apply(self, rows, j0, j1, V)

    monkeypatch.setattr(gt, "SINGLE_THREAD_WORK", 0)
    monkeypatch.setattr(LazyUpdates, "_apply", apply)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    results = []
    try:
        for _ in range(3):
            arrivals.clear()
            results.append(gptq_quantize(torch.tensor(W, dtype=torch.float32),
                                         torch.tensor(H, dtype=torch.float32), cfg))
            assert len(arrivals) == 576 // cfg.block_size - 1
            for j, sources in arrivals.items():
                assert sources == sorted(sources), f"block {j} got corrections out of order: {sources}"
    finally:
        torch.set_num_threads(threads)
    for res in results[1:]:
        assert torch.equal(res.codes, results[0].codes) and torch.equal(res.weight, results[0].weight)


@pytest.mark.parametrize("run, expected", [
    (2, [((0, 128), 1, 2), ((0, 256), 2, 5), ((256, 384), 3, 4), ((256, 512), 4, 5)]),
    (3, [((0, 128), 1, 2), ((0, 256), 2, 3), ((0, 384), 3, 5), ((384, 512), 4, 5)]),
])
def test_lazy_updates_reach_later_blocks_in_runs(layer, monkeypatch, run, expected):
    """A block's correction reaches the next block at once and the blocks after it together with the rest
    of its run's, as one matmul over the run's rows (faster on a CPU); a last short run goes alone."""
    W, X, H = layer  # 576 columns: blocks of 128, 128, 128, 128, 64
    applied = []
    original = LazyUpdates._apply

    def record(self, rows, j0, j1, D):
        applied.append((rows, j0, j1))
        original(self, rows, j0, j1, D)

    monkeypatch.setattr(LazyUpdates, "_apply", record)
    monkeypatch.setattr(LazyUpdates, "BLOCKS_PER_MATMUL", run)
    gptq_quantize(torch.tensor(W), torch.tensor(H), QuantConfig(bits=4, group_size=128), dtype=torch.float64)
    assert applied == expected


@pytest.mark.parametrize("cfg", [*PIPELINE_CONFIGS, QuantConfig(bits=4, group_size=256, gptaq_alpha=0.5)],
                         ids=lambda c: c.label())
def test_runs_of_three_blocks_give_the_same_codes(layer, monkeypatch, cfg):
    """Runs of three blocks per matmul (held blocks, flushed before a group wider than a block), float64:
    the NumPy engine's codes exactly."""
    W, X, H = layer
    dXXT = None if cfg.gptaq_alpha == 0 else H / 8
    ref = gptq_quantize(W, H, cfg, dXXT=dXXT)
    monkeypatch.setattr(LazyUpdates, "BLOCKS_PER_MATMUL", 3)
    res = gptq_quantize(torch.tensor(W), torch.tensor(H), cfg, dtype=torch.float64,
                        dXXT=None if dXXT is None else torch.tensor(dXXT))
    np.testing.assert_array_equal(res.codes.numpy(), ref.codes)
    np.testing.assert_allclose(res.losses.numpy(), ref.losses, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptaq_term_in_row_blocks_gives_the_same_codes(monkeypatch, desc_act):
    """The torch path forms GPTAQ's M one block of rows at a time (a solve with R's trailing block each); with
    blocks that do not divide the layer, float64 codes still equal the NumPy engine's exactly."""
    from engine_configs import correlated_layer

    import gptq_explorer.engine.gptq_torch as gt

    W, h, _, _ = correlated_layer(96)
    cfg = QuantConfig(bits=3, group_size=32, gptaq_alpha=0.5, desc_act=desc_act)
    ref = gptq_quantize(W, h.H, cfg, dXXT=h.dXXT)
    monkeypatch.setattr(gt._Gptaq, "SOLVE_ROWS", 40)
    res = gptq_quantize(torch.tensor(W), torch.tensor(h.H), cfg, dXXT=torch.tensor(h.dXXT),
                        dtype=torch.float64)
    np.testing.assert_array_equal(res.codes.numpy(), ref.codes)
    np.testing.assert_allclose(res.losses.numpy(), ref.losses, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("desc_act", [False, True])
def test_results_own_their_memory_and_leave_the_inputs_alone(layer, desc_act):
    """The results reuse the engine's work buffers (no fresh layer-sized tensors at the end): check that
    weight and codes share no memory with each other or with the caller's W and H, which stay as given."""
    W, X, H = layer
    W32, H32 = torch.tensor(W, dtype=torch.float32), torch.tensor(H, dtype=torch.float32)
    W0, H0 = W32.clone(), H32.clone()
    res = gptq_quantize(W32, H32, QuantConfig(bits=4, group_size=128, desc_act=desc_act))
    assert torch.equal(W32, W0) and torch.equal(H32, H0)

    def span(t):
        start = t.untyped_storage().data_ptr()
        return start, start + t.untyped_storage().nbytes()

    spans = sorted(span(t) for t in (res.weight, res.codes, W32, H32))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert res.codes.dtype == torch.int32 and res.codes.is_contiguous() and res.weight.is_contiguous()
    np.testing.assert_array_equal(res.weight.numpy(), res.dequantize().numpy())


@pytest.mark.parametrize("cfg", PIPELINE_CONFIGS[:3], ids=lambda c: c.label())
def test_torch_column_step_gives_the_same_codes(layer, monkeypatch, cfg):
    """On CPU the column step runs as NumPy ufuncs; CUDA without triton runs it as torch ops. Run them on CPU:
    float64 codes equal the NumPy engine's exactly."""
    import gptq_explorer.engine.gptq_torch as gt

    W, X, H = layer
    ref = gptq_quantize(W, H, cfg)
    monkeypatch.setattr(gt, "COLUMN_STEP", "torch")
    res = gptq_quantize(torch.tensor(W), torch.tensor(H), cfg, dtype=torch.float64)
    np.testing.assert_array_equal(res.codes.numpy(), ref.codes)
    np.testing.assert_allclose(res.losses.numpy(), ref.losses, rtol=1e-8, atol=1e-14)
