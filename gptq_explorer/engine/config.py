"""Quantization settings and the result every quantizer returns.

`QuantConfig` holds exactly the knobs of the GPTQ paper's reference code and of the GPTQ checkpoint
format (bits, group_size, sym, damp_percent, desc_act, static_groups), plus the lazy-batch block size.
Bad values fail here, at construction, with a message that names the parameter and its allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..settings import KNOBS, QUANT_KEYS

# Damping is raised x10 after a failed Cholesky factorization, up to this fraction of mean(diag H).
MAX_DAMP_PERCENT = 1.0


def _default(name: str) -> Any:
    return KNOBS[name].default


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one linear layer. Each field is a knob of gptq_explorer.settings (its default, its
    allowed values and its help live there; construction checks every field against its knob).

    bits          2..8 bits per weight; codes are integers in [0, 2**bits - 1].
    group_size    input columns sharing one (scale, zero) per output row; -1 = one group per row.
    sym           symmetric grid: zero = 2**(bits-1) and range [-max|w|, max|w|].
    damp_percent  lambda = damp_percent * mean(diag H) is added to diag H (paper, Step 3).
    desc_act      process columns in order of decreasing diag(H) ("act-order").
    static_groups compute every group's (scale, zero) from the original weights up front.
    block_size    columns per lazy batch update (paper, Step 2). It changes speed, never the result.
    The methods beyond the paper (docs/methods.md):
    mse_norm      > 0: each row's (and group's) range from the reference's MSE grid search with norm p.
    group_aware   GAR order: groups by their largest diag(H), columns inside a group by diag(H).
    gptaq_alpha   > 0: GPTAQ, fitting the full-precision model's inputs too (needs dXXT, see Hessian).
    rotation      "hadamard": quantize W R^T on rotated inputs R x (R from rotation_seed).
    ternary       three values per row and group, {xmin, 0, xmax} (the reference's trits); bits is ignored.
    """

    bits: int = _default("bits")
    group_size: int = _default("group_size")
    sym: bool = _default("sym")
    damp_percent: float = _default("damp_percent")
    desc_act: bool = _default("desc_act")
    static_groups: bool = _default("static_groups")
    block_size: int = _default("block_size")
    mse_norm: float = _default("mse_norm")
    group_aware: bool = _default("group_aware")
    gptaq_alpha: float = _default("gptaq_alpha")
    rotation: str | None = _default("rotation")
    rotation_seed: int = _default("rotation_seed")
    ternary: bool = _default("ternary")

    def __post_init__(self) -> None:
        for name in QUANT_KEYS:
            KNOBS[name].check(getattr(self, name))
        if self.group_aware and self.desc_act:
            raise ValueError("group_aware=True and desc_act=True are two column orders; choose one (GAR "
                             "keeps each group's columns together, desc_act sorts all columns)")
        if self.group_aware and self.group_size == -1:
            raise ValueError("group_aware=True orders groups, and group_size=-1 has none: set a group_size "
                             "such as 128, or use desc_act=True for per-row grids")

    @property
    def maxq(self) -> int:
        """Largest integer code (ternary: 2, the codes of {xmin, 0, xmax})."""
        return 2 if self.ternary else 2**self.bits - 1

    def group_width(self, d_in: int) -> int:
        """Columns per group for a layer with d_in inputs (the last group may be shorter)."""
        return d_in if self.group_size == -1 else self.group_size

    def n_groups(self, d_in: int) -> int:
        width = self.group_width(d_in)
        return -(-d_in // width)

    @classmethod
    def coerce(cls, cfg: Any) -> QuantConfig:
        """The config a quantizer was given: None -> the defaults; anything but a QuantConfig is refused with
        the same kind of message as a bad value."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, cls):
            raise ValueError(f"cfg must be a QuantConfig, e.g. QuantConfig(bits=4, group_size=128), "
                             f"got {cfg!r} ({type(cfg).__name__})")
        return cfg

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    def label(self) -> str:
        """Short human label, e.g. '4-bit g128 sym'."""
        group = "per-row" if self.group_size == -1 else f"g{self.group_size}"
        parts = ["ternary" if self.ternary else f"{self.bits}-bit", group, "sym" if self.sym else "asym"]
        if self.desc_act:
            parts.append("desc_act")
        if self.static_groups:
            parts.append("static")
        if self.group_aware:
            parts.append("GAR")
        if self.mse_norm > 0:
            parts.append(f"MSE p={self.mse_norm:g}")
        if self.gptaq_alpha > 0:
            parts.append(f"GPTAQ a={self.gptaq_alpha:g}")
        if self.rotation:
            parts.append(self.rotation + ("" if self.rotation_seed == 0 else f" seed {self.rotation_seed}"))
        return " ".join(parts)


@dataclass
class QuantResult:
    """A quantized layer, in the nn.Linear layout (d_out, d_in).

    weight[:, j] == scales[:, g] * (codes[:, j] - zeros[:, g]) with g = g_idx[j], exactly (dequantize()).
    Arrays are NumPy or torch, matching what the caller passed in.
    Two methods change that picture. Ternary: codes 0, 1, 2 stand for zeros[:, g] (the negative level),
    0 and scales[:, g] (the positive level), and zeros are floats. Rotation: codes, scales and zeros are
    in the rotated basis and `weight` in the original one, weight == dequantize() @ rotation.

    losses[j] is the OBS loss of original column j: sum over rows of (w - q)^2 / (2 [H_F^-1]_qq),
    the paper's / reference code's definition, in the units of the H that was passed (RTN: None).
    perm is the processing order (perm[p] = original column processed at step p).
    """

    weight: Any
    codes: Any
    scales: Any
    zeros: Any
    g_idx: Any
    perm: Any
    losses: Any
    config: QuantConfig
    method: str
    damp_percent_used: float | None = None
    dead_columns: Any = None
    rotation: Any = None  # R (d_in, d_in) when config.rotation: the layer computes (dequantize() R) x

    @property
    def loss(self) -> float:
        """Total OBS loss of the layer (sum of per-column losses)."""
        if self.losses is None:
            return float("nan")
        return float(self.losses.sum())

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self) -> Any:
        """Rebuild the weights from codes, scales, zeros and g_idx (the checkpoint's view; in the rotated
        basis when the layer was rotated)."""
        idx = self.g_idx
        if self.config.ternary:
            hi, lo, c = self.scales[:, idx], self.zeros[:, idx], self.codes
            return (c == 2) * hi + (c == 0) * lo
        return self.scales[:, idx] * (self.codes - self.zeros[:, idx])
