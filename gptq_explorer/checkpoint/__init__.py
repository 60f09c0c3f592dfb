"""Standard GPTQ checkpoints: the on-disk format (packing, tensors, config JSON), export and import.

Format reference: shared/reference/gptq-anchors.md §3.
"""

from .config import CheckpointConfig, LayerSpec, parse_quantization_config, quantization_config_dict
from .export import ExportResult, LoaderSupport, save_quantized
from .format import (
    UnpackedLinear,
    check_linear_shape,
    default_g_idx,
    dequantize,
    n_groups,
    pack_linear,
    read_linear,
)
from .load import QuantizedCheckpoint, load_quantized
from .packing import (
    CheckpointFormatError,
    decode_zeros,
    encode_zeros,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)

__all__ = [
    "CheckpointConfig",
    "CheckpointFormatError",
    "ExportResult",
    "LoaderSupport",
    "QuantizedCheckpoint",
    "LayerSpec",
    "UnpackedLinear",
    "check_linear_shape",
    "decode_zeros",
    "default_g_idx",
    "dequantize",
    "encode_zeros",
    "load_quantized",
    "n_groups",
    "pack_cols",
    "pack_linear",
    "pack_rows",
    "parse_quantization_config",
    "quantization_config_dict",
    "read_linear",
    "save_quantized",
    "unpack_cols",
    "unpack_rows",
]
