"""What a GPTQ checkpoint stores for its quantized linears, in bits: the tensors pack_linear writes, sized
from a linear's shape and its quantization settings alone (no packing needed).

Per linear of out x in weights, with G = n_groups(in, group_size) groups (a short last group costs a full
set of scales and zeros) and the layout of checkpoint.format:

    qweight  int32 [packed_length(in, bits), out]     the codes, packed along the input dimension
    qzeros   int32 [G, packed_length(out, bits)]      the zero points, packed along the output dimension
    scales   fp16  [G, out]
    g_idx    int32 [in]

A bias is not counted (LLaMA-style linears have none). `Storage` sums these over any number of linears:
one (`linear_storage`), a model's from their settings (`storage_from_configs`) or a quantized model's
from its per-layer report (`storage_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .format import TENSOR_NAMES, n_groups
from .packing import packed_length

TENSOR_DTYPES = {"qweight": np.int32, "qzeros": np.int32, "scales": np.float16, "g_idx": np.int32}


def tensor_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple]:
    """The shape of each checkpoint tensor of one linear. Refuses dimensions the packing cannot hold."""
    G = n_groups(in_features, group_size)
    return {
        "qweight": (packed_length(in_features, bits), out_features),
        "qzeros": (G, packed_length(out_features, bits)),
        "scales": (G, out_features),
        "g_idx": (in_features,),
    }


def linear_bits(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, int]:
    """Bits that each checkpoint tensor of one linear occupies."""
    shapes = tensor_shapes(out_features, in_features, bits, group_size)
    return {k: int(np.prod(shapes[k])) * np.dtype(TENSOR_DTYPES[k]).itemsize * 8 for k in TENSOR_NAMES}


@dataclass
class Storage:
    """Bits of quantized linears in a GPTQ checkpoint, per tensor, summed over linears."""

    weights: int = 0  # number of quantized weights
    bits: dict = field(default_factory=lambda: dict.fromkeys(TENSOR_NAMES, 0))
    layers: int = 0

    def add(self, out_features: int, in_features: int, bits: int, group_size: int) -> Storage:
        """Count one more linear; returns self."""
        for k, v in linear_bits(out_features, in_features, bits, group_size).items():
            self.bits[k] += v
        self.weights += out_features * in_features
        self.layers += 1
        return self

    @property
    def total_bits(self) -> int:
        return sum(self.bits.values())

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights

    def per_weight(self) -> dict:
        """Each tensor's share of the bits per weight."""
        return {k: v / self.weights for k, v in self.bits.items()}


def linear_storage(out_features: int, in_features: int, bits: int, group_size: int) -> Storage:
    """The storage of one (out_features x in_features) linear."""
    return Storage().add(out_features, in_features, bits, group_size)


def storage_from_configs(shapes: dict, configs: dict) -> Storage:
    """shapes: module path -> (out, in); configs: module path -> QuantConfig (e.g. layer_configs's)."""
    s = Storage()
    for name, (out_f, in_f) in shapes.items():
        c = configs[name]
        s.add(out_f, in_f, c.bits, c.group_size)
    return s


def storage_of(qm) -> Storage:
    """Storage of a QuantizedModel's quantized linears, from its per-layer report (shape, bits, group
    size)."""
    s = Storage()
    for r in qm.layers:
        s.add(r.shape[0], r.shape[1], r.bits, r.group_size)
    return s
