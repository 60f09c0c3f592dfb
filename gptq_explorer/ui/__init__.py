"""Dashboards: the Layer Lab (one layer, animated GPTQ vs RTN), the Model Lab (whole model: perplexity,
per-layer error, generations), the Sweeps (config grids) and the app that puts them in tabs. Widgets +
plotly, served by Voila. ModelLab / Sweeps / ExplorerApp import lazily (the Layer Lab is the first view)."""

import sys

# plotly's renderers (the Model Lab and Sweeps charts) import nbformat, which imports jsonschema, which
# imports its optional IRI checker rfc3987_syntax, which builds a Lark grammar at import: 4-5 s of a kernel
# on 2 cores. Nothing in a kernel validates IRIs, so the dashboards skip that checker.
if "jsonschema" not in sys.modules:
    sys.modules.setdefault("rfc3987_syntax", None)  # `import rfc3987_syntax` -> ImportError, which it allows

from .common import InputError
from .layer_figure import HEATMAPS
from .layer_lab import DEFAULTS, LabInputError, LayerLab
from .layer_run import Run, compute_run
from .layer_source import LayerData, LayerSource, ModelSource, SyntheticSource
from .presets import PRESETS

__all__ = ["LayerLab", "LabInputError", "InputError", "PRESETS", "DEFAULTS", "HEATMAPS", "Run", "compute_run",
           "LayerData", "LayerSource", "ModelSource", "SyntheticSource", "ModelLab", "ComputeSettings",
           "Sweeps", "ExplorerApp", "explorer_app"]


def __getattr__(name):
    if name in ("ModelLab", "ComputeSettings"):
        from . import model_lab

        return getattr(model_lab, name)
    if name == "Sweeps":
        from .sweeps import Sweeps

        return Sweeps
    if name in ("ExplorerApp", "explorer_app"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
