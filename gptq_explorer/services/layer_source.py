"""Where the Layer Lab's layer comes from: a weight matrix and the inputs it sees.

A layer source gives `LayerData`: W (d_out, d_in) float64 in the nn.Linear layout, calibration inputs
X_calib (tokens, d_in) that build the Hessian H = 2/n X^T X, held-out inputs X_heldout (tokens, d_in) that
measure the output error on text GPTQ never saw, a name and a one-line description.

Two sources:
  * SyntheticSource: correlated Gaussian inputs with a few large "outlier" channels (as real LLM
    activations have) and heavy-tailed weights. Instant, no model: tests, benchmarks, the offline fallback.
  * ModelSource: a real model's sublayer. The model runs over a few calibration windows while
    models.capture.capture_inputs records what the chosen linear receives and stops the forward pass
    there (nothing after that linear runs); the held-out activations come the same way from the corpus'
    evaluation part. Results are cached in memory per (model, block, sublayer, corpus, nsamples, ...).
    The loaded models are cached here too (get_model): the Layer Lab, the Model Lab and the lessons share
    them.

A domain service: it builds on the engine, models and data packages; the dashboards (ui/) and the lessons
use it, never the other way round.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import numpy as np

from ..engine import Hessian
from ..models.capture import Cancelled  # raised when should_cancel() says stop (torch-free to import)
from ..models.catalog import DEFAULT_MODEL

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
ShouldCancel = Callable[[], bool]

SYNTHETIC = "synthetic"  # the model name the Layer Lab uses for the synthetic source


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _never() -> bool:
    return False


def _check_cancel(should_cancel: ShouldCancel) -> None:
    if should_cancel():
        raise Cancelled("cancelled")


@dataclass
class LayerData:
    """One linear layer and its inputs. Unpacks as (W, X_calib, X_heldout, name, description)."""

    W: np.ndarray  # (d_out, d_in) float64
    X_calib: np.ndarray  # (tokens, d_in)
    X_heldout: np.ndarray  # (tokens, d_in)
    name: str
    description: str

    def __post_init__(self) -> None:
        W, Xc, Xh = self.W, self.X_calib, self.X_heldout
        if W.ndim != 2 or Xc.ndim != 2 or Xh.ndim != 2:
            raise ValueError(f"W, X_calib, X_heldout must be 2-D; got {W.shape}, {Xc.shape}, {Xh.shape}")
        if Xc.shape[1] != W.shape[1] or Xh.shape[1] != W.shape[1]:
            raise ValueError(f"inputs must have d_in = {W.shape[1]} columns; got {Xc.shape} and {Xh.shape}")
        for a in (W, Xc, Xh):  # shared through caches: make accidental in-place edits fail loudly
            a.flags.writeable = False

    def __iter__(self):
        return iter((self.W, self.X_calib, self.X_heldout, self.name, self.description))

    @property
    def shape(self) -> tuple[int, int]:
        return self.W.shape

    @functools.cached_property
    def H(self) -> np.ndarray:
        """The layer Hessian 2/n X_calib^T X_calib (n = calibration tokens), from the engine's Hessian."""
        return _read_only_hessian(self.X_calib)

    @functools.cached_property
    def H_heldout(self) -> np.ndarray:
        """2/m X_heldout^T X_heldout: the held-out output MSE of any Q is tr(D H_heldout D^T) / (2 d_out)."""
        return _read_only_hessian(self.X_heldout)


def _read_only_hessian(X: np.ndarray) -> np.ndarray:
    H = Hessian(X.shape[1]).add_batch(X).H
    H.flags.writeable = False  # shared through caches, like the inputs
    return H


@runtime_checkable
class LayerSource(Protocol):
    """Anything with a hashable `key` and a `load` that returns LayerData."""

    @property
    def key(self) -> tuple: ...

    def load(self, progress: Progress | None = None,
             should_cancel: ShouldCancel | None = None) -> LayerData: ...


class KeyedSource:
    """A source dataclass's `key`: (KIND, every field's value), what identifies its LayerData in the caches
    (a field marked metadata={"key": False} changes only how fast it loads)."""

    KIND = ""

    @property
    def key(self) -> tuple:
        return (self.KIND, *(getattr(self, f.name) for f in fields(self) if f.metadata.get("key", True)))


# ---------------------------------------------------------------------------------------------------------
# synthetic


@dataclass(frozen=True)
class SyntheticSource(KeyedSource):
    """A random layer whose inputs look like a transformer's: correlated, with a few outlier channels.

    X = (F M + noise) * channel_scale, with F (tokens, rank) shared latent factors (the correlation), and
    channel_scale log-normal with `n_outliers` channels 6-20x larger (they dominate diag(H), which is what
    makes desc_act matter). W is Student-t (heavy tails, as trained weights are) with per-row scales.
    """

    d_out: int = 576
    d_in: int = 576
    n_calib: int = 2048
    n_heldout: int = 1024
    seed: int = 0
    n_outliers: int = 8
    rank: int = 48
    KIND = "synthetic"

    @property
    def name(self) -> str:
        return f"synthetic {self.d_out}x{self.d_in} (seed {self.seed})"

    def load(self, progress: Progress | None = None, should_cancel: ShouldCancel | None = None) -> LayerData:
        return _synthetic(self)


_SYNTH_CACHE: OrderedDict = OrderedDict()


def _synthetic(src: SyntheticSource) -> LayerData:
    if src.key in _SYNTH_CACHE:
        _SYNTH_CACHE.move_to_end(src.key)
        return _SYNTH_CACHE[src.key]
    for name in ("d_out", "d_in", "n_calib", "n_heldout", "rank"):
        if getattr(src, name) < 1:
            raise ValueError(f"SyntheticSource.{name} must be positive, got {getattr(src, name)}")
    rng = np.random.default_rng(src.seed)
    d_in = src.d_in
    rank = min(src.rank, d_in)
    M = rng.standard_normal((rank, d_in)) / np.sqrt(rank)
    channel = np.exp(0.4 * rng.standard_normal(d_in))
    outliers = rng.choice(d_in, size=min(src.n_outliers, d_in), replace=False)
    channel[outliers] *= rng.uniform(6.0, 20.0, size=outliers.size)

    def inputs(n: int) -> np.ndarray:
        F = rng.standard_normal((n, rank))
        return ((F @ M + 0.5 * rng.standard_normal((n, d_in))) * channel).astype(np.float64)

    X_calib, X_heldout = inputs(src.n_calib), inputs(src.n_heldout)
    row_scale = np.exp(0.25 * rng.standard_normal((src.d_out, 1)))
    W = 0.02 * row_scale * rng.standard_t(df=5, size=(src.d_out, d_in))
    data = LayerData(
        W, X_calib, X_heldout, src.name,
        f"Synthetic {src.d_out}x{d_in} layer: correlated Gaussian inputs ({rank} shared factors), "
        f"{outliers.size} outlier input channels, heavy-tailed weights; {src.n_calib} calibration and "
        f"{src.n_heldout} held-out tokens. Instant, no model needed.",
    )
    _SYNTH_CACHE[src.key] = data
    while len(_SYNTH_CACHE) > 8:
        _SYNTH_CACHE.popitem(last=False)
    return data


SYNTHETIC_BLOCKS = 4  # the Layer Lab offers seeds 0..3 as "blocks" of the synthetic source
SYNTHETIC_SUBLAYERS = ("576x576",)


# ---------------------------------------------------------------------------------------------------------
# a real model


_MODEL_LOCK = threading.RLock()
_MODELS: OrderedDict = OrderedDict()  # model name -> LoadedModel (at most MAX_MODELS kept)
MAX_MODELS = 1
_ACTS_LOCK = threading.RLock()
_CAPTURE_LOCK = threading.Lock()
_ACTS: OrderedDict = OrderedDict()  # ModelSource.key -> LayerData
MAX_CACHED_LAYERS = 6


def models_available() -> bool:
    """True when gptq_explorer.models and gptq_explorer.data import (torch + transformers present)."""
    try:
        from .. import data, models  # noqa: F401
    except Exception:  # pragma: no cover - depends on the installation
        return False
    return True


def curated_models() -> dict[str, str]:
    """Model id -> description, from gptq_explorer.models.CURATED_MODELS ({} if that package is missing)."""
    try:
        from ..models.catalog import CURATED_MODELS
    except Exception:  # pragma: no cover
        return {}
    return dict(CURATED_MODELS)


def get_model(name: str, progress: Progress | None = None):
    """The LoadedModel for a name (cached; loading another model evicts the oldest beyond MAX_MODELS)."""
    progress = progress or _noop_progress
    with _MODEL_LOCK:
        if name in _MODELS:
            _MODELS.move_to_end(name)
            return _MODELS[name]
        from ..models import load_model

        progress(0.02, f"loading model {name} (first time: can take a minute)")
        while len(_MODELS) >= MAX_MODELS:  # free memory before loading the next one
            _MODELS.popitem(last=False)
        lm = load_model(name)
        _MODELS[name] = lm
        return lm


def model_structure(name: str, progress: Progress | None = None) -> tuple[int, list[str]]:
    """(number of blocks, quantizable sublayer names of a block) for a model; loads it if needed."""
    lm = get_model(name, progress)
    adapter = _adapter(lm)
    return len(adapter.get_blocks(lm.model)), adapter.linear_names()


def cached_model_structure(name: str) -> tuple[int, list[str]] | None:
    """model_structure for a model that is loaded already; None (and nothing loaded) otherwise."""
    with _MODEL_LOCK:  # reentrant: held while model_structure finds it, so it cannot be evicted between
        return model_structure(name) if name in _MODELS else None


def _adapter(lm):
    if lm.adapter is None:
        from ..models import get_adapter

        return get_adapter(lm.model)  # raises UnsupportedModelError with the list of supported families
    return lm.adapter


@dataclass(frozen=True)
class ModelSource(KeyedSource):
    """The inputs of one sublayer of a real model, captured (models.capture) on calibration text.

    model: a name load_model accepts (the offline default, a curated hub id, or a local folder);
    block: decoder block index; sublayer: block-relative linear name (e.g. "self_attn.q_proj");
    corpus: "prose" or "code" (gptq_explorer.data); nsamples windows of seqlen tokens calibrate,
    the first heldout_tokens tokens of the corpus' evaluation part measure the held-out error.
    """

    model: str = DEFAULT_MODEL
    block: int = 0
    sublayer: str = "self_attn.q_proj"
    corpus: str = "prose"
    nsamples: int = 16
    seqlen: int = 256
    heldout_tokens: int = 1024
    seed: int = 0
    batch_size: int = field(default=4, metadata={"key": False})  # speed only: not part of the key
    KIND = "model"

    @property
    def name(self) -> str:
        return f"{self.model} block {self.block} {self.sublayer}"

    def load(self, progress: Progress | None = None, should_cancel: ShouldCancel | None = None) -> LayerData:
        progress = progress or _noop_progress
        should_cancel = should_cancel or _never
        data = self.cached()
        if data is not None:
            return data
        # One capture at a time: two forward hooks on one shared module would stop each other's forward
        # pass, and a second caller of the same layer (the app's preload, then the lab) gets the first's.
        while not _CAPTURE_LOCK.acquire(timeout=0.1):
            _check_cancel(should_cancel)
        try:
            data = self.cached()
            if data is None:
                data = self._capture(progress, should_cancel)
                with _ACTS_LOCK:
                    _ACTS[self.key] = data
                    while len(_ACTS) > MAX_CACHED_LAYERS:
                        _ACTS.popitem(last=False)
        finally:
            _CAPTURE_LOCK.release()
        return data

    def cached(self) -> LayerData | None:
        """The layer's data if it was captured already (nothing is loaded)."""
        with _ACTS_LOCK:
            if self.key in _ACTS:
                _ACTS.move_to_end(self.key)
                return _ACTS[self.key]
        return None

    def _capture(self, progress: Progress, should_cancel: ShouldCancel) -> LayerData:
        import torch

        from ..data import calibration_windows, evaluation_ids
        from ..models import get_weight
        from ..models.capture import capture_inputs

        for name in ("nsamples", "seqlen", "heldout_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        lm = get_model(self.model, progress)
        _check_cancel(should_cancel)
        adapter = _adapter(lm)
        blocks = adapter.get_blocks(lm.model)
        if not 0 <= self.block < len(blocks):
            raise ValueError(f"block must be between 0 and {len(blocks) - 1} for {self.model}, "
                             f"got {self.block}")
        names = adapter.linear_names()
        if self.sublayer not in names:
            raise ValueError(f"sublayer must be one of {names} for {self.model}, got {self.sublayer!r}")
        module = adapter.linears(blocks[self.block])[self.sublayer]
        W = get_weight(module).detach().to("cpu", torch.float64).numpy().copy()

        progress(0.1, f"tokenizing calibration text ({self.corpus})")
        calib = calibration_windows(lm.tokenizer, self.corpus, self.nsamples, self.seqlen, self.seed)
        n_eval = max(self.heldout_tokens // self.seqlen, 1) * self.seqlen
        held = evaluation_ids(lm.tokenizer, self.corpus, n_tokens=n_eval).reshape(-1, self.seqlen)
        _check_cancel(should_cancel)
        here = {self.sublayer: module}
        X_calib = capture_inputs(
            lm.model, here, calib, self.batch_size, should_cancel=should_cancel,
            progress=lambda f: progress(0.15 + 0.55 * f, f"calibration inputs: {f:.0%}"))[self.sublayer]
        X_held = capture_inputs(
            lm.model, here, held, self.batch_size, should_cancel=should_cancel,
            progress=lambda f: progress(0.7 + 0.25 * f, f"held-out inputs: {f:.0%}"))[self.sublayer]
        progress(0.97, "done capturing")
        return LayerData(
            W, X_calib, X_held, self.name,
            f"{self.model}, block {self.block}, {self.sublayer} ({W.shape[0]}x{W.shape[1]}): inputs captured "
            f"with a forward hook on {self.nsamples} calibration windows of {self.seqlen} tokens from the "
            f"'{self.corpus}' corpus; held-out: {X_held.shape[0]} tokens of its evaluation part.",
        )


def clear_caches() -> None:
    """Forget cached models and captured activations (frees memory)."""
    with _MODEL_LOCK:
        _MODELS.clear()
    with _ACTS_LOCK:
        _ACTS.clear()
    _SYNTH_CACHE.clear()
