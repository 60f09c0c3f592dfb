"""Named presets shared by the Layer Lab, the Model Lab and the app (one place, so a preset means the same
config everywhere). Each is (config values, a sentence on what to look at). The Model Lab uses the keys it
has (bits, group_size, sym, desc_act, damp_percent) and marks which presets ship precomputed results.
"""

from __future__ import annotations

DAMP_EXP = (-3.0, -0.5)  # damp_percent between 10^-3 and 10^-0.5 (0.1% .. 31.6% of mean diag H)
CUSTOM = "(custom)"

_CFG_DEFAULTS = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "sym": True,
                 "static_groups": False, "block_size": 128}
PRESETS: dict[str, tuple[dict, str]] = {
    "4-bit g128 — the default everyone uses": (
        dict(_CFG_DEFAULTS),
        "4 bits, one grid per 128 input columns, symmetric, 1% damping: what most GPTQ checkpoints use. "
        "GPTQ's held-out error is well below RTN's."),
    "3-bit: where RTN collapses": (
        {**_CFG_DEFAULTS, "bits": 3},
        "8 levels per group. RTN's error jumps; GPTQ's compensation keeps much more of the layer's output."),
    "desc_act on vs off": (
        {**_CFG_DEFAULTS, "bits": 3, "group_size": -1, "desc_act": True},
        "Columns with the largest diag(H) (the most-used inputs) go first, while many columns remain to "
        "absorb their error. Toggle desc_act and compare the held-out error and the diag(H) plot."),
    "2-bit per-row: everything breaks": (
        {**_CFG_DEFAULTS, "bits": 2, "group_size": -1},
        "4 levels for a whole row. Both methods lose most of the signal; GPTQ loses less."),
    "8-bit: nearly lossless": (
        {**_CFG_DEFAULTS, "bits": 8, "group_size": -1},
        "256 levels: RTN is already fine and GPTQ has little left to fix."),
    "desc_act + static groups (fast kernels)": (
        {**_CFG_DEFAULTS, "desc_act": True, "static_groups": True},
        "Act-order with grids computed up front from the original weights: the groups stay contiguous in "
        "memory, which is what fast inference kernels want."),
    "Heavy damping (30%)": (
        {**_CFG_DEFAULTS, "bits": 3, "damp_percent": 10 ** DAMP_EXP[1]},
        "Lots of lambda*I makes H^-1 closer to diagonal: the updates shrink and GPTQ drifts towards RTN."),
}
