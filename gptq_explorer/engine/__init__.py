"""The engine: the quantization grid, GPTQ (NumPy reference and torch path), RTN, and Hessians."""

from .api import gptq_quantize, rtn_quantize
from .config import QuantConfig, QuantResult
from .gptq import GPTQStep, GPTQStepper, gptq_steps
from .hessian import Hessian

__all__ = ["QuantConfig", "QuantResult", "Hessian", "gptq_quantize", "rtn_quantize", "gptq_steps",
           "GPTQStep", "GPTQStepper"]
