"""The weights of a few real linears and what they receive, captured in one pass per token set: the inputs
of lessons 4, 5 and 6 (the capture is the package's one, gptq_explorer.models.capture)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.hessian import Hessian


def capture_inputs(lm, names: list[str], ids: torch.Tensor, batch_size: int = 8) -> dict[str, np.ndarray]:
    """What each named linear (full module path) receives when the model runs on `ids` (windows, seqlen):
    {name: (tokens, d_in) float32}. One forward pass per batch, stopped as soon as all of them fired."""
    from ..models import quantizable_modules
    from ..models.capture import capture_inputs as capture

    mods = quantizable_modules(lm.model, lm.adapter)
    missing = [n for n in names if n not in mods]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; names look like 'model.layers.5.self_attn.q_proj'")
    return capture(lm.model, {n: mods[n] for n in names}, ids, batch_size)


def weight_of(lm, name: str) -> np.ndarray:
    """A linear's weight (out, in) as float64 NumPy."""
    from ..models import get_weight, quantizable_modules

    return get_weight(quantizable_modules(lm.model, lm.adapter)[name]).detach().double().numpy().copy()


@dataclass
class RealLayers:
    """Weights of a few real linears and their inputs on calibration and held-out text of one or more
    corpora. H[(name, corpus)] = 2/n X^T X on calibration text; H_heldout[(name, corpus)] likewise on the
    evaluation part (text calibration never sees)."""

    names: list[str]
    W: dict[str, np.ndarray]
    X_calib: dict[tuple[str, str], np.ndarray]
    X_heldout: dict[tuple[str, str], np.ndarray]
    corpora: tuple[str, ...]
    nsamples: int
    seqlen: int
    heldout_tokens: int
    seconds: float = 0.0
    _H: dict = field(default_factory=dict, repr=False)

    def H(self, name: str, corpus: str | None = None) -> np.ndarray:
        return self._hessian("calib", name, corpus or self.corpora[0], self.X_calib)

    def H_heldout(self, name: str, corpus: str | None = None) -> np.ndarray:
        return self._hessian("heldout", name, corpus or self.corpora[0], self.X_heldout)

    def _hessian(self, kind, name, corpus, xs) -> np.ndarray:
        key = (kind, name, corpus)
        if key not in self._H:
            X = xs[(name, corpus)]
            self._H[key] = Hessian(X.shape[1]).add_batch(X).H
        return self._H[key]

    def short(self, name: str) -> str:
        """'model.layers.5.self_attn.q_proj' -> 'block 5 q_proj'."""
        parts = name.split(".")
        i = next(k for k, p in enumerate(parts) if p.isdigit())
        return f"block {parts[i]} {parts[-1]}"

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self.W[name].shape)


def load_real_layers(lm, layers: list[tuple[int, str]], corpora=("prose",), nsamples: int = 16,
                     seqlen: int = 256, heldout_tokens: int = 1024, seed: int = 0) -> RealLayers:
    """Capture the inputs of `layers` ([(block, sublayer)], e.g. (5, "self_attn.q_proj")) on `nsamples`
    calibration windows of `seqlen` tokens and on the first `heldout_tokens` of the evaluation part, for
    each corpus. The forward passes stop at the deepest wanted layer, so early blocks are cheap."""
    from ..data import calibration_windows, evaluation_ids

    t = time.perf_counter()
    names = [f"{lm.adapter.block_prefix(b)}.{s}" for b, s in layers]
    X_calib, X_held = {}, {}
    n_eval = max(heldout_tokens // seqlen, 1) * seqlen
    for corpus in corpora:
        cal = calibration_windows(lm.tokenizer, corpus, nsamples, seqlen, seed)
        held = evaluation_ids(lm.tokenizer, corpus, n_tokens=n_eval).reshape(-1, seqlen)
        for ids, dest in ((cal, X_calib), (held, X_held)):
            for n, X in capture_inputs(lm, names, ids).items():
                dest[(n, corpus)] = X
    W = {n: weight_of(lm, n) for n in names}
    return RealLayers(names, W, X_calib, X_held, tuple(corpora), nsamples, seqlen, n_eval,
                      seconds=time.perf_counter() - t)
