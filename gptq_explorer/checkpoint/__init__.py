"""Standard GPTQ checkpoints: the on-disk format (packing, tensors, config JSON), export and import.

Format reference: shared/reference/gptq-anchors.md §3.
"""

from .config import CheckpointConfig, LayerSpec, parse_quantization_config, quantization_config_dict
from .format import (
    UnpackedLinear,
    check_linear_shape,
    default_g_idx,
    dequantize,
    n_groups,
    pack_linear,
    read_linear,
)
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
    "LayerSpec",
    "UnpackedLinear",
    "check_linear_shape",
    "decode_zeros",
    "default_g_idx",
    "dequantize",
    "encode_zeros",
    "n_groups",
    "pack_cols",
    "pack_linear",
    "pack_rows",
    "parse_quantization_config",
    "quantization_config_dict",
    "read_linear",
    "unpack_cols",
    "unpack_rows",
]
