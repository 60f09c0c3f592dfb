"""The errors load_model raises; each message names the problem and the fix. Apart from loading.py so that
models/memory.py (which loading.py imports) can raise them too."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .memory import MemoryEstimate


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


class ModelTooLargeError(ModelLoadError):
    """The estimate says the model does not fit in the memory this process may use; nothing was loaded."""

    def __init__(self, msg: str, estimate: MemoryEstimate):
        super().__init__(msg)
        self.estimate = estimate
