"""Metrics: perplexity with the paper's protocol, per-layer output error, sample generations, the bf16
study.

Names load on first access (perplexity and generation need torch; see gptq_explorer.lazy_torch), so
`from gptq_explorer.metrics.layer_error import output_mse_from_hessian` costs no torch import.
"""

from ..lazy import names as _lazy_names

_LAZY = {
    "SAMPLE_PROMPTS": "generation",
    "SAMPLE_TOKENS": "generation",
    "generate_samples": "generation",
    "heldout_layer_errors": "layer_error",
    "layer_output_mse": "layer_error",
    "layer_output_sse": "layer_error",
    "layer_relative_error": "layer_error",
    "obs_loss": "logged_loss",
    "relative_error_from_logged": "logged_loss",
    "output_mse_from_hessian": "layer_error",
    "PerplexityResult": "perplexity_eval",
    "perplexity": "perplexity_eval",
    "window_losses": "perplexity_eval",
}

__all__ = list(_LAZY)


__getattr__ = _lazy_names(__name__, _LAZY)
