"""The column loop's Triton kernel (engine/column_triton.py), what the torch path runs on CUDA: on every
configuration of the shared grid it gives the NumPy engine's codes (float64: exactly) and the paper's
losses. Without CUDA (CI) it runs in Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1);
with CUDA, on the GPU. benchmarks/gpu_check.py times it and checks it on large layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_configs import CONFIGS, IDS, correlated_layer

from gptq_explorer.engine import QuantConfig, column_triton, gptq_quantize, gptq_torch

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on Linux x86-64)")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def layer():
    return correlated_layer()[:2]


@pytest.fixture
def kernel(monkeypatch):
    """The torch path told to run the kernel, on DEVICE."""
    assert column_triton.available(DEVICE), "no CUDA, and TRITON_INTERPRET was not 1 when triton loaded"
    monkeypatch.setattr(gptq_torch, "COLUMN_STEP", "triton")


def run(W, h, cfg, dtype):
    t = lambda a: torch.tensor(a, dtype=dtype, device=DEVICE)  # noqa: E731
    res = gptq_quantize(t(W), t(h.H), cfg, dXXT=t(h.dXXT) if cfg.gptaq_alpha else None, dtype=dtype)
    res.codes, res.losses, res.weight = res.codes.cpu(), res.losses.cpu(), res.weight.cpu()
    return res


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_the_kernel_gives_the_numpy_engine_s_codes(layer, kernel, kw):
    W, h = layer
    cfg = QuantConfig(**kw)
    ref = gptq_quantize(W, h.H, cfg, dXXT=h.dXXT)
    res = run(W, h, cfg, torch.float64)
    np.testing.assert_array_equal(res.codes.numpy(), ref.codes)
    np.testing.assert_allclose(res.losses.numpy(), ref.losses, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(res.weight.numpy(), ref.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", CONFIGS[:2] + CONFIGS[13:14], ids=IDS[:2] + IDS[13:14])
def test_in_float32_the_kernel_agrees_with_the_cpu_column_step(layer, kernel, kw, monkeypatch):
    W, h = layer
    cfg = QuantConfig(**kw)
    gpu_like = run(W, h, cfg, torch.float32)
    monkeypatch.setattr(gptq_torch, "COLUMN_STEP", "auto")
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    cpu = gptq_quantize(t(W), t(h.H), cfg, dXXT=t(h.dXXT) if cfg.gptaq_alpha else None)  # NumPy/numba step
    assert float((gpu_like.codes == cpu.codes).float().mean()) >= 0.999
    np.testing.assert_allclose(gpu_like.losses.numpy(), cpu.losses.numpy(), rtol=1e-4, atol=1e-9)


def test_cuda_picks_the_kernel_and_the_cpu_does_not(monkeypatch):
    monkeypatch.setattr(gptq_torch, "COLUMN_STEP", "auto")
    assert gptq_torch.column_step_kind(torch.device("cuda")) == "triton"
    assert gptq_torch.column_step_kind(torch.device("cpu")) == "numpy"
    monkeypatch.setitem(vars(column_triton), "triton", None)  # a CUDA machine without triton: torch ops
    assert gptq_torch.column_step_kind(torch.device("cuda")) == "torch"
