"""Models: loading (offline default + Hugging Face), the per-family adapter table, whole-model GPTQ."""

from .adapters import (
    ADAPTERS,
    SUPPORTED_MODEL_TYPES,
    Adapter,
    BlockInputs,
    UnsupportedModelError,
    catch_block_inputs,
    get_adapter,
    get_weight,
    head_logits,
    quantizable_modules,
    run_block,
    run_blocks,
    set_weight,
)
from .loading import (
    CURATED_MODELS,
    DEFAULT_MODEL,
    LoadedModel,
    ModelLoadError,
    available_offline,
    cache_root,
    load_model,
)

__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "BlockInputs",
    "UnsupportedModelError",
    "catch_block_inputs",
    "get_adapter",
    "get_weight",
    "head_logits",
    "quantizable_modules",
    "run_block",
    "run_blocks",
    "set_weight",
    "CURATED_MODELS",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelLoadError",
    "available_offline",
    "cache_root",
    "load_model",
]
