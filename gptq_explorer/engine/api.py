"""One entry point per method, for NumPy arrays and torch tensors alike.

backend=None picks by input: NumPy in -> the NumPy reference engine; a torch tensor in -> the torch
path. backend="torch" with NumPy input runs on torch and converts the result back to NumPy.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import QuantConfig, QuantResult
from .gptq import gptq_quantize_numpy
from .gptq_torch import gptq_quantize_torch, rtn_quantize_torch
from .rtn import rtn_quantize_numpy

BACKENDS = ("numpy", "torch")


def _resolve(W, backend, device):
    if backend is None:
        backend = "torch" if isinstance(W, torch.Tensor) or device is not None else "numpy"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "numpy" and device not in (None, "cpu"):
        raise ValueError(f"the NumPy engine runs on the CPU; use backend='torch' for device={device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return backend, device


def _to_numpy(res: QuantResult) -> QuantResult:
    for field in ("weight", "codes", "scales", "zeros", "g_idx", "perm", "losses", "dead_columns"):
        value = getattr(res, field)
        if isinstance(value, torch.Tensor):
            setattr(res, field, value.cpu().numpy())
    return res


def _torch_dtype(dtype):
    if dtype is None:
        return torch.float32
    return {np.float32: torch.float32, np.float64: torch.float64}.get(dtype, dtype)


def gptq_quantize(W, H, cfg: QuantConfig | None = None, *, backend: str | None = None, device=None,
                  dtype=None) -> QuantResult:
    """Quantize W (d_out, d_in) with GPTQ, given the Hessian H (d_in, d_in) of its inputs.

    NumPy in -> NumPy out (float64 by default); torch in -> torch out on the same device (float32 by
    default; dtype=torch.float64 on request). device=None keeps the input's device, "auto" picks CUDA.
    """
    cfg = cfg or QuantConfig()
    backend, device = _resolve(W, backend, device)
    if backend == "numpy":
        if isinstance(W, torch.Tensor) or isinstance(H, torch.Tensor):
            W, H = np.asarray(W.detach().cpu() if isinstance(W, torch.Tensor) else W), np.asarray(
                H.detach().cpu() if isinstance(H, torch.Tensor) else H)
        return gptq_quantize_numpy(W, H, cfg, dtype=dtype or np.float64)
    res = gptq_quantize_torch(W, H, cfg, device=device, dtype=_torch_dtype(dtype))
    return res if isinstance(W, torch.Tensor) else _to_numpy(res)


def rtn_quantize(W, cfg: QuantConfig | None = None, *, backend: str | None = None, device=None,
                 dtype=None) -> QuantResult:
    """Round-to-nearest on the same grid as GPTQ (no Hessian). Same input/output rules as gptq_quantize."""
    cfg = cfg or QuantConfig()
    backend, device = _resolve(W, backend, device)
    if backend == "numpy":
        if isinstance(W, torch.Tensor):
            W = W.detach().cpu().numpy()
        return rtn_quantize_numpy(W, cfg, dtype=dtype or np.float64)
    res = rtn_quantize_torch(W, cfg, device=device, dtype=_torch_dtype(dtype))
    return res if isinstance(W, torch.Tensor) else _to_numpy(res)
