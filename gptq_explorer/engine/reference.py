"""The paper's reference `fasterquant` loop, restated in torch with its quirks, for comparison only.

This is our own restatement of IST-DASLab/gptq `GPTQ.fasterquant` + `Quantizer` as documented in
gptq-anchors.md §1 (step order, float32, cholesky -> cholesky_inverse -> cholesky(upper), stale-W group
parameters, the symmetric 7/15 clip, unstable argsort replaced by a stable one so runs are comparable), and
the Quantizer's two other modes: the mse range search (norm 2.4, grid 100, maxshrink 0.8) and trits.
Tests use it to show where our engine equals the reference and where it deliberately differs; the
layer benchmark times it when the original code is not installed. Do not use it to quantize models.
"""

from __future__ import annotations

import torch


def _find_params(x: torch.Tensor, maxq: int, sym: bool, mse: bool = False, norm: float = 2.4, grid: int = 100,
                 maxshrink: float = 0.8):
    # Quantizer.find_params(x, weight=True) with perchannel=True. maxq < 0 is the reference's trits mode
    # (configure(trits=True) sets maxq = -1): scale holds xmax and zero holds xmin, the two non-zero values.
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0], dtype=x.dtype))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0], dtype=x.dtype))
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        tmp = xmin < 0
        if torch.any(tmp):
            xmin[tmp] = -xmax[tmp]  # quirk: rows without a negative entry keep xmin = 0
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    if maxq < 0:
        scale, zero = xmax.clone(), xmin.clone()
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    if mse:
        if maxq < 0:
            # The reference would run its search with scale1 = (xmax1 - xmin1) / -1 < 0 and a rounded
            # zero: values that mean nothing in trits mode. Not restated; refuse rather than invent.
            raise ValueError("the reference's mse search is meaningless with trits (maxq = -1)")
        scale, zero = _mse_search(x, xmin, xmax, scale, zero, maxq, sym, norm, grid, maxshrink)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _mse_search(x, xmin, xmax, scale, zero, maxq, sym, norm, grid, maxshrink):
    # The reference's mse=True loop: shrink the min-max range to p = 1, 1 - 1/grid, ... (int(maxshrink *
    # grid) values; 80 by default, p down to 0.21), quantize the row on each shrunk grid and keep, per row,
    # the first p whose sum |q - x|^norm is strictly below the best so far. Symmetric grids keep their
    # fixed zero (maxq + 1) / 2; asymmetric ones round a new zero for each p. The same float operations
    # in the same order as the reference, so equal inputs give equal choices.
    scale, zero = scale.clone(), zero.clone()
    best = torch.full([x.shape[0]], float("inf"), dtype=x.dtype)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        xmin1 = p * xmin
        xmax1 = p * xmax
        scale1 = (xmax1 - xmin1) / maxq
        zero1 = torch.round(-xmin1 / scale1) if not sym else zero
        q = _quantize(x, scale1.unsqueeze(1), zero1.unsqueeze(1), maxq)
        q -= x
        q.abs_()
        q.pow_(norm)
        err = torch.sum(q, 1)
        tmp = err < best
        if torch.any(tmp):
            best[tmp] = err[tmp]
            scale[tmp] = scale1[tmp]
            zero[tmp] = zero1[tmp]
    return scale, zero


def _quantize(x, scale, zero, maxq):
    if maxq < 0:
        # trits: xmax above xmax / 2, xmin below xmin / 2, else 0 (strict comparisons: a tie goes to 0)
        return (x > scale / 2).to(x.dtype) * scale + (x < zero / 2).to(x.dtype) * zero
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def reference_rtn(W, bits=4, groupsize=-1, sym=False, mse=False, trits=False, norm=2.4, grid=100,
                  maxshrink=0.8, dtype=torch.float32):
    """Round to nearest with the reference's Quantizer, group by group (its llama.py/opt.py --nearest runs
    per row): returns (Q, scale, zero), Q (d_out, d_in) fake-quantized, scale and zero (d_out, n_groups)."""
    W = torch.as_tensor(W).to(dtype).clone()
    maxq = -1 if trits else 2**bits - 1
    width = W.shape[1] if groupsize == -1 else groupsize
    Q, scales, zeros = torch.empty_like(W), [], []
    for s in range(0, W.shape[1], width):
        scale, zero = _find_params(W[:, s : s + width], maxq, sym, mse, norm, grid, maxshrink)
        Q[:, s : s + width] = _quantize(W[:, s : s + width], scale, zero, maxq)
        scales.append(scale)
        zeros.append(zero)
    return Q, torch.cat(scales, 1), torch.cat(zeros, 1)


def reference_fasterquant(W, H, bits=4, groupsize=-1, sym=False, percdamp=0.01, blocksize=128,
                          actorder=False, static_groups=False, dtype=torch.float32, mse=False, trits=False,
                          norm=2.4, grid=100, maxshrink=0.8):
    """Returns (Q, Losses) like the reference: Q fake-quantized (d_out, d_in), Losses (d_out, d_in).

    mse=True is the Quantizer's configure(mse=True, norm, grid, maxshrink): every (scale, zero), per row or
    per group, comes from the shrink search. trits=True is configure(trits=True): three values per row or
    group, {xmin, 0, xmax}; bits is then ignored, as in the reference.
    """
    W = torch.as_tensor(W).to(dtype).clone()
    H = torch.as_tensor(H).to(dtype).clone()
    maxq = -1 if trits else 2**bits - 1

    def find_params(x):
        return _find_params(x, maxq, sym, mse, norm, grid, maxshrink)

    columns = W.shape[1]
    scale, zero = find_params(W)  # the per-row grid, before the dead-column fix

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = []
    if static_groups:
        groups = [find_params(W[:, i : i + groupsize]) for i in range(0, columns, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        # quirk: the global W lacks this block's intra-block updates
                        scale, zero = find_params(W[:, (i1 + i) : (i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[int(idx) // groupsize]
            q = _quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
        Losses = Losses[:, invperm]
    return Q, Losses
