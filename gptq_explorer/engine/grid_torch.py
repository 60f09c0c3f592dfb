"""The integer grid in torch: grid.py's functions for torch tensors (CPU or CUDA), for the torch path
(gptq_torch.py). Same arithmetic as the NumPy versions, so the codes agree (tests)."""

from __future__ import annotations

import torch

from . import grid as grid_np
from .config import QuantConfig
from .grid import tie_tolerance


def grid_of(w: torch.Tensor, cfg: QuantConfig, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """torch twin of grid.grid_of: (scale, zero) per row of w (rows, cols); dim=0 for w transposed."""
    return grid_params(w, cfg.bits, cfg.sym, dim, cfg.mse_norm, cfg.ternary)


def grid_params(w: torch.Tensor, bits: int, sym: bool, dim: int = 1, mse_norm: float = 0.0,
                 ternary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torch twin of grid.grid_params."""
    xmin = w.amin(dim=dim).clamp(max=0)
    xmax = w.amax(dim=dim).clamp(min=0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = (xmax, xmin) if ternary else _uniform(xmin, xmax, bits, sym)
    if mse_norm > 0:
        scale, zero = _mse_search(w, dim, xmin, xmax, scale, zero, bits, sym, mse_norm, ternary)
    return scale, zero


def _uniform(xmin, xmax, bits: int, sym: bool):
    maxq = 2**bits - 1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def _mse_search(w, dim, xmin, xmax, scale, zero, bits, sym, norm, ternary):
    """torch twin of grid._mse_search (one shrink factor at a time: the candidates' tensors stay in cache).

    On the CPU the same pruning: a row skips a candidate whose clipping of its largest or smallest weight
    alone costs more than its best error so far. On CUDA every row tries every candidate: picking the rows
    would wait for the device 80 times per group, and the GPU is not short of arithmetic."""
    maxq = 2**bits - 1
    best = torch.full_like(scale, float("inf"))
    scale, zero = scale.clone(), zero.clone()
    prune = w.device.type == "cpu"
    if prune:
        w_max, w_min = w.amax(dim=dim), w.amin(dim=dim)
    for i in range(int(grid_np.MSE_MAXSHRINK * grid_np.MSE_GRID)):
        p = 1 - i / grid_np.MSE_GRID
        s1, z1 = (p * xmax, p * xmin) if ternary else _uniform(p * xmin, p * xmax, bits, sym)
        rows, wr = None, w
        if prune:
            t_hi, t_lo = grid_np._clip_ends(s1, z1, maxq, ternary)
            bound = (_norm_power_((w_max - t_hi).clamp_(min=0), norm)
                     + _norm_power_((t_lo - w_min).clamp_(min=0), norm))
            keep = bound <= best * (1 + grid_np.PRUNE_MARGIN)
            if not bool(keep.all()):
                rows = keep.nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                wr = w.index_select(1 - dim, rows)
                s1, z1 = s1[rows], z1[rows]
        s, z = s1.unsqueeze(dim), z1.unsqueeze(dim)
        if ternary:
            _, q = quantize(wr, s, z, maxq, ternary=True)
        else:  # plain rounding, as the reference's search: ties only move the error, not the codes
            q = torch.div(wr, s).round_().add_(z).clamp_(0, maxq).sub_(z).mul_(s)
        err = _norm_power_(q.sub_(wr).abs_(), norm).sum(dim=dim)
        if rows is None:
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
        else:
            better = err < best[rows]
            won = rows[better]
            best[won] = err[better]
            scale[won] = s1[better]
            zero[won] = z1[better]
    return scale, zero


def _norm_power_(e: torch.Tensor, norm: float) -> torch.Tensor:
    """torch twin of grid.norm_power, in place: exp(norm log e) for a fractional norm, e ** norm for a whole
    one."""
    if float(norm).is_integer():
        return e.pow_(norm)
    return e.log_().mul_(norm).exp_()


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """torch twin of grid.round_half_even: float-noise ties snapped to exact ties, then half to even."""
    half = torch.round(2 * x) / 2
    tol = tie_tolerance(torch.finfo(x.dtype).eps)
    x = torch.where((x - half).abs() <= tol * x.abs().clamp(min=1.0), half, x)
    return torch.round(x)


def quantize(w, scale, zero, maxq, ternary: bool = False):
    """(codes, dequantized values) of w; ternary: scale = xmax, zero = xmin (grid.ternary_codes)."""
    if ternary:
        codes = 1.0 + (w > scale / 2).to(w.dtype) - (w < zero / 2).to(w.dtype)
        return codes, torch.where(codes == 2, scale, torch.where(codes == 0, zero, torch.zeros_like(w)))
    codes = torch.clamp(round_half_even(w / scale) + zero, 0, maxq)
    return codes, scale * (codes - zero)
