"""Standard GPTQ checkpoints: the on-disk format (packing, tensors, config JSON), export and import.

The format, as users meet it: docs/checkpoints.md. Names load from their submodule on first use (export and
load need torch; the format and packing layers need only NumPy).
"""

from ..lazy import names as _lazy_names

_LAZY = {
    **dict.fromkeys(
        ["CheckpointConfig", "LayerSpec", "parse_quantization_config", "quantization_config_dict"], "config"),
    **dict.fromkeys(["ExportResult", "LoaderSupport", "save_quantized"], "export"),
    **dict.fromkeys(["UnpackedLinear", "check_linear_shape", "default_g_idx", "dequantize", "n_groups",
                     "pack_linear", "read_linear"], "format"),
    **dict.fromkeys(["QuantizedCheckpoint", "load_quantized"], "load"),
    **dict.fromkeys(["CheckpointFormatError", "decode_zeros", "encode_zeros", "pack_cols", "pack_rows",
                     "unpack_cols", "unpack_rows"], "packing"),
}

__all__ = list(_LAZY)

__getattr__ = _lazy_names(__name__, _LAZY)
