"""Dashboards: the Layer Lab (one layer, animated GPTQ vs RTN), the Model Lab (whole model: perplexity,
per-layer error, generations), the Sweeps (config grids) and the app that puts them in tabs. Widgets +
plotly, served by Voila. Every name imports on first use (the Layer Lab is the first view)."""

import sys

from ..lazy import names as _lazy_names

# plotly's renderers (the Model Lab and Sweeps charts) import nbformat, which imports jsonschema, which
# imports its optional IRI checker rfc3987_syntax, which builds a Lark grammar at import: seconds of a
# kernel's start (docs/performance.md). Nothing in a kernel validates IRIs, so the dashboards skip that
# checker.
if "jsonschema" not in sys.modules:
    sys.modules.setdefault("rfc3987_syntax", None)  # `import rfc3987_syntax` -> ImportError, which it allows

# name -> submodule that defines it, imported on first access (so `python -m gptq_explorer.ui.serve` starts
# Voila without loading the dashboards; the kernel imports them)
_LAZY = {
    "InputError": "common", "HEATMAPS": "layer_figure", "DEFAULTS": "layer_lab", "LabInputError": "layer_lab",
    "LayerLab": "layer_lab", "Run": "layer_run", "compute_run": "layer_run",
    # the layer source is a service and the presets are settings ("." + these names is relative to ui)
    "LayerData": ".services.layer_source", "LayerSource": ".services.layer_source",
    "ModelSource": ".services.layer_source", "SyntheticSource": ".services.layer_source",
    "PRESETS": ".settings", "ModelLab": "model_lab", "ComputeSettings": "model_lab", "Sweeps": "sweeps",
    "ExplorerApp": "app", "explorer_app": "app",
}

__all__ = ["LayerLab", "LabInputError", "InputError", "PRESETS", "DEFAULTS", "HEATMAPS", "Run", "compute_run",
           "LayerData", "LayerSource", "ModelSource", "SyntheticSource", "ModelLab", "ComputeSettings",
           "Sweeps", "ExplorerApp", "explorer_app"]


__getattr__ = _lazy_names(__name__, _LAZY)
