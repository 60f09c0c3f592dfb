"""The order GPTQ quantizes a layer's columns in, for the NumPy engine, the torch engine and the Layer Lab.

GPTQ's error compensation works best when the columns that matter most (largest diag(H): the inputs
with the most energy) go first, while many columns remain to absorb their error. Two orders do that:

  desc_act ("act-order", the paper's code): every column by diag(H), descending. With groups, a group's
      columns end up scattered, so the checkpoint needs g_idx and inference kernels gather.
  group_aware (GAR, Gafni et al. 2025, as GPTQModel's act_group_aware): groups ordered by their largest
      diag(H), descending; inside each group its columns by diag(H), descending. Groups stay contiguous,
      so g_idx stays i // group_size. A short last group keeps its place at the end, in natural order
      (as GPTQModel does).
Both sorts are stable: ties keep their original order.
"""

from __future__ import annotations

import numpy as np

from .config import QuantConfig


def processing_order(diag: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """perm with perm[p] = the original column processed at step p, from diag(H) (length d_in)."""
    n = diag.shape[0]
    if cfg.desc_act:
        return np.argsort(-diag, kind="stable")
    if not cfg.group_aware:
        return np.arange(n)
    width = cfg.group_width(n)
    full = n // width  # the short last group (if any) is not reordered
    groups = diag[: full * width].reshape(full, width)
    inside = np.argsort(-groups, axis=1, kind="stable")
    by_max = np.argsort(-groups.max(axis=1), kind="stable")
    perm = (inside + width * np.arange(full)[:, None])[by_max].reshape(-1)
    return np.concatenate([perm, np.arange(full * width, n)])


def group_of_steps(perm: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """For GAR: the original group of each processed group (processed group k holds original group
    group_of_steps[k]), so the grids found in processing order can be stored in the original order."""
    width = cfg.group_width(len(perm))
    return perm[::width] // width
