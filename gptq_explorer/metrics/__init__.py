"""Metrics: perplexity with the paper's protocol, per-layer output error, sample generations, the bf16
study."""

from .generation import SAMPLE_PROMPTS, SAMPLE_TOKENS, generate_samples
from .layer_error import (
    heldout_layer_errors,
    layer_output_mse,
    layer_output_sse,
    layer_relative_error,
    output_mse_from_hessian,
)
from .perplexity import PerplexityResult, perplexity, window_losses

__all__ = [
    "PerplexityResult",
    "perplexity",
    "window_losses",
    "layer_output_mse",
    "layer_output_sse",
    "layer_relative_error",
    "output_mse_from_hessian",
    "heldout_layer_errors",
    "SAMPLE_PROMPTS",
    "SAMPLE_TOKENS",
    "generate_samples",
]
