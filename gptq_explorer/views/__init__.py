"""Figures of quantized layers, built from the engine's results or a checkpoint's layers (plotly).

  grid_view   one layer's grid: scales per group, zero-point usage, code histogram, g_idx order
"""
