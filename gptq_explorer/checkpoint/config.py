"""The quantization config JSON of a GPTQ checkpoint: write it, and read what others wrote.

docs/checkpoints.md lists the fields each tool writes and what each loader requires.

The same dict goes to ``quantize_config.json`` (AutoGPTQ, vLLM) and to
``config.json["quantization_config"]`` (transformers/optimum, GPTQModel). It carries both the
AutoGPTQ key ``checkpoint_format`` and the GPTQModel/transformers key ``format``. Per-layer
overrides (a layer quantized with other bits or group size) use GPTQModel's ``dynamic`` map:
``{"+:^exact\\.module\\.name$": {"bits": 8, "group_size": 64}}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .packing import FORMATS, SUPPORTED_BITS, CheckpointFormatError

TOOL_NAME = "gptq_explorer"
TOOL_URI = "https://github.com/gptq-explorer/gptq-explorer"


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gptq-explorer")
    except PackageNotFoundError:
        return "unknown"


def dynamic_key(module_name: str) -> str:
    """GPTQModel ``dynamic`` key matching exactly one module ("+:" = quantize with these overrides)."""
    return "+:^" + re.escape(module_name) + "$"


def quantization_config_dict(
    *,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    damp_percent: float,
    static_groups: bool = False,
    true_sequential: bool = True,
    format: str = "gptq",
    version: str | None = None,
    dynamic: dict[str, dict] | None = None,
) -> dict:
    """The dict written to quantize_config.json and config.json["quantization_config"] (§3.5)."""
    if bits not in SUPPORTED_BITS:
        raise CheckpointFormatError(f"unknown bits {bits!r}: expected one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise CheckpointFormatError(f"group_size must be -1 or positive, got {group_size}")
    if format not in FORMATS:
        raise CheckpointFormatError(f"unknown checkpoint format {format!r}: expected one of {FORMATS}")
    version = version or tool_version()
    d = {
        "quant_method": "gptq",
        "bits": int(bits),
        "group_size": int(group_size),
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "damp_percent": float(damp_percent),
        "static_groups": bool(static_groups),
        "true_sequential": bool(true_sequential),
        "checkpoint_format": format,  # AutoGPTQ / vLLM key
        "format": format,  # GPTQModel / transformers key
        "pack_dtype": "int32",
        "lm_head": False,
        # We quantize without GPTQModel's group-aware reordering; it must be off when desc_act is on.
        "act_group_aware": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",  # lets AutoGPTQ find model.safetensors
        "meta": {
            "quantizer": [f"{TOOL_NAME}:{version}"],
            "uri": TOOL_URI,
            "damp_percent": float(damp_percent),
            "static_groups": bool(static_groups),
            "true_sequential": bool(true_sequential),
            "act_group_aware": False,
        },
    }
    if dynamic:
        d["dynamic"] = {k: dict(v) for k, v in dynamic.items()}
    return d


@dataclass
class LayerSpec:
    """What one quantized linear was stored with."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool


@dataclass
class CheckpointConfig:
    """A parsed GPTQ quantization config, from any of the tools in §3.5."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    format: str
    damp_percent: float | None = None
    static_groups: bool = False
    true_sequential: bool = True
    dynamic: dict[str, dict] = field(default_factory=dict)
    quantizer: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def layer(self, module_name: str) -> LayerSpec | None:
        """Spec for ``module_name`` after GPTQModel ``dynamic`` overrides; None when "-:" excludes it."""
        spec = LayerSpec(self.bits, self.group_size, self.sym, self.desc_act)
        for key, over in self.dynamic.items():
            negative = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("+:", "-:") else key
            if re.match(pattern, module_name):
                if negative:
                    return None
                spec = LayerSpec(
                    bits=int(over.get("bits", spec.bits)),
                    group_size=int(over.get("group_size", spec.group_size)),
                    sym=bool(over.get("sym", spec.sym)),
                    desc_act=bool(over.get("desc_act", spec.desc_act)),
                )
                break  # GPTQModel applies the first matching rule
        return spec


def parse_quantization_config(d: dict) -> CheckpointConfig:
    """Read a quantization config written by AutoGPTQ, GPTQModel, optimum or us; precise errors."""
    if not isinstance(d, dict):
        raise CheckpointFormatError(f"quantization config must be a JSON object, got {type(d).__name__}")
    method = d.get("quant_method", "gptq")
    if str(method).lower() != "gptq":
        raise CheckpointFormatError(f"not a GPTQ checkpoint: quant_method is {method!r}")
    bits = d.get("bits", d.get("w_bit"))
    if bits is None:
        raise CheckpointFormatError("quantization config has no 'bits'")
    if bits not in SUPPORTED_BITS:
        raise CheckpointFormatError(
            f"unknown bits {bits!r} in quantization config: expected one of {SUPPORTED_BITS}"
        )
    group_size = d.get("group_size", d.get("q_group_size", -1))
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise CheckpointFormatError(f"group_size must be -1 or a positive integer, got {group_size!r}")
    fmt = d.get("format") or d.get("checkpoint_format") or "gptq"  # missing means v1 (AutoGPTQ)
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise CheckpointFormatError(
            f"checkpoint format {fmt!r} is not supported: only {FORMATS} (marlin and other repacked "
            "formats use a different bit layout)"
        )
    meta = d.get("meta") or {}
    quantizer = meta.get("quantizer", [])
    return CheckpointConfig(
        bits=int(bits),
        group_size=int(group_size),
        desc_act=bool(d.get("desc_act", False)),
        sym=bool(d.get("sym", True)),  # AutoGPTQ's default when the key is missing
        format=fmt,
        damp_percent=d.get("damp_percent", meta.get("damp_percent")),
        static_groups=bool(d.get("static_groups", meta.get("static_groups", False))),
        true_sequential=bool(d.get("true_sequential", meta.get("true_sequential", True))),
        dynamic=dict(d.get("dynamic") or {}),
        quantizer=list(quantizer) if isinstance(quantizer, list) else [str(quantizer)],
        raw=dict(d),
    )
