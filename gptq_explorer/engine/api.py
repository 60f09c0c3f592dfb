"""One entry point per method, for NumPy arrays and torch tensors alike.

backend=None picks by input: NumPy in -> the NumPy reference engine; a torch tensor in -> the torch
path. backend="torch" with NumPy input runs on torch and converts the result back to NumPy.
"""

from __future__ import annotations

import numpy as np

from ..lazy_torch import is_tensor
from .config import QuantConfig, QuantResult
from .gptq import gptq_quantize_numpy
from .rtn import rtn_quantize_numpy

BACKENDS = ("numpy", "torch")


def _resolve(W, backend, device):
    if backend is None:
        backend = "torch" if is_tensor(W) or device is not None else "numpy"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "numpy" and device not in (None, "cpu"):
        raise ValueError(f"the NumPy engine runs on the CPU; use backend='torch' for device={device!r}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return backend, device


def _to_numpy(res: QuantResult) -> QuantResult:
    for field in ("weight", "codes", "scales", "zeros", "g_idx", "perm", "losses", "dead_columns",
                  "rotation"):
        value = getattr(res, field)
        if is_tensor(value):
            setattr(res, field, value.cpu().numpy())
    return res


def _torch_dtype(dtype):
    import torch

    if dtype is None:
        return torch.float32
    return {np.float32: torch.float32, np.float64: torch.float64}.get(dtype, dtype)


def _numpy(x):
    return np.asarray(x.detach().cpu()) if is_tensor(x) else x


def gptq_quantize(W, H, cfg: QuantConfig | None = None, dXXT=None, *, backend: str | None = None, device=None,
                  dtype=None) -> QuantResult:
    """Quantize W (d_out, d_in) with GPTQ, given the Hessian H (d_in, d_in) of its inputs.

    dXXT (d_in, d_in): GPTAQ's statistic (Hessian.dXXT), required when cfg.gptaq_alpha > 0.
    NumPy in -> NumPy out (float64 by default); torch in -> torch out on the same device (float32 by
    default; dtype=torch.float64 on request). device=None keeps the input's device, "auto" picks CUDA.
    """
    cfg = QuantConfig.coerce(cfg)
    backend, device = _resolve(W, backend, device)
    if backend == "numpy":
        return gptq_quantize_numpy(_numpy(W), _numpy(H), cfg, dtype=dtype or np.float64,
                                   dXXT=None if dXXT is None else _numpy(dXXT))
    from .gptq_torch import gptq_quantize_torch

    res = gptq_quantize_torch(W, H, cfg, device=device, dtype=_torch_dtype(dtype), dXXT=dXXT)
    return res if is_tensor(W) else _to_numpy(res)


def rtn_quantize(W, cfg: QuantConfig | None = None, *, backend: str | None = None, device=None,
                 dtype=None) -> QuantResult:
    """Round-to-nearest on the same grid as GPTQ (no Hessian). Same input/output rules as gptq_quantize."""
    cfg = QuantConfig.coerce(cfg)
    backend, device = _resolve(W, backend, device)
    if backend == "numpy":
        return rtn_quantize_numpy(_numpy(W), cfg, dtype=dtype or np.float64)
    from .gptq_torch import rtn_quantize_torch

    res = rtn_quantize_torch(W, cfg, device=device, dtype=_torch_dtype(dtype))
    return res if is_tensor(W) else _to_numpy(res)
