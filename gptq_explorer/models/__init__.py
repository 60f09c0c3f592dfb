"""Models: loading (offline default + Hugging Face), the per-family adapter table, whole-model GPTQ.

Names load on first access: most of them need torch (see gptq_explorer.lazy_torch), and the app's first
view only reads the model list (`gptq_explorer.models.catalog`).
"""

from ..lazy import names as _lazy_names

_LAZY = {
    **dict.fromkeys(
        ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "Adapter", "BlockInputs", "UnsupportedModelError",
         "catch_block_inputs", "get_adapter", "get_weight", "head_inputs", "head_logits",
         "quantizable_modules", "run_block", "run_blocks", "set_weight"], "adapters"),
    **dict.fromkeys(["CURATED_MODELS", "DEFAULT_MODEL"], "catalog"),
    **dict.fromkeys(
        ["LoadedModel", "available_offline", "estimate_model_memory", "load_model"], "loading"),
    **dict.fromkeys(["cache_root", "offline_model_ready"], "cache_folders"),
    **dict.fromkeys(["ModelLoadError", "ModelTooLargeError"], "load_errors"),
    **dict.fromkeys(["MemoryEstimate", "memory_budget"], "memory"),
}

__all__ = list(_LAZY)


__getattr__ = _lazy_names(__name__, _LAZY)
