"""Folders in the explorer's cache (the converted offline model, the Model Lab's results): where they live,
and how they are written so that a half-written one is never used. Torch-free, so that asking whether the
offline model is ready (`gptq-explorer prepare --check`, run by ./run.sh) costs no torch import."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .catalog import DEFAULT_MODEL
from .load_errors import ModelLoadError

MARKER = "gptq_explorer_source.json"  # written last into a cache folder: says where the weights came from


def file_sha256(path: Path) -> str:
    """The file's sha256 (hex), read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_root() -> Path:
    """$GPTQ_EXPLORER_CACHE, or the per-user cache directory."""
    env = os.environ.get("GPTQ_EXPLORER_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("gptq_explorer"))


def smollm2_cache_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL


def offline_model_ready() -> bool:
    """Whether the offline model's converted copy is in the cache, complete (no loading, no conversion)."""
    return cache_folder_complete(smollm2_cache_dir())


def write_cache_folder(target: Path, write, needs: str = "", marker: str = MARKER) -> Path:
    """Build a cache folder atomically. write(tmp) fills a private temporary sibling and returns a dict for
    the completion marker (the file `marker`); the marker (with every file's size) is written last, then one
    rename puts the folder in place. A folder without its marker, or whose files differ in size from what
    the marker lists, is never used (cache_folder_complete). On any failure nothing is left behind; a full
    disk raises ModelLoadError saying where space is needed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        contents = dict(write(tmp) or {})
        contents["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / marker).write_text(json.dumps(contents, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not cache_folder_complete(target, marker):  # not "someone else finished first": a failure
                raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelLoadError(
                f"No space left on the device while writing the cache folder {target} "
                f"({needs + ' needed; ' if needs else ''}nothing was cached, the partial files were "
                "removed). "
                f"Free some disk space there, or point GPTQ_EXPLORER_CACHE at a disk with room."
            ) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_folder_complete(folder: Path, marker: str = MARKER) -> bool:
    """True when the folder's completion marker exists and every file it lists has the recorded size."""
    try:
        contents = json.loads((Path(folder) / marker).read_text())
    except (OSError, ValueError):
        return False
    files = contents.get("files") if isinstance(contents, dict) else None
    if files is None:
        return isinstance(contents, dict)  # a marker from before sizes were recorded
    return all((Path(folder) / n).is_file() and (Path(folder) / n).stat().st_size == size
               for n, size in files.items())
