"""The layer Hessian H = 2/n * sum_t x_t x_t^T, built from the inputs a linear layer sees.

For the layer loss ||W X - Q X||^2 the Hessian with respect to each row of W is 2 X X^T, whatever the
weights are; averaging over tokens keeps its scale independent of the calibration set's size.
GPTQ's result does not depend on that scale (damping is relative); only the OBS losses do.

Normalization: n counts tokens (rows of X), as GPTQModel does. The paper's reference code divides by
the number of *sequences* instead, so its H (and its losses) are seqlen times ours.

GPTAQ (Li et al. 2025, "GPTQv2") also needs the full-precision model's inputs X_fp for the same tokens:
the layer is fitted to W X_fp, not only to W X. Its extra statistic is dXXT = 2/n sum_t (x_fp - x) x^T,
accumulated alongside H (GPTQModel's definition, up to its per-sample count).
"""

from __future__ import annotations

import numpy as np

from ..lazy_torch import is_tensor

# Tokens per accumulation chunk: bounds the float32 copy made from half-precision activations.
CHUNK_TOKENS = 4096


def _tile(d_in: int) -> int:
    """Column tile of the torch path's sum: x^T x is symmetric, so only the tiles on and above the diagonal
    are multiplied (6 of 9 products with 3 tiles); tiles below ~256 columns lose more in matmul speed
    than they save (benchmarks/bench_hessian.py)."""
    return max(256, min(512, d_in // 8))


def _not_finite(bad_tokens: int, tokens: int) -> ValueError:
    return ValueError(
        f"activations contain NaN or Inf in {bad_tokens} of {tokens} tokens; the Hessian needs finite "
        "inputs and this batch was not added. Usually a float16 overflow: run the calibration forward pass "
        "in float32, or drop the samples that produce it."
    )


class Hessian:
    """Running Hessian of one linear layer's inputs.

    h = Hessian(d_in); h.add_batch(X)   # X: (tokens, d_in) or (batch, seq, d_in)
    h.H                                 # (d_in, d_in): 2/n sum x x^T over every token added so far
    h.add_batch(X, X_fp=X_fp)           # also h.dXXT = 2/n sum (x_fp - x) x^T, for GPTAQ

    backend="numpy" accumulates in float64; backend="torch" accumulates in float32 on `device`
    (None = the first batch's device, "auto" = CUDA when available), in chunks of CHUNK_TOKENS rows,
    so no (tokens x d_in) float64 copy is ever made.
    """

    def __init__(self, d_in: int, backend: str = "numpy", device=None):
        if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"d_in must be a positive integer, got {d_in!r}")
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        self.d_in = d_in
        self.backend = backend
        self.n_tokens = 0
        self.device = None
        if device is not None:
            import torch

            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
        self._sum = None  # sum_t x_t x_t^T
        self._dsum = None  # sum_t (x_fp - x)_t x_t^T, when every batch came with X_fp
        self._fp_batches = 0
        self._batches = 0

    def _check(self, X) -> None:
        if X.ndim not in (2, 3) or X.shape[-1] != self.d_in:
            raise ValueError(
                f"X must be (tokens, {self.d_in}) or (batch, seq, {self.d_in}); got shape {tuple(X.shape)}"
            )

    def add_batch(self, X, X_fp=None) -> Hessian:
        """Add the inputs X of a batch of tokens; X_fp (same shape): the same tokens' inputs in the
        full-precision model, for GPTAQ's dXXT. Either every batch has X_fp or none does."""
        self._check(X)
        if X_fp is not None and tuple(X_fp.shape) != tuple(X.shape):
            raise ValueError(f"X_fp must have the shape of X {tuple(X.shape)} (the same tokens in the "
                             f"full-precision model); got {tuple(X_fp.shape)}")
        if self._batches and (X_fp is not None) != (self._fp_batches == self._batches):
            raise ValueError("X_fp was given for some batches and not for others: dXXT needs the "
                             "full-precision inputs of every token in H; pass X_fp with every add_batch, "
                             "or with none")
        if self.backend == "numpy":
            x = self._numpy_rows(X)
            x_fp = None if X_fp is None else self._numpy_rows(X_fp)
            if self._sum is None:
                self._sum = np.zeros((self.d_in, self.d_in), dtype=np.float64)
            if x_fp is not None and self._dsum is None:
                self._dsum = np.zeros((self.d_in, self.d_in), dtype=np.float64)
            for s in range(0, x.shape[0], CHUNK_TOKENS):
                chunk = x[s : s + CHUNK_TOKENS].astype(np.float64)
                self._sum += chunk.T @ chunk
                if x_fp is not None:
                    self._dsum += (x_fp[s : s + CHUNK_TOKENS].astype(np.float64) - chunk).T @ chunk
        else:
            import torch

            x = self._torch_rows(X)
            x_fp = None if X_fp is None else self._torch_rows(X_fp)
            if self._sum is None:
                self.device = self.device or x.device
                self._sum = torch.zeros((self.d_in, self.d_in), dtype=torch.float32, device=self.device)
            if x_fp is not None and self._dsum is None:
                self._dsum = torch.zeros_like(self._sum)
            b = _tile(self.d_in)
            # float32 rows already on the device are used as they are; others are copied chunk by chunk
            same = x.dtype == torch.float32 and x.device == self.device
            step = x.shape[0] if same and x_fp is None else CHUNK_TOKENS
            for s in range(0, x.shape[0], step):
                chunk = x[s : s + step].to(device=self.device, dtype=torch.float32)
                for i in range(0, self.d_in, b):  # the upper triangle, tile row by tile row
                    self._sum[i : i + b, i:].addmm_(chunk[:, i : i + b].T, chunk[:, i:])
                if x_fp is not None:
                    diff = x_fp[s : s + step].to(device=self.device, dtype=torch.float32) - chunk
                    self._dsum.addmm_(diff.T, chunk)
        self.n_tokens += int(np.prod(X.shape[:-1]))
        self._batches += 1
        self._fp_batches += X_fp is not None
        return self

    def _numpy_rows(self, X) -> np.ndarray:
        # Checked before anything is added: a rejected batch leaves the Hessian exactly as it was.
        x = np.asarray(X.detach().cpu() if is_tensor(X) else X).reshape(-1, self.d_in)
        if not np.all(np.isfinite(x)):
            raise _not_finite(int(np.sum(~np.isfinite(x).all(axis=1))), x.shape[0])
        return x

    def _torch_rows(self, X):
        import torch

        x = X if is_tensor(X) else torch.from_numpy(np.asarray(X))
        x = x.detach().reshape(-1, self.d_in)
        # A NaN or Inf anywhere makes the sum NaN or Inf: one cheap pass (an elementwise isfinite costs 20x
        # more); only a non-finite sum, or finite values summing past float32's range, gets the full check.
        if not bool(torch.isfinite(x.sum(dtype=torch.float32))):
            bad_rows = ~torch.isfinite(x).all(dim=1)
            if bool(bad_rows.any()):
                raise _not_finite(int(bad_rows.sum()), x.shape[0])
        return x

    @property
    def H(self):
        if self._sum is None or self.n_tokens == 0:
            raise ValueError("no calibration inputs yet: call add_batch(X) at least once")
        if self.backend == "torch":  # only the tiles on and above the diagonal were summed: mirror them
            import torch

            b = _tile(self.d_in)
            for i in range(0, self.d_in, b):  # exactly symmetric: the upper triangle wins everywhere
                tile = self._sum[i : i + b, i : i + b]
                tile.copy_(torch.triu(tile) + torch.triu(tile, 1).T)
                self._sum[i + b :, i : i + b] = self._sum[i : i + b, i + b :].T
        return self._sum * (2.0 / self.n_tokens)

    @property
    def dXXT(self):
        """GPTAQ's 2/n sum (x_fp - x) x^T (d_in, d_in), from the X_fp given with every batch."""
        if self._dsum is None:
            raise ValueError("no full-precision inputs: dXXT needs add_batch(X, X_fp=X_fp), where X_fp holds "
                             "the same tokens' inputs in the full-precision model")
        return self._dsum * (2.0 / self.n_tokens)

    @property
    def dead_columns(self):
        """Inputs that were zero for every token (diag H == 0)."""
        diag = self.H.diagonal()
        return diag == 0
