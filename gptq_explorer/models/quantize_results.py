"""What a whole-model quantization run gives back: the QuantizedModel, one LayerReport per quantized linear,
QuantizationCancelled, and how each layer's QuantResult is kept (on the CPU, small)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .adapters import get_weight


class QuantizationCancelled(RuntimeError):
    """quantize_model was cancelled; the model's original weights have been restored."""

    def __init__(self, msg: str, layers_done: list | None = None):
        super().__init__(msg)
        self.layers_done = layers_done or []


@dataclass
class LayerReport:
    name: str  # full module path, e.g. "model.layers.3.mlp.down_proj"
    block: int
    group: int  # index of its true-sequential group inside the block
    shape: tuple[int, int]  # (out_features, in_features)
    bits: int
    group_size: int
    sym: bool
    method: str
    h_trace: float | None = None  # Hessian statistics (H = 2/n sum x x^T over calibration tokens)
    h_mean_diag: float | None = None
    dead_columns: int | None = None  # inputs that were always zero
    h_condition: float | None = None  # condition number of the damped H that GPTQ factorizes
    damp_percent_used: float | None = None
    loss: float | None = None  # GPTQ's OBS loss (sum over columns), in units of H
    output_mse: float | None = None  # ||X W^T - X Q^T||^2 / numel on the calibration inputs
    output_rel_error: float | None = None  # the same divided by ||X W^T||^2
    weight_rel_error: float = 0.0  # ||W - Q|| / ||W||
    seconds: float = 0.0  # quantization time of this layer (Hessian collection is shared, not included)


@dataclass
class QuantizedModel:
    model: Any
    tokenizer: Any
    config: Any  # the base QuantConfig
    method: str
    results: dict = field(default_factory=dict)  # module path -> QuantResult (tensors on the CPU)
    layers: list = field(default_factory=list)  # LayerReport per quantized linear, in order
    seconds: float = 0.0
    cancelled: bool = False  # a returned model is always complete; cancellation raises QuantizationCancelled
    true_sequential: bool = True
    overrides: dict = field(default_factory=dict)
    nsamples: int = 0
    seqlen: int = 0
    timings: dict = field(default_factory=dict)  # catch / forward / hessian / quantize seconds
    memory: dict = field(default_factory=dict)  # activation buffer bytes, Hessian bytes, peak RSS / CUDA
    cache_key: str | None = None
    from_cache: bool = False

    def report_rows(self) -> list[dict]:
        return [asdict(r) for r in self.layers]



def _result_to_cpu(res, module=None, compact: bool = True):
    """The result as kept in QuantizedModel.results: on the CPU and small. Codes become uint8 (bits <= 8:
    a quarter of int32), and when `module` already holds exactly this weight as float32 on the CPU,
    res.weight is a view of the module's weight instead of a second copy (for SmolLM2 these two save
    ~0.7 GB; the module's weight then IS the result, so changing one changes the other).
    compact=False keeps the earlier layout (models.quantize.COMPACT_RESULTS)."""
    for f in ("weight", "codes", "scales", "zeros", "g_idx", "perm", "losses", "dead_columns", "rotation"):
        v = getattr(res, f, None)
        if isinstance(v, torch.Tensor):
            setattr(res, f, v.detach().cpu())
    if not compact:
        return res
    if isinstance(res.codes, torch.Tensor) and res.config.bits <= 8:
        res.codes = res.codes.to(torch.uint8)
    if module is not None and isinstance(res.weight, torch.Tensor):
        w = get_weight(module)
        if w.dtype == torch.float32 and w.device.type == "cpu" and torch.equal(w, res.weight):
            res.weight = w
    return res
