"""Open a GPTQ checkpoint folder (ours or anyone's): the integer view plus a runnable float model.

A round trip through this loader reproduces the exported weights exactly (tests/test_checkpoint_roundtrip.py).

The model is built from config.json *without* its quantization_config, so transformers does not ask
for optimum/gptqmodel; each quantized linear gets ``fp16(scale) * (code - zero)`` as a float weight, so
``ckpt.model(ids).logits`` works like any transformers model. The codes, scales, zeros and g_idx stay
available per layer in ``ckpt.layers`` for inspection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import CheckpointConfig, LayerSpec, parse_quantization_config
from .export import INDEX_NAME, WEIGHTS_NAME
from .format import TENSOR_NAMES, UnpackedLinear, default_g_idx, read_linear
from .packing import CheckpointFormatError


@dataclass
class QuantizedCheckpoint:
    """A loaded GPTQ checkpoint.

    model     transformers causal LM (eval mode) whose quantized linears hold dequantized float weights
    tokenizer the tokenizer saved beside it, or None
    config    the parsed quantization config (bits, group_size, desc_act, sym, format, dynamic ...)
    layers    module path -> UnpackedLinear (codes/scales/zeros/g_idx in the nn.Linear layout)
    specs     module path -> LayerSpec (bits and group size of that layer after per-layer overrides)
    notes     things a learner should know about this checkpoint (e.g. corrupt v1 zeros)
    """

    model: Any
    tokenizer: Any
    config: CheckpointConfig
    layers: dict[str, UnpackedLinear]
    specs: dict[str, LayerSpec]
    folder: Path
    notes: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.config.format

    def dequantized(self, name: str) -> np.ndarray:
        """The float32 (out, in) weight of one quantized linear, as the model holds it."""
        return self.layers[name].dequantize()


# ------------------------------------------------------------------------ files


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(
            f"{path.name} is not valid JSON ({e}): the checkpoint is damaged or was not copied completely. "
            "Copy the folder again or re-export it."
        ) from None


def _quant_config(folder: Path, config: dict) -> CheckpointConfig:
    if "quantization_config" in config:
        return parse_quantization_config(config["quantization_config"])
    for name in ("quantize_config.json", "quant_config.json"):  # AutoGPTQ's lookup order
        if (folder / name).exists():
            return parse_quantization_config(_read_json(folder / name))
    raise CheckpointFormatError(
        f"{folder} is not a GPTQ checkpoint: config.json has no quantization_config and there is no "
        "quantize_config.json"
    )


def _safetensors_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).exists():
        index = _read_json(folder / INDEX_NAME)
        names = sorted(set((index.get("weight_map") or {}).values()))
        if not names:
            raise CheckpointFormatError(f"{INDEX_NAME} has an empty weight_map")
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise CheckpointFormatError(f"{INDEX_NAME} lists shard(s) that are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / WEIGHTS_NAME).exists():
        return [folder / WEIGHTS_NAME]
    found = sorted(folder.glob("*.safetensors"))  # e.g. AutoGPTQ's gptq_model-4bit-128g.safetensors
    if len(found) == 1:
        return found
    if not found:
        raise CheckpointFormatError(f"{folder} has no {WEIGHTS_NAME} (nor any other .safetensors file)")
    raise CheckpointFormatError(
        f"{folder} has several .safetensors files but no {INDEX_NAME}: {', '.join(p.name for p in found)}"
    )


def _read_tensors(files: list[Path]) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except SafetensorError as e:
            raise CheckpointFormatError(
                f"{path.name} is not a readable safetensors file (truncated?): {e}. The file is damaged or "
                "was not copied completely: copy the folder again or re-export it."
            ) from None
    return tensors


# ------------------------------------------------------------------------ layers


def _quantized_prefixes(tensors: dict) -> list[str]:
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.rsplit(".", 1)[-1] in TENSOR_NAMES})
    for p in prefixes:
        if f"{p}.qweight" not in tensors:
            raise CheckpointFormatError(
                f"missing tensor {p + '.qweight'!r} (the layer has other GPTQ tensors)"
            )
    return prefixes


def _notes(name: str, layer: UnpackedLinear, spec: LayerSpec, cfg: CheckpointConfig) -> list[str]:
    notes = []
    n_zero = int((layer.zeros == 0).sum())
    if cfg.format == "gptq" and n_zero:
        notes.append(
            f"{name}: {n_zero} zero point(s) decode to 0 under the v1 format, which cannot store 0 "
            "(zero-1 = -1): this asymmetric checkpoint was probably corrupted by a v1 packer"
        )
    if spec.sym and not (layer.zeros == 2 ** (spec.bits - 1)).all():
        notes.append(
            f"{name}: sym=True but some zeros differ from {2 ** (spec.bits - 1)} (Marlin would ignore them)"
        )
    if not spec.desc_act or cfg.static_groups:
        gs = spec.group_size
        if not np.array_equal(layer.g_idx, default_g_idx(layer.in_features, gs)):
            notes.append(f"{name}: g_idx is not arange(in) // {gs} although desc_act is off")
    return notes


# ------------------------------------------------------------------------ model


def _build_model(config: dict, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise CheckpointFormatError("config.json has no model_type")
    hf_config = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(hf_config)
    return model.to(dtype).eval()


def load_quantized(folder, *, dtype=None, device="cpu", tokenizer: bool = True) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint folder (v1 "gptq" or "gptq_v2", bits 2/3/4/8, desc_act or not).

    Returns a :class:`QuantizedCheckpoint`; ``.model`` runs in ``dtype`` (float32 by default).
    Malformed folders raise CheckpointFormatError naming the file or tensor at fault.
    """
    import torch

    from ..models.adapters import is_conv1d

    dtype = dtype or torch.float32
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointFormatError(f"{folder} is not a folder")
    if not (folder / "config.json").exists():
        raise CheckpointFormatError(f"{folder} has no config.json")
    config = _read_json(folder / "config.json")
    qcfg = _quant_config(folder, config)
    tensors = _read_tensors(_safetensors_files(folder))

    layers, specs, notes = {}, {}, []
    for prefix in _quantized_prefixes(tensors):
        spec = qcfg.layer(prefix)
        if spec is None:
            raise CheckpointFormatError(f"{prefix} has GPTQ tensors but the config's 'dynamic' excludes it")
        layer = read_linear(tensors, spec.bits, qcfg.format, prefix=prefix, group_size=spec.group_size)
        layers[prefix], specs[prefix] = layer, spec
        notes += _notes(prefix, layer, spec, qcfg)
    if not layers:
        raise CheckpointFormatError(
            f"{folder} has a GPTQ config but no quantized layers (no '*.qweight' tensors)"
        )

    model = _build_model(config, dtype)
    state = {}
    for key, t in tensors.items():
        prefix, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if prefix in layers and leaf in (*TENSOR_NAMES, "bias"):
            continue
        state[key] = t.to(dtype) if t.is_floating_point() else t
    for prefix, layer in layers.items():
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            raise CheckpointFormatError(
                f"the checkpoint quantizes {prefix}, which the {config.get('model_type')} model "
                "built from config.json does not have"
            ) from None
        W = torch.from_numpy(layer.dequantize())
        W = W.t() if is_conv1d(module) else W  # GPT-2 Conv1D stores (in, out)
        if tuple(W.shape) != tuple(module.weight.shape):
            raise CheckpointFormatError(
                f"{prefix}: the checkpoint holds a {layer.out_features}x{layer.in_features} (out x in) "
                f"layer, but the model from config.json expects weight shape {tuple(module.weight.shape)}"
            )
        state[f"{prefix}.weight"] = W.to(dtype)
        if layer.bias is not None:
            state[f"{prefix}.bias"] = torch.from_numpy(layer.bias).to(dtype)

    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise CheckpointFormatError(
            f"the checkpoint has tensors the model does not: {', '.join(sorted(result.unexpected_keys)[:8])}"
        )
    model.tie_weights()
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    params = model.state_dict()
    missing = [k for k in result.missing_keys if params[k].data_ptr() not in loaded]  # tied ones are fine
    if missing:
        raise CheckpointFormatError(f"the checkpoint lacks tensor(s): {', '.join(sorted(missing)[:8])}")
    model.to(device)

    tok = None
    if tokenizer and any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    return QuantizedCheckpoint(
        model=model, tokenizer=tok, config=qcfg, layers=layers, specs=specs, folder=folder, notes=notes
    )
