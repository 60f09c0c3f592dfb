"""The paper's reference `fasterquant` loop, restated in torch with its quirks, for comparison only.

This is our own restatement of IST-DASLab/gptq `GPTQ.fasterquant` + `Quantizer` as documented in
gptq-anchors.md §1 (step order, float32, cholesky -> cholesky_inverse -> cholesky(upper), stale-W group
parameters, the symmetric 7/15 clip, unstable argsort replaced by a stable one so runs are comparable).
Tests use it to show where our engine equals the reference and where it deliberately differs; the
layer benchmark times it when the original code is not installed. Do not use it to quantize models.
"""

from __future__ import annotations

import torch


def _find_params(x: torch.Tensor, maxq: int, sym: bool):
    # Quantizer.find_params(x, weight=True) with perchannel=True, mse=False.
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
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def reference_fasterquant(W, H, bits=4, groupsize=-1, sym=False, percdamp=0.01, blocksize=128,
                          actorder=False, static_groups=False, dtype=torch.float32):
    """Returns (Q, Losses) like the reference: Q fake-quantized (d_out, d_in), Losses (d_out, d_in)."""
    W = torch.as_tensor(W).to(dtype).clone()
    H = torch.as_tensor(H).to(dtype).clone()
    maxq = 2**bits - 1
    columns = W.shape[1]
    scale, zero = _find_params(W, maxq, sym)  # the per-row grid, before the dead-column fix

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = []
    if static_groups:
        groups = [_find_params(W[:, i : i + groupsize], maxq, sym) for i in range(0, columns, groupsize)]
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
                        scale, zero = _find_params(W[:, (i1 + i) : (i1 + i + groupsize)], maxq, sym)
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
