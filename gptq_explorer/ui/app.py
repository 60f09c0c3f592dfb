"""The explorer app that Voila serves (notebooks/explorer.ipynb): one call builds it.

Settings come from the environment so that a workshop server can set them per kernel (voila.json):
GPTQ_EXPLORER_THREADS (torch threads; 1 is often faster on a busy 2-core machine) and
GPTQ_EXPLORER_LOCAL=1 (allow local model folders: never on a public server). The page's query string
carries the Layer Lab's state, so a copied link reopens the same view.
"""

from __future__ import annotations

import os

import torch

from .layer_lab import LayerLab
from .layer_source import ModelSource


def configure_threads() -> int:
    """Apply GPTQ_EXPLORER_THREADS (or OMP_NUM_THREADS) to torch; returns the thread count in use."""
    value = os.environ.get("GPTQ_EXPLORER_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads >= 1:
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def local_mode_from_env() -> bool:
    return os.environ.get("GPTQ_EXPLORER_LOCAL", "0").strip().lower() in ("1", "true", "yes")


def page_query() -> str:
    """The Voila page's query string ('' outside Voila); waits for the visitor in a preheated kernel."""
    if not any(key.startswith("VOILA_") for key in os.environ):
        return ""
    from voila.utils import get_query_string

    return (get_query_string() or "").lstrip("?")


def explorer_app(query: str | None = None, *, local_mode: bool | None = None, source=None) -> LayerLab:
    """The Layer Lab on the offline default model (a synthetic layer shows while the model loads)."""
    configure_threads()
    local = local_mode_from_env() if local_mode is None else local_mode
    query = page_query() if query is None else query
    source = source if source is not None else ModelSource()
    if query:
        return LayerLab.from_query(query, local_mode=local, source=source)
    return LayerLab(source, local_mode=local)
