"""GGUF files (llama.cpp's single-file format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md),
read with llama.cpp's own Python package (`gguf.GGUFReader`): the metadata, the tensor table, each
tensor's raw bytes, and its weights through the package's reference de-quantizer.

`read_gguf(path)` -> GGUFFile: metadata (scalars and strings; arrays as "<array of N>"), tensors by name
(GGUFTensor: ggml type name, shape in ggml order, absolute byte offset, size), the count of tensors per
type and the stored bits per weight of a type. The file is memory-mapped: nothing is read until asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class GGUFTensor:
    name: str
    type: str  # ggml type name, e.g. "Q4_1"
    shape: tuple  # ggml order: shape[0] is the contiguous dimension (in_features of a weight)
    offset: int  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray = field(repr=False)  # the reader's memory-mapped view of the tensor

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def raw(self) -> np.ndarray:
        """The tensor's bytes as stored (uint8, a copy)."""
        return np.array(self.data).reshape(-1).view(np.uint8)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict  # scalars and strings; arrays as "<array of N>"
    tensors: dict[str, GGUFTensor]

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.type] = out.get(t.type, 0) + 1
        return out

    def bits_per_weight(self, type_name: str) -> float:
        """Stored bits per weight of all tensors of one ggml type, from their byte sizes."""
        ts = [t for t in self.tensors.values() if t.type == type_name]
        return 8 * sum(t.nbytes for t in ts) / sum(t.n_elements for t in ts)

    def raw(self, name: str) -> np.ndarray:
        return self.tensors[name].raw()


def _value(f):
    """A metadata field's value: a Python scalar or string; an array as "<array of N>"."""
    from gguf import GGUFValueType

    if f.types[0] == GGUFValueType.ARRAY:
        return f"<array of {len(f.data)}>"
    if f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode("utf-8", errors="replace")
    return f.parts[-1][0].item()


def read_gguf(path) -> GGUFFile:
    """The header of a GGUF file (v2/v3): metadata and the tensor table; tensor data stays on disk."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError) as exc:  # a wrong magic, or a file too short for a header
        raise ValueError(f"{path} is not a GGUF file ({exc})") from None
    meta = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {
        t.name: GGUFTensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset),
                           int(t.n_bytes), t.data)
        for t in reader.tensors
    }
    return GGUFFile(path, _value(reader.fields["GGUF.version"]), meta, tensors)


def ggml_block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, from llama.cpp's gguf Python package."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return tuple(GGML_QUANT_SIZES[GGMLQuantizationType[type_name]])


def gguf_dequantize(raw: np.ndarray, type_name: str, in_features: int) -> np.ndarray:
    """llama.cpp's own reference de-quantizer (the gguf package's numpy port): raw bytes -> float32
    (rows, in_features)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    per, nbytes = ggml_block(type_name)
    rows = np.asarray(raw, dtype=np.uint8).reshape(-1, in_features // per * nbytes)
    return dequantize(rows, GGMLQuantizationType[type_name]).astype(np.float32)


def gguf_model_name(hf_name: str) -> str:
    """GGUF tensor name of a LLaMA linear, e.g. model.layers.5.mlp.down_proj -> blk.5.ffn_down.weight.
    (q_proj and k_proj are stored with their rows permuted for llama.cpp's RoPE; the others are not.)"""
    parts = hf_name.split(".")
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    return f"blk.{parts[2]}.{table['.'.join(parts[3:])]}.weight"
