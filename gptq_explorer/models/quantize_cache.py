"""The on-disk cache of whole-model quantization results (+ Hessians), keyed by sha256 of (model weights,
calibration ids, config, method, overrides): one folder per key with results.safetensors, report.json and,
optionally, hessians.safetensors. Written atomically (a temporary sibling, then one rename); a damaged entry
is removed and recomputed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from .adapters import set_weight
from .quantize_results import LayerReport, QuantizedModel, _result_to_cpu

CACHE_FORMAT = 1  # bump when the cached files change meaning


def _sha_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(
        t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes()
    )


def cache_key(model, calib_ids, cfg, method, true_sequential, overrides) -> str:
    """sha256 over everything that determines the result: the model's weights, the calibration ids, the
    config, the method and the overrides (and the cache format version)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "type": model.config.model_type,
                "cfg": cfg.to_dict(),
                "method": method,
                "true_sequential": bool(true_sequential),
                "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
            },
            sort_keys=True,
        ).encode()
    )
    for name, p in model.state_dict(keep_vars=False).items():
        h.update(name.encode())
        _sha_tensor(h, p)
    h.update(b"no-data" if calib_ids is None else b"data")
    if calib_ids is not None:
        _sha_tensor(h, torch.as_tensor(calib_ids, dtype=torch.long))
    return h.hexdigest()[:32]


_RESULT_FIELDS = ("codes", "scales", "zeros", "g_idx", "perm", "losses")


def _save_cached(qm: QuantizedModel, folder: Path, hessians: dict | None, alias: dict | None) -> None:
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tensors, meta = {}, {}
        for name, r in qm.results.items():
            for f in _RESULT_FIELDS:
                v = getattr(r, f)
                if isinstance(v, torch.Tensor):
                    v = v.to(torch.uint8) if f == "codes" and r.config.bits <= 8 else v
                    tensors[f"{name}::{f}"] = v.contiguous()
            meta[name] = {
                "config": r.config.to_dict(),
                "method": r.method,
                "damp_percent_used": r.damp_percent_used,
            }
        save_file(tensors, str(tmp / "results.safetensors"))
        if hessians:
            save_file({k: v.contiguous() for k, v in hessians.items()}, str(tmp / "hessians.safetensors"))
        info = {
            "format": CACHE_FORMAT,
            "method": qm.method,
            "config": qm.config.to_dict(),
            "true_sequential": qm.true_sequential,
            "overrides": qm.overrides,
            "nsamples": qm.nsamples,
            "seqlen": qm.seqlen,
            "seconds": qm.seconds,
            "timings": qm.timings,
            "memory": qm.memory,
            "results": meta,
            "layers": qm.report_rows(),
            "hessian_alias": alias or {},
        }
        (tmp / "report.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "report.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(qm: QuantizedModel, folder: Path, compact: bool = True) -> bool:
    from safetensors.torch import load_file

    from ..engine import QuantConfig, QuantResult

    if not (folder / "report.json").is_file():
        return False
    try:  # read and check everything before touching the model
        info = json.loads((folder / "report.json").read_text())
        tensors = load_file(str(folder / "results.safetensors"))
        results = {}
        for name, meta in info["results"].items():
            parts = {f: tensors.get(f"{name}::{f}") for f in _RESULT_FIELDS}
            parts["codes"] = parts["codes"].to(torch.uint8 if meta["config"]["bits"] <= 8 else torch.int32)
            res = QuantResult(
                weight=None,
                **parts,
                config=QuantConfig.from_dict(meta["config"]),
                method=meta["method"],
                damp_percent_used=meta["damp_percent_used"],
            )
            res.weight = res.dequantize().to(torch.float32)
            if res.config.rotation:  # codes are in the rotated basis; the layer computes (Q R) x
                from ..engine.gptq import rotation_matrix

                res.rotation = torch.as_tensor(rotation_matrix(res.weight.shape[1], res.config))
                res.weight = res.weight @ res.rotation.to(torch.float32)
            results[name] = res
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in info["layers"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        warnings.warn(f"cache entry {folder} is damaged ({exc}); recomputing it", RuntimeWarning,
                      stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    mods = dict(qm.model.named_modules())
    with torch.no_grad():
        for name, res in results.items():
            set_weight(mods[name], res.weight)
            # one copy of the weight, as after a run
            qm.results[name] = _result_to_cpu(res, mods[name], compact)
    qm.layers = layers
    qm.timings, qm.memory = info.get("timings", {}), info.get("memory", {})
    qm.from_cache = True
    return True


def load_cached_hessians(cache_dir, key: str) -> dict[str, torch.Tensor]:
    """Module path -> Hessian (2/n sum x x^T of its calibration inputs) of a cached run; layers that share
    an input (k, v, q) share one tensor."""
    from safetensors.torch import load_file

    folder = Path(cache_dir) / key
    path = folder / "hessians.safetensors"
    if not path.is_file():
        return {}
    hs = load_file(str(path))
    alias = json.loads((folder / "report.json").read_text()).get("hessian_alias", {})
    hs.update({name: hs[owner] for name, owner in alias.items()})
    return hs
