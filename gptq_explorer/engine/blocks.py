"""Where GPTQ's lazy-update blocks start and end (the paper's Step 2), for the NumPy engine, the torch
engine and the Layer Lab alike.

Blocks are `block_size` columns wide, with one more boundary at every group start when the groups' grids
are computed during the loop (dynamic groups). With group_size < block_size the reference takes a group's
(scale, zero) from weights that still lack the updates of the current block, so its result changes with
block_size; starting a block at every group start means a group's grid always comes from fully updated
weights, and the result never depends on block_size.
"""

from __future__ import annotations

from .config import QuantConfig


def dynamic_groups(cfg: QuantConfig) -> bool:
    """True when each group's grid is computed in the column loop, from the updated weights (grouped and
    not static_groups)."""
    return cfg.group_size != -1 and not cfg.static_groups


def block_bounds(n: int, cfg: QuantConfig) -> list[tuple[int, int]]:
    """The lazy-update blocks of a layer with n columns (processing order), as [start, end) pairs."""
    starts = set(range(0, n, cfg.block_size))
    if dynamic_groups(cfg):
        starts |= set(range(0, n, cfg.group_width(n)))  # a group never starts inside a block
    starts = sorted(starts)
    return list(zip(starts, starts[1:] + [n]))
