"""The layer store: captured layers on disk, shared by every process that uses the same cache folder.

The Layer Lab and the Sweeps need a layer's W, its Hessians and its inputs (services.layer_source's
LayerData); capturing them needs torch and the model (hundreds of MB per process, seconds of imports and
forward passes). The store keeps what a capture produced, so that any later process, a visitor's kernel
above all, reads it with NumPy alone: neither torch nor the model. `gptq-explorer prepare` stores the
default layer; whichever process captures another layer (or a layer's second stream, for GPTAQ) adds it.

One folder per key under $GPTQ_EXPLORER_CACHE/layers/, named by the sha256 of the key (a JSON dict of
everything that determines the arrays: services.layer_source.ModelSource.store_key), holding one .npy file
per array and `manifest.json`: the key, each array's shape, dtype and sha256, every file's size and the
caller's metadata (the layer's name, description, its model's structure).

  * Written atomically (models.cache_folders.write_cache_folder): the files go into a temporary sibling
    folder, the manifest last, then one rename puts the folder in place. Two writers of one key: the
    first rename wins and the other's copy is dropped; a reader sees a whole entry or none.
  * Verified on every read: the manifest parses and names this key, every file has its recorded size and
    checksum, every array its shape and dtype. Anything else (a truncated or missing file, other bytes) is
    logged, the entry is deleted and read() answers None, so the caller captures the layer again and stores
    it anew: a damaged entry is never served.
  * Read memory-mapped and read-only: only the pages a process touches count toward its memory, and those
    are the page cache's, shared between processes (the lab touches W and the Hessians, not the inputs).
  * Bounded: after a write the entries used longest ago are deleted while the store is larger than
    $GPTQ_EXPLORER_LAYER_STORE_GB (default 2); 0 turns the store off (nothing read or written).

Torch-free: `gptq-explorer prepare --check` asks it whether the default layer is stored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models.cache_folders import (
    MARKER,
    cache_folder_complete,
    cache_root,
    file_sha256,
    smollm2_cache_dir,
    write_cache_folder,
)
from ..models.catalog import DEFAULT_MODEL
from ..models.load_errors import ModelLoadError

FORMAT = 1  # part of every key: a new layout makes new entries (the old ones age out)
MANIFEST = "manifest.json"
STORE_GB_ENV = "GPTQ_EXPLORER_LAYER_STORE_GB"
DEFAULT_STORE_GB = 2.0
STALE_TMP_S = 3600.0  # a writer's temporary folder this old belongs to a process that died

log = logging.getLogger(__name__)


class Damaged(Exception):
    """An entry that fails verification (the message says how)."""


@dataclass(frozen=True)
class Entry:
    """A verified entry: its arrays (read-only, memory-mapped), the caller's metadata, its folder."""

    arrays: dict[str, np.ndarray]
    meta: dict
    path: Path


def store_root() -> Path:
    return cache_root() / "layers"


def limit_bytes(env=None) -> int:
    """$GPTQ_EXPLORER_LAYER_STORE_GB in bytes (0: the store is off); a value that is not a number is
    ignored with a warning (the default)."""
    env = os.environ if env is None else env
    text = env.get(STORE_GB_ENV, "").strip()
    try:
        gb = float(text) if text else DEFAULT_STORE_GB
    except ValueError:
        log.warning("%s=%r is not a number of GB: using %s", STORE_GB_ENV, text, DEFAULT_STORE_GB)
        gb = DEFAULT_STORE_GB
    return max(int(gb * 1e9), 0)


def enabled() -> bool:
    return limit_bytes() > 0


def canonical(key: dict) -> str:
    """The key as canonical JSON (sorted keys, no spaces; tuples become lists): what names its entry."""
    return json.dumps({"format": FORMAT, **key}, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_path(key: dict) -> Path:
    return store_root() / hashlib.sha256(canonical(key).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# reading and writing


def read(key: dict) -> Entry | None:
    """The verified entry of `key`, or None: no entry, the store off, or a damaged entry (deleted)."""
    if not enabled():
        return None
    folder = entry_path(key)
    if not folder.is_dir():
        return None
    try:
        arrays, meta = _verified(folder, key)
    except Damaged as exc:
        log.warning("layer store: %s is damaged (%s); deleted, the layer will be captured again", folder, exc)
        discard(folder)
        return None
    with contextlib.suppress(OSError):  # marks it used (prune keeps it longest); a read-only store is fine
        os.utime(folder / MANIFEST)
    return Entry(arrays, meta, folder)


def _verified(folder: Path, key: dict) -> tuple[dict[str, np.ndarray], dict]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise Damaged(f"no readable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("key") != json.loads(canonical(key)):
        raise Damaged("its manifest names another key")
    if not cache_folder_complete(folder, MANIFEST):
        raise Damaged("a file is missing or has another size than its manifest records")
    arrays = {}
    for name, spec in manifest.get("arrays", {}).items():
        path = folder / f"{name}.npy"
        try:
            if file_sha256(path) != spec["sha256"]:
                raise Damaged(f"{path.name}: another checksum than its manifest records")
            # mmap_mode cannot map an empty file: a 0-byte array is read (and a header checked) as usual
            arr = np.load(path, mmap_mode="r" if np.prod(spec["shape"]) else None, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise Damaged(f"{path.name}: {exc}") from None
        if list(arr.shape) != list(spec["shape"]) or arr.dtype.str != spec["dtype"]:
            raise Damaged(f"{path.name}: {arr.dtype.str} {arr.shape}, its manifest says "
                          f"{spec['dtype']} {tuple(spec['shape'])}")
        arr = arr.view(np.ndarray)  # a plain read-only array (its mapping stays alive underneath)
        arr.flags.writeable = False
        arrays[name] = arr
    return arrays, dict(manifest.get("meta", {}))


def write(key: dict, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path | None:
    """Store `arrays` (name -> array; names are file names) and `meta` (JSON) under `key`, atomically;
    then keep the store within its size. Returns the entry's folder, or None when the store is off or the
    write failed (a full disk, no permission: logged, never raised; the caller has its data anyway)."""
    if not enabled():
        return None
    folder = entry_path(key)
    if folder.is_dir() and read(key) is not None:  # another process stored it meanwhile
        return folder
    nbytes = sum(np.asarray(a).nbytes for a in arrays.values())

    def fill(tmp: Path) -> dict:
        specs = {}
        for name, a in arrays.items():
            path = tmp / f"{name}.npy"
            a = np.asarray(a)
            np.save(path, a, allow_pickle=False)
            specs[name] = {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": file_sha256(path)}
        return {"key": json.loads(canonical(key)), "arrays": specs, "meta": meta or {}}

    try:
        write_cache_folder(folder, fill, needs=f"about {nbytes / 1e6:.0f} MB", marker=MANIFEST)
    except (OSError, ModelLoadError) as exc:
        log.warning("layer store: could not write %s (%s); the layer stays in this process only", folder, exc)
        return None
    prune(keep=folder)
    return folder


def discard(folder: Path) -> None:
    """Delete an entry: renamed aside first (one step), so no reader finds it half deleted."""
    aside = folder.with_name(f".{folder.name}.discarded-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # gone already (another process discarded or pruned it)
    shutil.rmtree(aside, ignore_errors=True)


def prune(limit: int | None = None, keep: Path | None = None) -> list[Path]:
    """Delete the entries used longest ago (their manifest's time: written or last read) while the store
    is larger than `limit` bytes (default: limit_bytes()); never `keep`. Also clears temporary folders
    left by writers that died. Returns the entries deleted."""
    limit = limit_bytes() if limit is None else limit
    root = store_root()
    if not root.is_dir():
        return []
    entries, now = [], time.time()
    for d in root.iterdir():
        try:
            if d.name.startswith("."):  # a writer's temporary folder, or an entry being discarded
                if now - d.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(d, ignore_errors=True)
                continue
            files = [f.stat() for f in d.iterdir()]
            used = max((f.st_mtime for f in files), default=d.stat().st_mtime)
            with contextlib.suppress(OSError):
                used = (d / MANIFEST).stat().st_mtime
            entries.append((used, sum(f.st_size for f in files), d))
        except OSError:
            continue  # deleted meanwhile
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, d in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and d == keep:
            continue
        discard(d)
        deleted.append(d)
        total -= size
    return deleted


# ---------------------------------------------------------------------------------------------------------
# what identifies a model, a corpus and the software that captured a layer (parts of the key)


def model_identity(name: str) -> str | None:
    """What identifies the files behind a model name, without loading it (None: not on this machine yet,
    e.g. a hub id never downloaded; nothing is stored or read for it). The offline default: the checksum
    of its converted cache's completion marker (a new conversion is a new identity); a local folder: its
    files' names, sizes and modification times; a hub id: the commit of its local snapshot."""
    if name == DEFAULT_MODEL:
        folder = smollm2_cache_dir()
        if not cache_folder_complete(folder):
            return None
        return "converted:" + hashlib.sha256((folder / MARKER).read_bytes()).hexdigest()
    path = Path(name).expanduser()
    if path.is_dir():
        listing = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                         for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        return "folder:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id, no hub library: nothing to identify it by
        return None
    return f"hub:{Path(hit).parent.name}" if isinstance(hit, str) else None


def corpus_identity(corpus: str) -> str:
    """The built-in corpora are read from this Python's standard library (data.corpora: they differ between
    Python versions); a corpus file by its size and modification time."""
    path = Path(corpus).expanduser()
    if path.is_file():
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{corpus}:python {platform.python_version()}"


@functools.lru_cache(maxsize=1)
def software() -> dict[str, str]:
    """The versions a capture's numbers depend on (the forward pass's kernels), read from the installed
    packages' metadata: no import."""
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "none"
    return out
