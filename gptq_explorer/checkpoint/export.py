"""Export a model quantized by the explorer as a standard GPTQ checkpoint folder.

docs/checkpoints.md describes the format and what each loader requires.

The folder holds what transformers' ``save_pretrained`` would write, except that every quantized
linear's ``weight`` is replaced by ``qweight``/``qzeros``/``scales``/``g_idx`` (and ``bias`` in fp16):

    model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    config.json            with "quantization_config"
    quantize_config.json   the same dict (AutoGPTQ, vLLM read this file)
    generation_config.json, tokenizer files (when the model has them)

Every layer is packed in memory and validated before the first byte is written; the folder is
assembled in a temporary sibling and renamed into place, so a failed export leaves nothing behind
that looks like a checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import dynamic_key, quantization_config_dict, tool_version
from .format import check_linear_shape, n_groups, pack_linear, to_numpy, whole_numbers
from .packing import CheckpointFormatError, check_bits

SHARD_BYTES = 2 * 1024**3  # shard when the tensors exceed 2 GB, like save_pretrained's default scale
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # vLLM gptq_marlin (is_gptq_marlin_compatible)


@dataclass
class LoaderSupport:
    """Whether one loader should accept the folder, and why not. ``checked_here`` says whether this
    repository's tests load the folder with that loader; the others follow the loaders' documented rules."""

    loader: str
    ok: bool
    reasons: list[str] = field(default_factory=list)
    checked_here: bool = False
    notes: list[str] = field(default_factory=list)  # caveats even when ok (e.g. which kernel to ask for)

    def line(self) -> str:
        verdict = "yes" if self.ok else "NO"
        how = "tested here" if self.checked_here else "by its documented rules, not run here"
        why = f": {'; '.join(self.reasons)}" if self.reasons else ""
        caveats = "".join(f"; WARNING: {n}" for n in self.notes)
        return f"{self.loader}: {verdict} ({how}){why}{caveats}"


@dataclass
class ExportResult:
    folder: Path
    format: str
    files: list[str]
    n_quantized: int
    total_bytes: int
    quantization_config: dict
    loaders: list[LoaderSupport]
    warnings: list[str] = field(default_factory=list)  # the loaders that should refuse the folder
    notes: list[str] = field(default_factory=list)  # caveats: kernels to avoid, a missing tokenizer

    def summary(self) -> str:
        lines = [
            f"GPTQ checkpoint ({self.format}) written to {self.folder}: "
            f"{self.n_quantized} quantized linears, {self.total_bytes / 1e6:.1f} MB of tensors; "
            f"files: {', '.join(self.files)}"
        ]
        lines += [f"  {s.line()}" for s in self.loaders]
        lines += [f"  WARNING: {n}" for n in self.notes if not any(n in s.notes for s in self.loaders)]
        return "\n".join(lines)


@dataclass
class _Layer:
    name: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    in_features: int
    out_features: int
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray
    bias: Any


# ------------------------------------------------------------------------ gathering


def _check_exportable(name: str, cfg) -> None:
    """The GPTQ format stores scale * (code - zero) per group, applied to the layer's own inputs."""
    if cfg.rotation:
        raise CheckpointFormatError(
            f"{name} was quantized with rotation={cfg.rotation!r}: its codes hold W R^T and the layer must "
            "rotate its input online (R x) before the matmul, which no standard GPTQ loader does. Export "
            "without rotation, or keep the rotated model for evaluation in the explorer")
    if cfg.ternary:
        raise CheckpointFormatError(
            f"{name} is ternary: its values {{xmin, 0, xmax}} are not a uniform grid, and GPTQ checkpoints "
            "store only uniform 2-8 bit grids. Export a 2-bit model instead (bits=2)")


def _gather_layers(qm) -> list[_Layer]:
    from ..models.adapters import get_weight

    layers = []
    for name, res in qm.results.items():
        module = qm.model.get_submodule(name)
        W = get_weight(module)
        out_f, in_f = (int(d) for d in W.shape)
        cfg = res.config
        _check_exportable(name, cfg)
        bits = cfg.bits
        codes = whole_numbers(res.codes, f"{name}: codes")
        zeros = whole_numbers(res.zeros, f"{name}: zeros")
        scales = to_numpy(res.scales).astype(np.float32)
        g_idx = whole_numbers(res.g_idx, f"{name}: g_idx")
        if codes.shape != (out_f, in_f):
            raise CheckpointFormatError(
                f"{name}: codes have shape {codes.shape} but the module's weight is "
                f"(out, in) = {(out_f, in_f)}"
            )
        want = n_groups(in_f, cfg.group_size)
        if scales.shape != (out_f, want):
            raise CheckpointFormatError(
                f"{name}: scales have shape {scales.shape}, expected {(out_f, want)} for group_size "
                f"{cfg.group_size}"
            )
        if cfg.sym and not (zeros == 2 ** (bits - 1)).all():
            # Marlin ignores qzeros and assumes 2**(bits-1) for sym checkpoints (§3.4)
            raise CheckpointFormatError(
                f"{name}: sym=True but some zero points differ from {2 ** (bits - 1)}"
            )
        bias = getattr(module, "bias", None)
        layers.append(
            _Layer(
                name=name,
                bits=bits,
                group_size=cfg.group_size,
                sym=cfg.sym,
                desc_act=cfg.desc_act,
                in_features=in_f,
                out_features=out_f,
                codes=codes,
                scales=scales,
                zeros=zeros,
                g_idx=g_idx,
                bias=None if bias is None else bias.detach().float().cpu().numpy(),
            )
        )
    return layers


def _preflight(layers: list[_Layer], format: str | None) -> str:
    """Refuse anything the format cannot hold, before writing; returns the resolved format."""
    problems = []
    for L in layers:
        try:
            check_bits(L.bits)
            check_linear_shape(L.in_features, L.out_features, L.bits, name=L.name)
        except CheckpointFormatError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointFormatError(
            "cannot export: some layers do not fit the GPTQ checkpoint format (nothing was written):\n  "
            + "\n  ".join(problems)
        )
    all_sym = all(L.sym for L in layers)
    if format is None:
        return "gptq" if all_sym else "gptq_v2"
    if format not in ("gptq", "gptq_v2"):
        raise CheckpointFormatError(f"unknown checkpoint format {format!r}: expected 'gptq' or 'gptq_v2'")
    if format == "gptq":
        bad = [(L.name, int((L.zeros == 0).sum())) for L in layers if (L.zeros == 0).any()]
        if bad:
            where = ", ".join(f"{n} ({k} groups)" for n, k in bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise CheckpointFormatError(
                "cannot export as format='gptq': the classic v1 format stores zero-1, and these asymmetric "
                f"layers have zero points of 0: {where}. A v1 loader would read them back as a wrong zero "
                "(AutoGPTQ's packer even corrupts the neighbouring fields). Use format='gptq_v2' (exact "
                "zeros; read by GPTQModel, transformers+gptqmodel and recent vLLM), or leave format unset. "
                "Nothing was written."
            )
    return format


# ------------------------------------------------------------------------ loaders


# Measured with GPTQModel 7.6.0 on the CPU (tests/test_checkpoint_outside_loader.py): backend="auto" picks
# ATen's int4 kernel for 4-bit g32/64/128, which needs in_features % group_size == 0 and crashes in the
# first forward on a shorter last group; for 4-bit per-row it picks TorchFusedLinear, which fails unless
# in_features is one of these. backend="gptq_torch" (TorchLinear) loads every case.
GPTQMODEL_FUSED_IN_FEATURES = (32, 64, 128, 256)
GPTQMODEL_SHORT_GROUP_ERROR = "expect K to be divisible by qGroupSize"


def _gptqmodel_kernel_note(layers: list[_Layer]) -> str | None:
    """Why GPTQModel's default CPU kernel would fail on this folder, or None."""
    four = [L for L in layers if L.bits == 4]
    ragged = [L for L in four if L.group_size != -1 and L.in_features % L.group_size]
    per_row = [L for L in four if L.group_size == -1 and L.in_features not in GPTQMODEL_FUSED_IN_FEATURES]
    if ragged:
        L = ragged[0]
        return (
            f"GPTQModel's default CPU kernel (backend=\"auto\": ATen int4) crashes in the first forward on a "
            f"shorter last group ({L.name}: in={L.in_features} with g{L.group_size} leaves "
            f"{L.in_features % L.group_size}; \"{GPTQMODEL_SHORT_GROUP_ERROR}\"): load with "
            f"backend=\"gptq_torch\" (measured with GPTQModel 7.6.0)"
        )
    if per_row:
        L = per_row[0]
        return (
            f"GPTQModel's default CPU kernel for 4-bit per-row groups (backend=\"auto\": TorchFusedLinear) "
            f"fails unless in_features is one of {GPTQMODEL_FUSED_IN_FEATURES} "
            f"({L.name}: in={L.in_features}): "
            f"load with backend=\"gptq_torch\" (measured with GPTQModel 7.6.0)"
        )
    return None


NO_TOKENIZER_NOTE = (
    "no tokenizer was saved (the quantized model carried none): transformers, GPTQModel and vLLM look for "
    "tokenizer files in the folder. Copy them from the original model (e.g. "
    "AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(FOLDER)), pass the tokenizer to "
    "quantize_model(..., tokenizer=tok) before saving, or point vLLM at it with --tokenizer ORIGINAL"
)


def loader_support(
    layers: list[_Layer], format: str, has_overrides: bool, has_tokenizer: bool = True
) -> list[LoaderSupport]:
    """Which loaders should accept the folder (§3.6); a list of verdicts with reasons and caveats."""
    not_div = [L for L in layers if L.group_size != -1 and L.in_features % L.group_size]
    bits = sorted({L.bits for L in layers})
    sym = all(L.sym for L in layers)

    out = [LoaderSupport("gptq_explorer.load_quantized", True, checked_here=True)]

    vllm = LoaderSupport("vLLM", True)
    if not_div:
        names = ", ".join(f"{L.name} (in={L.in_features}, g{L.group_size})" for L in not_div[:3])
        vllm.ok = False
        vllm.reasons.append(
            f"vLLM requires in_features % group_size == 0; {len(not_div)} layer(s) end with a shorter group: "
            f"{names}{' ...' if len(not_div) > 3 else ''}"
        )
    if format == "gptq_v2":
        vllm.reasons.append("gptq_v2 (exact zeros) needs a vLLM with PR #26092; older ones misread it")
    marlin = sym and set(bits) <= {4, 8} and all(L.group_size in MARLIN_GROUP_SIZES for L in layers)
    if vllm.ok:
        vllm.reasons.append(
            "Marlin kernel auto-selected (sym 4/8-bit)"
            if marlin
            else "Marlin needs sym 4/8-bit; uses gptq_gemm"
        )
    if has_overrides:
        vllm.reasons.append("per-layer bits/group size come from the 'dynamic' field")
    out.append(vllm)

    kernel = _gptqmodel_kernel_note(layers)
    gm = LoaderSupport("GPTQModel", True, checked_here=True)
    if format == "gptq_v2":
        gm.reasons.append("reads gptq_v2 (exact zeros)")
    if kernel:
        gm.notes.append(kernel)
    out.append(gm)

    hf = LoaderSupport("transformers + optimum + gptqmodel (from_pretrained)", True, checked_here=True)
    if format == "gptq_v2":
        hf.reasons.append("gptq_v2 needs gptqmodel (auto-gptq reads only v1)")
    if has_overrides:
        hf.reasons.append("per-layer overrides rely on gptqmodel reading 'dynamic'")
    if kernel:  # it selects gptqmodel's kernels the same way
        hf.notes.append(
            "it picks the same gptqmodel kernel: pass quantization_config=GPTQConfig(bits=..., "
            "backend=\"gptq_torch\") (see the GPTQModel line)"
        )
    out.append(hf)

    agptq = LoaderSupport("AutoGPTQ (deprecated)", format == "gptq" and not has_overrides)
    if format != "gptq":
        agptq.reasons.append("reads only the v1 'gptq' format")
    if has_overrides:
        agptq.reasons.append("has no per-layer bits")
    out.append(agptq)
    if not has_tokenizer:
        for s in out[1:]:  # our loader works without one (tokenizer=None)
            s.notes.append(NO_TOKENIZER_NOTE)
    return out


def export_notes(loaders: list[LoaderSupport]) -> list[str]:
    """Every caveat once, in loader order (the missing-tokenizer note is shared by several loaders)."""
    out: list[str] = []
    for s in loaders:
        for n in s.notes:
            text = n if n == NO_TOKENIZER_NOTE else f"{s.loader}: {n}"
            if text not in out:
                out.append(text)
    return out


# ------------------------------------------------------------------------ writing


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _write_safetensors(tensors: dict, folder: Path, metadata: dict, shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    total = sum(_tensor_bytes(t) for t in tensors.values())
    if total <= shard_bytes:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
        return [WEIGHTS_NAME]
    shards: list[dict] = [{}]
    size = 0
    for key, t in tensors.items():
        if shards[-1] and size + _tensor_bytes(t) > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += _tensor_bytes(t)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [INDEX_NAME]


def _dedupe_tied(state: dict) -> dict:
    """Keep one copy of tensors that share storage (tied embeddings), the first in state order, as
    transformers does: lm_head.weight is dropped and re-tied from the embedding on load."""
    seen, out = set(), {}
    for key, t in state.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen:
            continue
        seen.add(ptr)
        out[key] = t
    return out


def save_quantized(
    quantized_model,
    folder,
    format: str | None = None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
    warn: bool = True,
) -> ExportResult:
    """Write ``quantized_model`` (a ``QuantizedModel``) as a GPTQ checkpoint folder.

    format: None picks "gptq" when every layer is symmetric and "gptq_v2" otherwise; "gptq" with an
    asymmetric zero of 0 is refused (v1 stores zero-1). Codes are written exactly as the quantizer chose
    them; scales and bias are stored in fp16 (so the reloaded weights are fp16(scale) * (code - zero)).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")

    layers = _gather_layers(quantized_model)
    if not layers:
        raise CheckpointFormatError("the model has no quantized layers to export")
    format = _preflight(layers, format)
    packed = _pack_layers(layers, format)

    qcfg = quantized_model.config
    overrides = _layer_overrides(layers, qcfg)
    qdict = quantization_config_dict(
        bits=qcfg.bits,
        group_size=qcfg.group_size,
        desc_act=qcfg.desc_act,
        sym=qcfg.sym,
        damp_percent=qcfg.damp_percent,
        static_groups=qcfg.static_groups,
        true_sequential=bool(getattr(quantized_model, "true_sequential", True)),
        format=format,
        dynamic=overrides or None,
    )
    loaders = loader_support(
        layers, format, bool(overrides), has_tokenizer=getattr(quantized_model, "tokenizer", None) is not None
    )

    model = quantized_model.model
    tensors = _checkpoint_tensors(model, layers, packed)
    metadata = _metadata(qcfg, format)
    config = model.config.to_dict()
    config["quantization_config"] = qdict
    _write_folder(folder, quantized_model, tensors, metadata, config, qdict, max_shard_bytes)

    msgs = [s.line() for s in loaders if not s.ok]
    result = ExportResult(
        folder=folder,
        format=format,
        files=sorted(os.listdir(folder)),
        n_quantized=len(layers),
        total_bytes=sum(_tensor_bytes(t) for t in tensors.values()),
        quantization_config=qdict,
        loaders=loaders,
        warnings=msgs,
        notes=export_notes(loaders),
    )
    if warn:
        for m in msgs + [n for n in result.notes if not any(n in m for m in msgs)]:
            warnings.warn(f"GPTQ export {folder}: {m}", stacklevel=2)
    return result


def _pack_layers(layers: list[_Layer], format: str) -> dict[str, dict]:
    """Every layer's checkpoint tensors, by name; packing validates codes/zeros/g_idx ranges, so this runs
    before anything is written."""
    packed = {}
    for L in layers:
        try:
            packed[L.name] = pack_linear(L.codes, L.scales, L.zeros, L.g_idx, L.bits, format, bias=L.bias)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{L.name}: {e} (nothing was written)") from None
    return packed


def _layer_overrides(layers: list[_Layer], qcfg) -> dict:
    """The 'dynamic' field: the full grid of every layer whose grid differs from the model's config."""
    overrides = {}
    for L in layers:
        diff = {
            k: v
            for k, v in (
                ("bits", L.bits),
                ("group_size", L.group_size),
                ("sym", L.sym),
                ("desc_act", L.desc_act),
            )
            if v != getattr(qcfg, k)
        }
        if diff:
            overrides[dynamic_key(L.name)] = {
                "bits": L.bits,
                "group_size": L.group_size,
                "sym": L.sym,
                "desc_act": L.desc_act,
            }
    return overrides


def _checkpoint_tensors(model, layers: list[_Layer], packed: dict[str, dict]) -> dict:
    """The state dict to write, sorted by name: quantized linears replaced, every other tensor unchanged."""
    import torch

    state = _dedupe_tied(dict(model.state_dict()))
    for L in layers:
        state.pop(f"{L.name}.weight", None)
        state.pop(f"{L.name}.bias", None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for name, t in packed.items():
        for k, v in t.items():
            tensors[f"{name}.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
    return dict(sorted(tensors.items()))


def _metadata(qcfg, format: str) -> dict:
    """The safetensors header's metadata (strings only)."""
    return {
        "format": "pt",
        "quantizer": f"gptq_explorer:{tool_version()}",
        "gptq_bits": str(qcfg.bits),
        "gptq_group_size": str(qcfg.group_size),
        "gptq_desc_act": str(qcfg.desc_act),
        "gptq_damp_percent": str(qcfg.damp_percent),
        "gptq_checkpoint_format": format,
        "gptq_quant_method": "gptq",
    }


def _write_folder(
    folder: Path,
    quantized_model,
    tensors: dict,
    metadata: dict,
    config: dict,
    qdict: dict,
    max_shard_bytes: int,
) -> None:
    """Write every file into a temporary sibling, then rename it onto ``folder``; on any failure the temporary
    folder is removed (and a full disk is said so, with the size needed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        _write_safetensors(tensors, tmp, metadata, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qdict, indent=2) + "\n")
        gen = getattr(quantized_model.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        tok = getattr(quantized_model, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(tmp)
        _apply_umask(tmp)
        _move_into_place(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            need = sum(_tensor_bytes(t) for t in tensors.values())
            kept = "the existing folder was kept unchanged" if folder.exists() else "nothing was written"
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device while writing the checkpoint to {folder} (about "
                f"{need / 1e6:.0f} MB of tensors); {kept} and the partial files were removed. Free some disk "
                f"space there, or save to a folder on another disk",
            ) from exc
        raise


def _apply_umask(tmp: Path) -> None:
    """mkdtemp creates a private (0700) folder; give the checkpoint the permissions of a normal save."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished temp folder onto ``folder``; an old folder is swapped out, then deleted."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except BaseException:
        if old is not None:
            os.rename(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
