"""GPTQ's column loop on a GPU: a whole block's columns as one Triton kernel (column_kernel's CUDA twin).

Written as torch ops, a column costs about ten kernel launches (the OBS update, the grid, the rounding with
its tie snapping, the error, the loss); a 4096-column layer is then bound by launches, not arithmetic. But
inside a block the rows of W are independent: column i's error reaches only later columns of the same row.
So one program takes a tile of rows, holds the block's state for them in registers, and runs the block's
columns in order (same steps and symbols as column_kernel's module doc, R form for GPTAQ):

    w_i  = the tile's row i of W1                      (every earlier column's update already applied)
           GPTAQ: + d_i g_i,  g_i = the tile's row i of G1
    c_i, q_i = the codes and values of w_i on the column's grid (ties snapped as grid.round_half_even)
    E[i] = (w_i - q_i) / d_i   (GPTAQ: minus g_i);  loss_i = sum ((w_i - q_i) / d_i)^2 / 2
    then the tile's later columns k > i:  W1[k] -= U1[i, k] E[i]   (GPTAQ also: G1[k] += M1[i, k] w_i)

The CPU's two-level updates (sub-blocks of 16, then a matmul) sum the same terms in another order, so the
results agree up to rounding (the codes exactly in float64 on the CUDA check). Division is IEEE
and contraction into fused multiply-adds is off, as in torch's elementwise ops. Needs triton (it comes with
torch's CUDA builds); `available()` says whether it can run; tests run it in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .grid import tie_tolerance

# Elements of one program's register tile (block columns x rows): 128 x 32 for the default block size.
TILE = 4096


def available(device: torch.device) -> bool:
    """Whether the kernel can run on device: CUDA with triton, or the CPU when this module was imported under
    TRITON_INTERPRET=1 (Triton's interpreter; tests)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        return False
    return triton is not None


if triton is not None:
    @triton.jit
    def _div(a, b):  # IEEE division: div_rn is float32's; float64's plain division is already IEEE
        if a.dtype == tl.float32:
            return tl.math.div_rn(a, b)
        else:
            return a / b

    @triton.jit
    def _block_columns(W, E, Q, C, LP, U, S, Z, GSEL, M, G, rows, tol, maxq, B: tl.constexpr,
                      BB: tl.constexpr, BR: tl.constexpr, TERNARY: tl.constexpr, GPTAQ: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BR + tl.arange(0, BR)
        b = tl.arange(0, BB)
        in_rows = r < rows
        tile = b[:, None] * rows + r[None, :]
        in_tile = (b[:, None] < B) & in_rows[None, :]
        Wt = tl.load(W + tile, mask=in_tile, other=0.0)
        if GPTAQ:
            Gt = tl.load(G + tile, mask=in_tile, other=0.0)
        for i in range(B):  # B constexpr: a block's width (the last may be narrower)
            this = b[:, None] == i
            w = tl.sum(tl.where(this, Wt, 0.0), axis=0)  # row i of the tile: one nonzero term per sum
            d = tl.load(U + i * B + i)
            if GPTAQ:
                g = tl.sum(tl.where(this, Gt, 0.0), axis=0)
                w = w + d * g
                tl.store(W + i * rows + r, w, mask=in_rows)  # the pre-rounding value, for later g's
            j = tl.load(GSEL + i)
            s = tl.load(S + j * rows + r, mask=in_rows, other=1.0)
            z = tl.load(Z + j * rows + r, mask=in_rows, other=0.0)
            if TERNARY:  # scale = xmax, zero = xmin (grid.ternary_codes)
                c = 1.0 + (w > s / 2).to(w.dtype) - (w < z / 2).to(w.dtype)
                q = tl.where(c == 2.0, s, tl.where(c == 0.0, z, 0.0))
            else:
                x = _div(w, s)
                # grid.round_half_even: a value within tol of a half-integer is that half-integer, then
                # half to even. floor(x + 1/2) is exact here: x is either a half-integer or farther than
                # tol (at least an ulp) from one
                half = tl.floor(2.0 * x + 0.5) / 2.0
                x = tl.where(tl.abs(x - half) <= tol * tl.maximum(tl.abs(x), 1.0), half, x)
                n = tl.floor(x + 0.5)
                n = tl.where((n - x == 0.5) & (n - 2.0 * tl.floor(n / 2.0) != 0.0), n - 1.0, n)
                c = tl.minimum(tl.maximum(n + z, 0.0), maxq)
                q = s * (c - z)
            err = _div(w - q, d)
            err = tl.where(in_rows, err, 0.0)
            tl.store(LP + pid * B + i, tl.sum(err * err, axis=0))
            if GPTAQ:
                err = err - g
                u_m = tl.load(M + i * B + b, mask=(b > i) & (b < B), other=0.0)
                Gt = Gt + u_m[:, None] * w[None, :]
            tl.store(C + i * rows + r, c, mask=in_rows)
            tl.store(Q + i * rows + r, q, mask=in_rows)
            tl.store(E + i * rows + r, err, mask=in_rows)
            u = tl.load(U + i * B + b, mask=(b > i) & (b < B), other=0.0)
            Wt = Wt - u[:, None] * err[None, :]


def block_columns(W1, E, Q, C, L, U1, scales, zeros, gsel, maxq: int, ternary: bool, M1=None, G1=None):
    """All of a block's columns (buffers as _ColumnSteps.block's, transposed (columns, rows) and contiguous;
    gsel an int tensor on the device). Writes E, Q, C, L; GPTAQ (M1, G1 given): W1's rows become the
    pre-rounding values. W1 is otherwise left as it was."""
    B, rows = W1.shape
    BB = max(16, 1 << (B - 1).bit_length())
    BR = max(1, min(64, TILE // BB))
    programs = -(-rows // BR)
    partial = torch.empty((programs, B), device=W1.device, dtype=W1.dtype)
    gptaq = M1 is not None
    tol = tie_tolerance(float(torch.finfo(W1.dtype).eps))
    _block_columns[(programs,)](
        W1, E, Q, C, partial, U1.contiguous(), scales.contiguous(), zeros.to(W1.dtype).contiguous(), gsel,
        M1 if gptaq else U1, G1 if gptaq else W1, rows, tol, float(maxq),
        B=B, BB=BB, BR=BR, TERNARY=bool(ternary), GPTAQ=gptaq, enable_fp_fusion=False)
    torch.sum(partial, dim=0, out=L).div_(2)
