"""Per-layer quantization configs: the base QuantConfig with overrides {glob pattern: {field: value}} applied,
matched against full module paths and the family-neutral 'blocks.<i>.<name>'."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict

from .adapters import Adapter


def _aliases(adapter: Adapter, name: str, n_blocks: int) -> list[str]:
    """A layer can be named by its full path or by the family-neutral 'blocks.<i>.<rel>' (i may be negative:
    'blocks.-1.*' is the last block)."""
    prefix = adapter.blocks + "."
    rest = name[len(prefix) :]
    i, rel = rest.split(".", 1)
    return [name, f"blocks.{i}.{rel}", f"blocks.{int(i) - n_blocks}.{rel}"]


def layer_configs(names: list[str], cfg, overrides: dict | None, adapter: Adapter, n_blocks: int) -> dict:
    """Module path -> QuantConfig after applying overrides {glob pattern: {field: value}} in order."""
    out = {n: cfg for n in names}
    fields = set(cfg.to_dict()) if hasattr(cfg, "to_dict") else set(asdict(cfg))
    for pattern, change in (overrides or {}).items():
        bad = set(change) - fields
        if bad:
            raise ValueError(
                f"override {pattern!r} has unknown field(s) {sorted(bad)}; allowed: {sorted(fields)}"
            )
        hits = [
            n for n in names if any(fnmatch.fnmatchcase(a, pattern) for a in _aliases(adapter, n, n_blocks))
        ]
        if not hits:
            raise ValueError(
                f"override pattern {pattern!r} matches no quantized layer. Layers look like "
                f"{names[0]!r} or 'blocks.0.{names[0].split('.', len(adapter.blocks.split('.')) + 1)[-1]}'"
                " (glob patterns, e.g. 'blocks.0.*', 'blocks.-1.*', '*.down_proj')."
            )
        for n in hits:
            out[n] = out[n].replace(**change)
    return out
