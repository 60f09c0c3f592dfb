"""GPTQ Explorer: learn and explore GPTQ post-training quantization of language models."""

from .engine import (
    GPTQStep,
    GPTQStepper,
    Hessian,
    QuantConfig,
    QuantResult,
    gptq_quantize,
    gptq_steps,
    rtn_quantize,
)

__version__ = "0.1.0"

__all__ = ["QuantConfig", "QuantResult", "Hessian", "gptq_quantize", "rtn_quantize", "gptq_steps",
           "GPTQStep", "GPTQStepper", "__version__"]
