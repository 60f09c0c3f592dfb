"""GPTQ Explorer: learn and explore GPTQ post-training quantization of language models.

The engine (QuantConfig, Hessian, gptq_quantize, rtn_quantize, gptq_steps) imports only NumPy and SciPy;
torch loads when a tensor or the torch backend first reaches it (gptq_explorer.lazy_torch). Model, data,
metric and checkpoint functions load torch and transformers on first use, so a lesson that only steps
through a layer, and the app's first view, start fast.
"""

from .lazy import names as _lazy_names

__version__ = "0.1.0"

# name -> submodule that defines it, imported on first access (the engine's too: `python -m
# gptq_explorer.ui.serve` starts Voila without NumPy or SciPy)
_LAZY = {
    **dict.fromkeys(["QuantConfig", "QuantResult", "Hessian", "gptq_quantize", "rtn_quantize", "gptq_steps",
                     "GPTQStep", "GPTQStepper"], "engine"),
    "load_model": "models",
    "LoadedModel": "models",
    "CURATED_MODELS": "models",
    "DEFAULT_MODEL": "models",
    "quantize_model": "models.quantize",
    "QuantizedModel": "models.quantize",
    "load_corpus": "data",
    "calibration_windows": "data",
    "evaluation_ids": "data",
    "perplexity": "metrics",
    "save_quantized": "checkpoint",
    "load_quantized": "checkpoint",
    "grid_view": "views.grid_view",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = _lazy_names(__name__, _LAZY)
