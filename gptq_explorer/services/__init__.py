"""Domain services the front-ends share (cli.py, ui/, lessons/ sit on these and never import each other):
settings-derived presets, the layer source, the one report builder, the shipped results and the thread
configuration. Each module imports only the layers below it (engine, data, models, metrics, checkpoint)."""
