"""torch on first use. Importing torch is slow (see docs/performance.md); the Layer Lab's first view
(the NumPy stepper on a synthetic layer) needs none of it, and a Voila kernel's start lies on the path to
the first page. So the engine, the metrics and the app import torch inside the functions that use it, and
ask `is_tensor` (which never imports torch: if it is not loaded, nothing can be a tensor) which path an
input takes."""

from __future__ import annotations

import sys


def is_tensor(x) -> bool:
    # getattr: another thread (the app's background model load) may be importing torch right now, and a
    # half-imported module has no Tensor yet; then no tensor exists either
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)
