"""Will a model fit? An estimate of the memory loading it takes, made BEFORE any weight is read: parameters
counted from safetensors headers (or, without weights, from the architecture in config.json, or from the
hub's safetensors metadata), times bytes per parameter, times MEMORY_FACTOR; against the memory this
process may use (MemAvailable, capped by $GPTQ_EXPLORER_MAX_MODEL_GB). Which folder a model name means
is loading.py's business (loading.estimate_model_memory)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .catalog import DEFAULT_MODEL
from .load_errors import ModelLoadError

# Memory to run a loaded model, as a multiple of its weights: the weights themselves (safetensors are
# memory-mapped, but every page is touched by the first forward pass), plus activations, the Hessians and
# one layer's copies while quantizing. Measured on SmolLM2-135M (fp32): weights 0.54 GB; a 16 x 512
# quantization run peaks ~0.1 GB above them.
MEMORY_FACTOR = 1.25
MEMORY_ENV = "GPTQ_EXPLORER_MAX_MODEL_GB"  # a cap per process, e.g. per Voila kernel on a shared server
_ST_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class MemoryEstimate:
    """What loading a model would take, from its files' headers (no weight is read)."""

    name: str
    parameters: int
    dtype: str  # the dtype it would be loaded in
    bytes_per_parameter: int
    bytes_needed: int  # parameters * bytes_per_parameter * MEMORY_FACTOR
    bytes_available: int
    budget_reason: str  # where bytes_available comes from
    source: str  # how the parameters were counted

    @property
    def fits(self) -> bool:
        return self.bytes_needed <= self.bytes_available

    def message(self) -> str:
        gb = 1e9
        half = ""
        if self.bytes_per_parameter > 2:
            need16 = self.parameters * 2 * MEMORY_FACTOR
            fits16 = need16 <= self.bytes_available
            verdict = " (fits: load_model(..., dtype=torch.bfloat16))." if fits16 else ", still too much."
            half = f" Loading it in bfloat16 would need {need16 / gb:.1f} GB{verdict}"
        return (
            f"'{self.name}' is too large for this machine: {self.parameters / 1e6:,.0f}M parameters x "
            f"{self.bytes_per_parameter} bytes ({self.dtype}) x {MEMORY_FACTOR} for activations and buffers "
            f"= {self.bytes_needed / gb:.1f} GB, but only {self.bytes_available / gb:.1f} GB is available "
            f"({self.budget_reason}). Nothing was loaded.{half} Pick a smaller model (e.g. "
            f"'{DEFAULT_MODEL}'), or use a machine with more memory. (Counted from {self.source}.)"
        )


def memory_budget() -> tuple[int, str]:
    """(bytes this process may use for a model, why): MemAvailable, capped by $GPTQ_EXPLORER_MAX_MODEL_GB."""
    avail, why = None, ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail, why = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            why = "free physical memory"
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            avail, why = 1 << 62, "unknown"
    cap = os.environ.get(MEMORY_ENV, "").strip()
    if cap:
        try:
            cap_bytes = int(float(cap) * 1e9)
        except ValueError:
            raise ModelLoadError(
                f"{MEMORY_ENV}={cap!r} is not a number of gigabytes; set it to e.g. 2.5, or unset it."
            ) from None
        if cap_bytes < avail:
            avail, why = cap_bytes, f"{MEMORY_ENV}={cap}"
    return avail, why


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, offsets): its first bytes only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is not a safetensors file (shorter than 8 bytes): copy it again.")
        n = int.from_bytes(head, "little")
        if n > 100 * 2**20:
            raise ModelLoadError(f"{path} has an implausible header length ({n} bytes): the file is damaged.")
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise ModelLoadError(f"{path} has a damaged header (not JSON): copy/download it again.") from None


def _count_safetensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        for key, entry in safetensors_header(path).items():
            if key != "__metadata__":
                n = 1
                for d in entry.get("shape", []):
                    n *= int(d)
                total += n
    return total


def _count_from_config(folder: Path) -> int:
    """Exact parameter count of the architecture in config.json, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return sum(p.numel() for p in model.parameters())


def _weights_in(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise ModelLoadError(f"{index} is damaged (no weight_map): copy or download it again.") from None
        files = [folder / n for n in names]
        return files if all(f.is_file() for f in files) else []
    return sorted(folder.glob("*.safetensors"))


def estimate_memory(name: str, folder: Path | None, dtype, ask_hub: bool) -> MemoryEstimate | None:
    """The estimate for `name`, counted in `folder` (its safetensors headers, else its config.json) or, with
    no folder and ask_hub, from the hub's safetensors metadata. None when nothing can be counted."""
    params, source = None, ""
    if folder is not None:
        files = _weights_in(folder)
        if files:
            params = _count_safetensors(files)
            source = f"the headers of {len(files)} safetensors file(s) in {folder}"
        elif (folder / "config.json").is_file():
            try:
                params = _count_from_config(folder)
                source = f"the architecture in {folder / 'config.json'}"
            except Exception:  # noqa: BLE001 - an unknown architecture: loading says so itself
                params = None
    elif ask_hub:
        try:
            from huggingface_hub import get_safetensors_metadata

            meta = get_safetensors_metadata(name)
            params = int(sum(meta.parameter_count.values()))
            source = "the safetensors headers on the Hugging Face hub"
        except Exception:  # noqa: BLE001 - unreachable hub, private or missing repo: loading reports it
            params = None
    if not params:
        return None
    per = torch.tensor([], dtype=dtype).element_size()
    avail, why = memory_budget()
    return MemoryEstimate(name=name, parameters=params, dtype=str(dtype).removeprefix("torch."),
                          bytes_per_parameter=per, bytes_needed=int(params * per * MEMORY_FACTOR),
                          bytes_available=avail, budget_reason=why, source=source)

