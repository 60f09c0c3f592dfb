"""Dashboards: the Layer Lab (one layer, animated GPTQ vs RTN). Widgets + plotly, served by Voila."""

from .layer_figure import HEATMAPS
from .layer_lab import DEFAULTS, PRESETS, LabInputError, LayerLab
from .layer_run import Run, compute_run
from .layer_source import LayerData, LayerSource, ModelSource, SyntheticSource

__all__ = ["LayerLab", "LabInputError", "PRESETS", "DEFAULTS", "HEATMAPS", "Run", "compute_run", "LayerData",
           "LayerSource", "ModelSource", "SyntheticSource"]
