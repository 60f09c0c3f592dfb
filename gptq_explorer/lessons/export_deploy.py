"""Lesson 8 (notebooks/08_export_and_deploy.ipynb): export and deploy.

A checkpoint from the inside: its files and bytes (against checkpoint.storage), the tensors of one layer, a
word unpacked by hand, the v1 zero-1 convention and what AutoGPTQ's packer makes of a zero of 0, the
reloaded folder against the model in memory. The GGUF file the offline model came in (read with
models.gguf; one Q4_1 block decoded here by hand, on purpose, to show its bytes), the other 4-bit formats'
storage, and the outside-loader pins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint.format import TENSOR_NAMES
from ..models.gguf import ggml_block

# ---- the exported folder


def file_storage(folder) -> dict:
    """Bytes in an exported folder's safetensors file(s), read from their headers: per quantized-tensor kind
    (qweight/qzeros/scales/g_idx), the other tensors (by name), and the number of quantized linears."""
    from ..models.memory import safetensors_header

    folder = Path(folder)
    out = {"quantized": dict.fromkeys(TENSOR_NAMES, 0), "other": {}, "linears": 0}
    for path in sorted(folder.glob("*.safetensors")):
        for key, info in safetensors_header(path).items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            leaf = key.rsplit(".", 1)[-1]
            if leaf in TENSOR_NAMES:
                out["quantized"][leaf] += end - start
                out["linears"] += leaf == "qweight"
            else:
                out["other"][key] = end - start
    return out


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


# ---- one word by hand, and the zero points


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
    from ..checkpoint import CheckpointFormatError, encode_zeros, pack_cols

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
    """What AutoGPTQ's packer (qlinear_cuda_old.QuantLinear.pack)
    makes of one word of zero points, restated: it subtracts 1, casts to uint32 (so -1 becomes 0xFFFFFFFF)
    and ORs each field in at its shift, so a zero of 0 sets every bit above its field."""
    word = 0
    for j, z in enumerate(np.asarray(zeros, dtype=np.int64)):
        field_value = (int(z) - 1) & 0xFFFFFFFF  # the float -1 cast to uint32 on x86
        word |= (field_value << (bits * j)) & 0xFFFFFFFF
    return word


def v1_decode(word, bits: int = 4) -> list[int]:
    """A v1 reader's zero points from one qzeros word: (field + 1) & mask (AutoGPTQ cuda_old, GPTQModel)."""
    from ..checkpoint import decode_zeros

    return [int(v) for v in decode_zeros(np.array(unpack_word(word, bits)), bits, "gptq")]


def asym_zero_counts(W, group_sizes=(128, 32), bits_list=(4, 3, 2)) -> list[dict]:
    """How many (row, group) pairs of a real layer get a zero point of 0 on the asymmetric grid: the
    case the v1 format cannot store."""
    from ..engine import QuantConfig, rtn_quantize

    W = np.asarray(W, dtype=np.float64)
    rows = []
    for bits in bits_list:
        for gs in group_sizes:
            z = np.asarray(rtn_quantize(W, QuantConfig(bits=bits, group_size=gs, sym=False)).zeros)
            rows.append({"bits": bits, "group size": gs, "(row, group) pairs": int(z.size),
                         "zero = 0": int((z == 0).sum())})
    return rows


# ---- the reloaded folder


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


# ---- GGUF: one Q4_1 block by hand, and GPTQ's grids in GGUF


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
    from ..engine import QuantConfig, rtn_quantize

    d, m = q["d"].astype(np.float64), q["m"].astype(np.float64)
    ratio = -m / np.where(d == 0, 1.0, d)
    integral = np.abs(ratio - np.round(ratio)) < 1e-3
    W = np.asarray(W, dtype=np.float64)
    Q = rtn_quantize(W, QuantConfig(bits=4, group_size=32, sym=False)).weight
    return {"blocks": int(d.size), "integer_zero_share": float(integral.mean()),
            "rtn_asym_g32_rel_error": float(np.linalg.norm(W - Q) / np.linalg.norm(W))}


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
    root = Path(root) if root else Path(__file__).resolve().parents[2]
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
