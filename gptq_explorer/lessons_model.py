"""The logic behind lessons 7 (the whole model) and 8 (export and deploy): every number they state is
computed here, and tests/test_lessons_model.py checks these functions against direct computations.

Display helpers (setup, show, html_table) come from gptq_explorer.lessons.

Contents
  storage     exact bits per weight of a GPTQ checkpoint, from layer shapes or from the file itself
  lesson 8    a checkpoint from the inside (tensors of one layer, a word unpacked by hand, the v1 zero-1
              convention and what AutoGPTQ's packer makes of a zero of 0), logits of the reloaded folder,
              the GGUF file the offline model came in (a small header reader, one Q4_1 block by hand),
              the other 4-bit formats' storage, the outside-loader pins
  lesson 7    perplexity of FP / RTN / GPTQ, sensitive layers from the per-layer report, mixed precision
              with overrides and what it costs
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# storage: what a GPTQ checkpoint holds per quantized linear (shared/reference/gptq-anchors.md §3.1)

QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def gptq_layer_bits(out_features: int, in_features: int, bits: int, group_size: int) -> dict:
    """Bits that each checkpoint tensor of one linear occupies (no bias: LLaMA-style linears have none).

    qweight  int32 [in*bits/32, out]   = in*out*bits
    qzeros   int32 [G, out*bits/32]    = G*out*bits      (G = ceil(in / group_size))
    scales   fp16  [G, out]            = G*out*16
    g_idx    int32 [in]                = in*32
    """
    from .checkpoint import n_groups

    G = n_groups(in_features, group_size)
    return {
        "qweight": in_features * out_features * bits,
        "qzeros": G * out_features * bits,
        "scales": G * out_features * 16,
        "g_idx": in_features * 32,
    }


@dataclass
class Storage:
    """Bits of the quantized linears of a model, summed over layers."""

    weights: int = 0  # number of quantized weights
    bits: dict = field(default_factory=lambda: dict.fromkeys(QUANT_TENSORS, 0))
    layers: int = 0

    def add(self, out_features: int, in_features: int, bits: int, group_size: int) -> None:
        for k, v in gptq_layer_bits(out_features, in_features, bits, group_size).items():
            self.bits[k] += v
        self.weights += out_features * in_features
        self.layers += 1

    @property
    def total_bits(self) -> int:
        return sum(self.bits.values())

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights

    def per_weight(self) -> dict:
        """Each tensor's share of the bits per weight."""
        return {k: v / self.weights for k, v in self.bits.items()}


def storage_from_configs(shapes: dict, configs: dict) -> Storage:
    """shapes: module path -> (out, in); configs: module path -> QuantConfig (e.g. layer_configs's)."""
    s = Storage()
    for name, (out_f, in_f) in shapes.items():
        c = configs[name]
        s.add(out_f, in_f, c.bits, c.group_size)
    return s


def storage_of(qm) -> Storage:
    """Storage of a QuantizedModel's quantized linears, from its per-layer report (bits, group size)."""
    s = Storage()
    for r in qm.layers:
        s.add(r.shape[0], r.shape[1], r.bits, r.group_size)
    return s


def file_storage(folder) -> dict:
    """Bytes in an exported folder's safetensors file(s), read from their headers: per quantized-tensor kind
    (qweight/qzeros/scales/g_idx), the other tensors (by name), and the number of quantized linears."""
    from .models.loading import safetensors_header

    folder = Path(folder)
    out = {"quantized": dict.fromkeys(QUANT_TENSORS, 0), "other": {}, "linears": 0}
    for path in sorted(folder.glob("*.safetensors")):
        for key, info in safetensors_header(path).items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            leaf = key.rsplit(".", 1)[-1]
            if leaf in QUANT_TENSORS:
                out["quantized"][leaf] += end - start
                out["linears"] += leaf == "qweight"
            else:
                out["other"][key] = end - start
    return out


# ---------------------------------------------------------------------------------------------------------
# lesson 8: the checkpoint from the inside


def folder_files(folder) -> list[dict]:
    """The files of an exported folder with their sizes."""
    folder = Path(folder)
    return [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()]


TENSOR_MEANING = {
    "qweight": "integer codes, packed along the input dimension",
    "qzeros": "zero points, packed along the output dimension (v1: zero - 1)",
    "scales": "one scale per (group, output row)",
    "g_idx": "the group of each input column",
    "bias": "the linear's bias",
}


def layer_tensors(folder, prefix: str) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one quantized linear, read straight from the safetensors file(s)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                head, _, leaf = key.rpartition(".")
                if head == prefix:
                    out[leaf] = f.get_tensor(key)
    if "qweight" not in out:
        raise KeyError(f"{prefix!r} has no qweight in {folder}; quantized linears look like "
                       "'model.layers.0.self_attn.q_proj'")
    return out


def tensor_rows(tensors: dict) -> list[dict]:
    return [{"tensor": k, "dtype": str(v.dtype), "shape": str(tuple(v.shape)),
             "meaning": TENSOR_MEANING.get(k, "")} for k, v in tensors.items()]


def unpack_word(word, bits: int = 4) -> list[int]:
    """The 32/bits fields of one int32 word, lowest bits first: field k = (w >> bits*k) & (2^bits - 1),
    with w the word's unsigned 32-bit value (a stored int32 may be negative)."""
    w = int(word) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    return [(w >> (bits * k)) & mask for k in range(32 // bits)]


def hex32(word) -> str:
    return f"0x{int(word) & 0xFFFFFFFF:08x}"


def negative_word(qweight: np.ndarray, row: int = 0) -> int:
    """The first output column whose word in qweight[row] is negative as an int32 (top field >= 8)."""
    cols = np.flatnonzero(np.asarray(qweight)[row] < 0)
    if not cols.size:
        raise ValueError(f"no negative word in qweight row {row}")
    return int(cols[0])


def word_rows(tensors: dict, result, row: int, col: int, zero: int, bits: int = 4) -> list[dict]:
    """Unpack qweight[row, col] of one layer's checkpoint tensors by hand: one table row per field, with
    the engine's code for that weight (result: its QuantResult) and the weight rebuilt from the stored fp16
    scale, fp16(scale) * (code - zero), next to the engine's float32 weight.
    Field k of word (row, col) is the code of output `col`, input row*(32/bits) + k."""
    per = 32 // bits
    fields = unpack_word(tensors["qweight"][row, col], bits)
    codes, W = np.asarray(result.codes), np.asarray(result.weight)
    rows = []
    for k, f in enumerate(fields):
        i = row * per + k
        scale = np.float32(tensors["scales"][tensors["g_idx"][i], col])
        rows.append({"field": k, "bits": f"{bits * k}-{bits * k + bits - 1}", "value": f,
                     "input column": i, "engine code": int(codes[col, i]),
                     "fp16(scale) * (value - zero)": float(scale * np.float32(f - zero)),
                     "engine weight (float32)": float(W[col, i])})
    return rows


def zero_words(zeros, bits: int = 4) -> dict:
    """How one word of qzeros stores the given zero points (32/bits of them) in each format: the packed
    word in hex and the fields a reader unpacks. gptq (v1) stores zero - 1 and refuses a zero of 0."""
    from .checkpoint import CheckpointFormatError, encode_zeros, pack_cols

    z = np.asarray(zeros, dtype=np.int64)[None, :]
    out = {}
    for fmt in ("gptq", "gptq_v2"):
        try:
            word = pack_cols(encode_zeros(z, bits, fmt), bits)[0, 0]
            out[fmt] = {"word": hex32(word), "fields": unpack_word(word, bits), "error": ""}
        except CheckpointFormatError as e:
            out[fmt] = {"word": "", "fields": [], "error": str(e)}
    return out


def autogptq_v1_qzeros_word(zeros, bits: int = 4) -> int:
    """What AutoGPTQ's packer (qlinear_cuda_old.QuantLinear.pack; shared/reference/gptq-anchors.md §3.4)
    makes of one word of zero points, restated: it subtracts 1, casts to uint32 (so -1 becomes 0xFFFFFFFF)
    and ORs each field in at its shift, so a zero of 0 sets every bit above its field."""
    word = 0
    for j, z in enumerate(np.asarray(zeros, dtype=np.int64)):
        field_value = (int(z) - 1) & 0xFFFFFFFF  # the float -1 cast to uint32 on x86
        word |= (field_value << (bits * j)) & 0xFFFFFFFF
    return word


def v1_decode(word, bits: int = 4) -> list[int]:
    """A v1 reader's zero points from one qzeros word: (field + 1) & mask (AutoGPTQ cuda_old, GPTQModel)."""
    from .checkpoint import decode_zeros

    return [int(v) for v in decode_zeros(np.array(unpack_word(word, bits)), bits, "gptq")]


def asym_zero_counts(W, group_sizes=(128, 32), bits_list=(4, 3, 2)) -> list[dict]:
    """How many (row, group) pairs of a real layer get a zero point of 0 on the asymmetric grid: the
    case the v1 format cannot store."""
    from . import QuantConfig, rtn_quantize

    W = np.asarray(W, dtype=np.float64)
    rows = []
    for bits in bits_list:
        for gs in group_sizes:
            z = np.asarray(rtn_quantize(W, QuantConfig(bits=bits, group_size=gs, sym=False)).zeros)
            rows.append({"bits": bits, "group size": gs, "(row, group) pairs": int(z.size),
                         "zero = 0": int((z == 0).sum())})
    return rows


@torch.no_grad()
def logits_agreement(model_a, model_b, ids) -> dict:
    """||a - b|| / ||b|| of two models' logits on the same tokens, and how often their top-1 tokens agree."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    a = model_a(input_ids=ids, use_cache=False).logits.float()
    b = model_b(input_ids=ids, use_cache=False).logits.float()
    return {"tokens": ids.shape[1], "rel_error": float((a - b).norm() / b.norm()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def reload_check(qm, ckpt) -> dict:
    """Exported and reloaded vs the in-memory quantized model, over every quantized linear: codes, zeros
    and g_idx identical; scales equal to fp16(engine scale); largest relative weight difference."""
    codes_equal = zeros_equal = g_equal = scales_fp16 = True
    worst = 0.0
    for name, res in qm.results.items():
        layer = ckpt.layers[name]
        codes_equal &= bool(np.array_equal(layer.codes, np.asarray(res.codes)))
        zeros_equal &= bool(np.array_equal(layer.zeros, np.asarray(res.zeros)))
        g_equal &= bool(np.array_equal(layer.g_idx, np.asarray(res.g_idx)))
        s = np.asarray(res.scales, dtype=np.float32)
        scales_fp16 &= bool(np.array_equal(layer.scales, s.astype(np.float16).astype(np.float32)))
        W = np.asarray(res.weight, dtype=np.float32)
        D = layer.dequantize()
        nz = W != 0
        worst = max(worst, float(np.max(np.abs(D[nz] - W[nz]) / np.abs(W[nz]))))
    return {"layers": len(qm.results), "codes_equal": codes_equal, "zeros_equal": zeros_equal,
            "g_idx_equal": g_equal, "scales_are_fp16_of_engine": scales_fp16, "max_rel_weight_diff": worst}


def short_last_groups(qm, group_size: int | None = None) -> dict:
    """Layers whose in_features is not a multiple of the group size (their last group is shorter), which
    vLLM refuses; per in_features."""
    out: dict[int, int] = {}
    for r in qm.layers:
        gs = group_size or r.group_size
        if gs != -1 and r.shape[1] % gs:
            out[r.shape[1]] = out.get(r.shape[1], 0) + 1
    return out


# ---- the GGUF file the offline model came in (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    type: str  # ggml type name, e.g. "Q4_1"
    shape: tuple  # ggml order: shape[0] is the contiguous dimension (in_features of a weight)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


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
        t = self.tensors[name]
        return np.fromfile(self.path, dtype=np.uint8, count=t.nbytes, offset=t.offset)


def ggml_block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, from llama.cpp's gguf Python package."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return tuple(GGML_QUANT_SIZES[GGMLQuantizationType[type_name]])


def read_gguf(path) -> GGUFFile:
    """Parse a GGUF (v2/v3) header: metadata and the tensor table, without loading any tensor data.

    Layout: magic "GGUF", version u32, tensor count u64, metadata count u64; metadata key/value pairs
    (string = u64 length + UTF-8); per tensor: name, n_dims u32, dims u64 each, ggml type u32, offset u64
    (relative to the data section, which starts at the next multiple of general.alignment, default 32)."""
    from gguf import GGMLQuantizationType

    path = Path(path)
    buf = path.read_bytes()[: 64 << 20]  # the header of a small model fits well inside this
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        s = buf[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype):
        nonlocal pos
        if vtype in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return string()
        if vtype == _GGUF_ARRAY:
            itype, n = take("<I"), take("<Q")
            if itype in _GGUF_SCALARS:
                pos += n * struct.calcsize(_GGUF_SCALARS[itype])
            else:
                for _ in range(n):
                    value(itype)
            return f"<array of {n}>"
        raise ValueError(f"{path.name}: unknown GGUF value type {vtype} at byte {pos}")

    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {buf[:4]!r})")
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("<Q") for _ in range(take("<I")))
        infos.append((name, dims, take("<I"), take("<Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = {}
    for name, dims, ttype, off in infos:
        tname = GGMLQuantizationType(ttype).name
        per, nbytes = ggml_block(tname)
        n = int(np.prod(dims))
        tensors[name] = GGUFTensor(name, tname, dims, start + off, n // per * nbytes)
    return GGUFFile(path, version, meta, tensors)


def q4_1_dequantize(raw: np.ndarray, shape: tuple) -> dict:
    """De-quantize a Q4_1 tensor from its bytes. Each block of 32 weights is 20 bytes: fp16 d (scale),
    fp16 m (minimum), 16 bytes of codes (byte j holds weight j in its low 4 bits and weight j+16 in its high
    4 bits); w = d * q + m. Returns the (rows, cols) weights and the per-block d, m and codes."""
    per, nbytes = ggml_block("Q4_1")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32)
    qs = blocks[:, 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    W = d[:, None] * codes.astype(np.float32) + m[:, None]
    cols = shape[0]
    return {"weight": W.reshape(-1, cols), "d": d, "m": m, "codes": codes}


def gguf_model_name(hf_name: str) -> str:
    """GGUF tensor name of a LLaMA linear, e.g. model.layers.5.mlp.down_proj -> blk.5.ffn_down.weight.
    (q_proj and k_proj are stored with their rows permuted for llama.cpp's RoPE; the others are not.)"""
    parts = hf_name.split(".")
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    return f"blk.{parts[2]}.{table['.'.join(parts[3:])]}.weight"


def q4_1_block_rows(q: dict, block: int = 0) -> dict:
    """One Q4_1 block unpacked: its d, m, codes and values."""
    return {"d": float(q["d"][block]), "m": float(q["m"][block]),
            "codes": [int(c) for c in q["codes"][block]],
            "values": [float(v) for v in q["weight"].reshape(-1, 32)[block]]}


def q4_1_vs_integer_zero(q: dict, W) -> dict:
    """Q4_1 grids have a float minimum m; GPTQ grids an integer zero z (w = s (q - z)). For the Q4_1 blocks
    of a tensor: the share whose -m/d is an integer (within 1e-3, i.e. exactly representable on an
    integer-zero grid with the same step), and the relative error of RTN on GPTQ's asymmetric grid with the
    same 4 bits and groups of 32 (the closest GPTQ grid)."""
    from . import QuantConfig, rtn_quantize

    d, m = q["d"].astype(np.float64), q["m"].astype(np.float64)
    ratio = -m / np.where(d == 0, 1.0, d)
    integral = np.abs(ratio - np.round(ratio)) < 1e-3
    W = np.asarray(W, dtype=np.float64)
    Q = rtn_quantize(W, QuantConfig(bits=4, group_size=32, sym=False)).weight
    return {"blocks": int(d.size), "integer_zero_share": float(integral.mean()),
            "rtn_asym_g32_rel_error": float(np.linalg.norm(W - Q) / np.linalg.norm(W))}


def gguf_dequantize(raw: np.ndarray, type_name: str, in_features: int) -> np.ndarray:
    """llama.cpp's own reference de-quantizer (the gguf package's numpy port): raw bytes -> float32
    (rows, in_features)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    per, nbytes = ggml_block(type_name)
    rows = np.asarray(raw, dtype=np.uint8).reshape(-1, in_features // per * nbytes)
    return dequantize(rows, GGMLQuantizationType[type_name]).astype(np.float32)


def sym4_g32_as_q4_0(codes, scales) -> np.ndarray:
    """Write a symmetric 4-bit, group-32 GPTQ layer (w = s (q - 8), s per row and 32 inputs) as GGUF Q4_0
    blocks (w = d (q - 8), fp16 d per 32 consecutive inputs; 18 bytes: d, then byte j = code j | code j+16
    << 4). Same grid, so no value is re-rounded; the fp16 d is the fp16 scale a GPTQ checkpoint stores.
    Returns uint8 (rows, in/32*18)."""
    codes = np.asarray(codes).astype(np.uint8)
    scales = np.asarray(scales, dtype=np.float32)
    out_f, in_f = codes.shape
    if in_f % 32 or scales.shape != (out_f, in_f // 32):
        raise ValueError(f"need codes [out, in] with in % 32 == 0 and scales [out, in/32]; "
                         f"got {codes.shape}, {scales.shape}")
    c = codes.reshape(out_f, in_f // 32, 32)
    qs = c[..., :16] | (c[..., 16:] << 4)
    d = scales.astype(np.float16).view(np.uint8).reshape(out_f, in_f // 32, 2)
    return np.concatenate([d, qs], axis=-1).reshape(out_f, -1)


# ---- the other formats


def nf4_bits_per_weight(block: int = 64, double_quant: bool = False, block2: int = 256) -> float:
    """bitsandbytes NF4 (QLoRA, arXiv:2305.14314): 4-bit codes plus one fp32 absmax per block of 64; with
    double quantization the absmax values are stored as 8-bit with one fp32 constant per 256 of them."""
    if double_quant:
        return 4 + 8 / block + 32 / (block * block2)
    return 4 + 32 / block


def format_rows(gptq_bpw: float, gguf_q4_1_bpw: float) -> list[dict]:
    """Stored bits per weight of the 4-bit formats a learner meets, computed from their block layouts."""
    rows = [{"format": "GPTQ 4-bit g128 sym (this export, SmolLM2's linears)", "bits per weight": gptq_bpw,
             "how": "int codes, fp16 scale + 4-bit zero per 128 inputs and row, int32 g_idx"}]
    for t in ("Q4_0", "Q4_1", "Q4_K", "Q8_0"):
        per, nbytes = ggml_block(t)
        rows.append({"format": f"GGUF {t}", "bits per weight": 8 * nbytes / per,
                     "how": f"{nbytes} bytes per block of {per} weights"})
    rows[2]["how"] += f" (measured on the offline model's file: {gguf_q4_1_bpw:g})"
    rows.append({"format": "bitsandbytes NF4", "bits per weight": nf4_bits_per_weight(),
                 "how": "4-bit NormalFloat codes, fp32 absmax per 64 weights"})
    rows.append({"format": "bitsandbytes NF4 + double quantization",
                 "bits per weight": nf4_bits_per_weight(double_quant=True),
                 "how": "absmax as 8-bit, one fp32 constant per 256 blocks"})
    return rows


def outside_loader_pins(root=None) -> dict:
    """Versions pinned for the outside-loader test environment (requirements/outside-loader.txt)."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]
    path = root / "requirements" / "outside-loader.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it ships with the repository (a source checkout)")
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


# ---------------------------------------------------------------------------------------------------------
# lesson 7: the whole model


def _get(row, key):
    """A field of a per-layer report row (LayerReport or dict). "output_rel_norm" is derived: the relative
    output error as a norm ratio, ||X(W-Q)^T|| / ||XW^T|| = sqrt(output_rel_error)."""
    if key == "output_rel_norm":
        v = _get(row, "output_rel_error")
        return None if v is None else math.sqrt(v)
    return row[key] if isinstance(row, dict) else getattr(row, key)


def sublayer(name: str) -> str:
    """'model.layers.5.self_attn.q_proj' -> 'self_attn.q_proj'."""
    parts = name.split(".")
    return ".".join(parts[3:]) if len(parts) > 3 and parts[1] == "layers" else name


def sensitive_layers(layers, k: int, key: str = "output_rel_error") -> list[str]:
    """The k layers with the largest `key` in a per-layer report (LayerReport objects, or the dicts of a
    JSON report), largest first."""
    rows = [r for r in layers if _get(r, key) is not None]
    if len(rows) < k:
        raise ValueError(f"the report has {len(rows)} layers with {key!r}, fewer than k={k}; RTN without "
                         "calibration data has no output errors: pass calib_ids to quantize_model")
    rows.sort(key=lambda r: -_get(r, key))
    return [_get(r, "name") for r in rows[:k]]


def overrides_for(names, **change) -> dict:
    """quantize_model overrides that give exactly these layers (full module paths) other settings."""
    if not change:
        raise ValueError("say what to change, e.g. overrides_for(names, bits=8)")
    return {n: dict(change) for n in names}


def report_rows(layers, key: str = "output_rel_norm") -> list[dict]:
    """Per sublayer type: median, min and max of `key` over the blocks, and the block of the max."""
    groups: dict[str, list] = {}
    for r in layers:
        groups.setdefault(sublayer(_get(r, "name")), []).append(r)
    out = []
    for sub, rs in groups.items():
        v = np.array([_get(r, key) for r in rs], dtype=float)
        out.append({"sublayer": sub, f"{key} (median)": float(np.median(v)), "min": float(v.min()),
                    "max": float(v.max()), "block of max": int(_get(rs[int(np.argmax(v))], "block"))})
    return out


def fig_layer_report(layers, highlight=(), key: str = "output_rel_norm", title: str = ""):
    """One line per sublayer type across the blocks; the highlighted layers are circled."""
    import plotly.graph_objects as go

    fig = go.Figure()
    groups: dict[str, list] = {}
    for r in layers:
        groups.setdefault(sublayer(_get(r, "name")), []).append(r)
    for sub, rs in groups.items():
        fig.add_trace(go.Scatter(x=[_get(r, "block") for r in rs], y=[_get(r, key) for r in rs],
                                 mode="lines+markers", name=sub,
                                 hovertemplate="block %{x}<br>%{y:.4f}<extra>" + sub + "</extra>"))
    marked = [r for r in layers if _get(r, "name") in set(highlight)]
    if marked:
        fig.add_trace(go.Scatter(x=[_get(r, "block") for r in marked], y=[_get(r, key) for r in marked],
                                 mode="markers", name="chosen for 8 bits",
                                 marker=dict(size=14, symbol="circle-open", line=dict(width=2),
                                             color="black"),
                                 text=[_get(r, "name") for r in marked],
                                 hovertemplate="%{text}<br>%{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="block", yaxis_title=key, height=420,
                      legend=dict(orientation="h", y=-0.2), margin=dict(t=50, b=40))
    return fig


def eval_ppl(model, ids, seqlen: int) -> float:
    """Perplexity with the paper's protocol (gptq_explorer.metrics.perplexity), quietly."""
    from .metrics import perplexity

    return perplexity(model, ids, seqlen=seqlen, progress=False).ppl


def ppl_gap_closed(fp: float, rtn: float, other: float) -> float:
    """Share of RTN's perplexity increase over FP that `other` removes: (rtn - other) / (rtn - fp)."""
    return (rtn - other) / (rtn - fp)


@dataclass
class MixedRun:
    label: str
    overrides: dict
    layers_8bit: int  # layers the overrides raised above the base config's bits
    total_bits: int  # storage of the quantized linears in a GPTQ checkpoint (Storage.total_bits)
    weights: int  # quantized weights
    ppl: float
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights


def mixed_run(label: str, qm, ppl: float, base_bits: int, seconds: float = 0.0) -> MixedRun:
    """A MixedRun for a QuantizedModel already measured (e.g. the uniform baseline)."""
    st = storage_of(qm)
    return MixedRun(label, dict(qm.overrides), sum(r.bits > base_bits for r in qm.layers), st.total_bits,
                    st.weights, ppl, seconds)


def mixed_precision_runs(lm, cfg, choices: dict, ids, seqlen: int, method: str = "rtn", calib_ids=None
                         ) -> list[MixedRun]:
    """Quantize the model once per choice {label: overrides} (on a copy; the loaded model is untouched),
    and measure each: how many layers the overrides raised to more bits, the exact bits per weight of the
    quantized linears (as a GPTQ checkpoint stores them), and the perplexity on `ids`."""
    import time

    from .models.quantize import quantize_model

    out = []
    for label, overrides in choices.items():
        t = time.perf_counter()
        qm = quantize_model(lm, calib_ids, cfg, method=method, overrides=overrides, inplace=False,
                            progress=False, hessian_condition=False)
        ppl = eval_ppl(qm.model, ids, seqlen)
        out.append(mixed_run(label, qm, ppl, cfg.bits, time.perf_counter() - t))
        del qm
    return out


def mixed_rows(runs: list[MixedRun], fp_ppl: float, base: MixedRun) -> list[dict]:
    """Table rows: bits per weight, extra bits per weight over `base`, perplexity, and the share of the
    base's perplexity increase over FP that each choice removes (per 0.01 extra bits per weight too)."""
    rows = []
    for r in runs:
        extra = r.bits_per_weight - base.bits_per_weight
        closed = ppl_gap_closed(fp_ppl, base.ppl, r.ppl)
        rows.append({"choice": r.label, "layers at 8 bits": r.layers_8bit,
                     "bits per weight": r.bits_per_weight, "extra bits per weight": extra,
                     "perplexity": r.ppl, "share of the gap removed": closed,
                     "removed per 0.01 extra bits": closed / (extra / 0.01) if extra > 0 else float("nan")})
    return rows


SHIPPED_CONFIGS = ((4, 128, True), (3, 128, True), (4, 128, False), (3, 128, False))


def shipped_comparison(model: str = "smollm2-135m", configs=SHIPPED_CONFIGS,
                       corpora=("prose", "code")) -> dict:
    """The stored full-setting runs (gptq_explorer.results, written by benchmarks/bench_models.py) of FP and
    of RTN and GPTQ at each (bits, group_size, sym): {"runs": run id -> report or None, "missing": [ids],
    "rows": table rows of the runs present, "message": what to do about missing ones}."""
    from . import results

    runs = {"fp": results.find_run(model, "fp")}
    for bits, g, sym in configs:
        for method in ("rtn", "gptq"):
            runs[results.run_id(method, bits, g, sym)] = results.find_run(model, method, bits=bits,
                                                                          group_size=g, sym=sym)
    missing = [k for k, v in runs.items() if v is None]
    rows = [run_row(rid, r, corpora) for rid, r in runs.items() if r is not None]
    message = "" if not missing else (
        f"missing shipped runs for {model}: {', '.join(missing)} (in {results.model_dir(model)}). "
        "They come from `python benchmarks/bench_models.py` (resumable; see its docstring).")
    return {"runs": runs, "missing": missing, "rows": rows, "message": message}


def run_row(rid: str, r: dict, corpora=("prose", "code")) -> dict:
    """One stored run as a table row: method, bits, group, perplexities, time, calibration, where it ran."""
    from .results import run_device

    c, cal, ev = r.get("config", {}), r.get("calibration") or {}, r.get("evaluation", {})
    row = {"run": rid, "method": r["method"].upper(), "bits": 32 if r["method"] == "fp" else c["bits"]}
    row.update({f"{k} ppl": r["perplexity"][k] for k in corpora})
    row["quantize s"] = r.get("timings", {}).get("quantize", 0.0)
    row["calibration"] = f"{cal['nsamples']} x {cal['seqlen']} {cal['corpus']}" if cal else "none"
    row["eval tokens per corpus"] = ev.get("tokens")
    if run_device(r) != "cpu":
        row["device"] = r.get("environment", {}).get("gpu", run_device(r))
    return row


def stored_runs(folder: str) -> dict:
    """The run reports in data/results/<folder> (e.g. "h200-python3.12", the runs made on a GPU): run id ->
    report. Raises FileNotFoundError naming the folder when it holds none."""
    from . import results

    path = results.results_dir() / folder
    runs = {r["run_id"]: r for r in results.read_reports(path)}
    if not runs:
        raise FileNotFoundError(f"no run reports in {path}")
    return runs


def samples_rows(runs: dict, run_ids: dict, prompts=None) -> list[dict]:
    """Greedy samples of stored runs side by side: one row per prompt, one column per label.
    runs: run id -> report (as shipped_comparison returns); run_ids: column label -> run id."""
    from .metrics import SAMPLE_PROMPTS

    missing = [rid for rid in run_ids.values() if not (runs.get(rid) or {}).get("samples")]
    if missing:
        raise ValueError(f"no samples in the stored run(s) {missing}; rerun them with "
                         "`gptq-explorer quantize --samples` (benchmarks/bench_models.py does)")
    return [{"prompt": p, **{label: runs[rid]["samples"][p] for label, rid in run_ids.items()}}
            for p in (prompts or SAMPLE_PROMPTS)]


def report_comparison(a_layers, b_layers, labels=("RTN", "GPTQ"), key: str = "output_rel_norm") -> list[dict]:
    """Per sublayer type: the median of `key` in two per-layer reports and their ratio (b / a)."""
    a = {r["sublayer"]: r[f"{key} (median)"] for r in report_rows(a_layers, key)}
    b = {r["sublayer"]: r[f"{key} (median)"] for r in report_rows(b_layers, key)}
    if set(a) != set(b):
        raise ValueError(f"the reports cover different layer types: {sorted(a)} vs {sorted(b)}")
    return [{"sublayer": s, f"{labels[0]} (median)": a[s], f"{labels[1]} (median)": b[s],
             f"{labels[1]} / {labels[0]}": b[s] / a[s]} for s in a]
