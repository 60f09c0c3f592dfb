"""Where the Layer Lab's layer comes from: a weight matrix and the inputs it sees.

A layer source gives `LayerData`: W (d_out, d_in) float64 in the nn.Linear layout, calibration inputs
X_calib (tokens, d_in) that build the Hessian H = 2/n X^T X, held-out inputs X_heldout (tokens, d_in) that
measure the output error on text GPTQ never saw, a name and a one-line description.

GPTAQ also needs what the layer sees in the full-precision model. `source.load_pair()` gives LayerData
with both streams for the same tokens: X_calib / X_heldout are the inputs in the *quantized* model (the
layers before this one quantized with UPSTREAM, RTN 4-bit g128), X_calib_fp / X_heldout_fp the inputs in
the full-precision model. `load()` stays what it was (the full-precision model's inputs only), so the
default view pays nothing for the second stream.

Two sources:
  * SyntheticSource: correlated Gaussian inputs with a few large "outlier" channels (as real LLM
    activations have) and heavy-tailed weights. Instant, no model: tests, benchmarks, the offline fallback.
  * ModelSource: a real model's sublayer. The model runs over a few calibration windows while
    models.capture.capture_inputs records what the chosen linear receives and stops the forward pass
    there (nothing after that linear runs); the held-out activations come the same way from the corpus'
    evaluation part. Results are cached in memory per (model, block, sublayer, corpus, nsamples, ...),
    and on disk in the layer store (services.layer_store), which every process reads before it captures:
    a stored layer needs neither torch nor the model (ModelSource.store_key says what identifies it).
    The loaded models are cached here too (get_model): the Layer Lab, the Model Lab and the lessons share
    them. load_pair() runs the model block by block twice from block 0's inputs: through the shared
    full-precision blocks, and through copies of the blocks before the layer's block quantized with
    UPSTREAM (the shared model is never changed), then captures the sublayer's inputs in its block.

A domain service: it builds on the engine, models and data packages; the dashboards (ui/) and the lessons
use it, never the other way round.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import numpy as np

from ..engine import Hessian, QuantConfig, rtn_quantize
from ..models.capture import Cancelled  # raised when should_cancel() says stop (torch-free to import)
from ..models.catalog import DEFAULT_MODEL
from . import layer_store

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)
ShouldCancel = Callable[[], bool]

SYNTHETIC = "synthetic"  # the model name the Layer Lab uses for the synthetic source

log = logging.getLogger(__name__)


def _noop_progress(fraction: float, message: str) -> None:
    pass


def _never() -> bool:
    return False


def _check_cancel(should_cancel: ShouldCancel) -> None:
    if should_cancel():
        raise Cancelled("cancelled")


# What stands for "the quantized model" upstream of a layer in load_pair(): cheap, and the usual 4-bit one
UPSTREAM = {"bits": 4, "group_size": 128}
UPSTREAM_LABEL = "RTN 4-bit g128"


@dataclass
class LayerData:
    """One linear layer and its inputs. Unpacks as (W, X_calib, X_heldout, name, description).

    With the full-precision stream (load_pair()): X_calib_fp / X_heldout_fp are the same tokens' inputs in
    the full-precision model, and X_calib / X_heldout those in the quantized model."""

    W: np.ndarray  # (d_out, d_in) float64
    X_calib: np.ndarray  # (tokens, d_in)
    X_heldout: np.ndarray  # (tokens, d_in)
    name: str
    description: str
    X_calib_fp: np.ndarray | None = None  # (tokens, d_in): the full-precision model's inputs (GPTAQ)
    X_heldout_fp: np.ndarray | None = None

    def __post_init__(self) -> None:
        W, Xc, Xh = self.W, self.X_calib, self.X_heldout
        if W.ndim != 2 or Xc.ndim != 2 or Xh.ndim != 2:
            raise ValueError(f"W, X_calib, X_heldout must be 2-D; got {W.shape}, {Xc.shape}, {Xh.shape}")
        if Xc.shape[1] != W.shape[1] or Xh.shape[1] != W.shape[1]:
            raise ValueError(f"inputs must have d_in = {W.shape[1]} columns; got {Xc.shape} and {Xh.shape}")
        if (self.X_calib_fp is None) != (self.X_heldout_fp is None):
            raise ValueError("give both X_calib_fp and X_heldout_fp (the full-precision stream), or neither")
        fp = self.X_calib_fp, self.X_heldout_fp
        if fp[0] is not None and (fp[0].shape != Xc.shape or fp[1].shape != Xh.shape):
            raise ValueError(f"the full-precision inputs must have the shapes of X_calib {Xc.shape} and "
                             f"X_heldout {Xh.shape}; got {fp[0].shape} and {fp[1].shape}")
        for a in (W, Xc, Xh, *fp):  # shared through caches: make accidental in-place edits fail loudly
            if a is not None:
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

    @property
    def has_fp(self) -> bool:
        """Whether the full-precision stream is here (GPTAQ can run)."""
        return self.X_calib_fp is not None

    @functools.cached_property
    def dXXT(self) -> np.ndarray:
        """GPTAQ's 2/n sum (x_fp - x) x^T over the calibration tokens (the engine's Hessian.dXXT)."""
        if not self.has_fp:
            raise ValueError(f"{self.name}: no full-precision inputs; GPTAQ needs source.load_pair()")
        d = Hessian(self.X_calib.shape[1]).add_batch(self.X_calib, X_fp=self.X_calib_fp).dXXT
        d.flags.writeable = False
        return d

    @functools.cached_property
    def Y_heldout_fp(self) -> np.ndarray:
        """The full-precision model's output of this layer on the held-out tokens, X_heldout_fp W^T."""
        X = self.X_heldout_fp if self.has_fp else self.X_heldout
        Y = np.asarray(X, dtype=np.float64) @ self.W.T
        Y.flags.writeable = False
        return Y

    def heldout_fp_mse(self, Q: np.ndarray) -> float:
        """||X_heldout_fp W^T - X_heldout Q^T||^2 / (tokens d_out): how far the layer, quantized and fed the
        quantized model's inputs, is from the full-precision model's output. Without the full-precision
        stream it is the plain held-out output MSE."""
        E = self.Y_heldout_fp - np.asarray(self.X_heldout, dtype=np.float64) @ np.asarray(Q).T
        return float(np.mean(E * E))


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
        return (self.KIND, *self.key_fields().values())

    def key_fields(self) -> dict:
        """The key's fields by name, {"model": ..., "block": ...}."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("key", True)}


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

    def load_pair(self, progress: Progress | None = None, should_cancel: ShouldCancel | None = None
                  ) -> LayerData:
        """The layer with both streams (see _synthetic_pair): X_calib_fp is load()'s X_calib."""
        return _synthetic_pair(self)


_SYNTH_CACHE: OrderedDict = OrderedDict()


def _cache_synthetic(key: tuple, data: LayerData) -> LayerData:
    _SYNTH_CACHE[key] = data
    while len(_SYNTH_CACHE) > 8:
        _SYNTH_CACHE.popitem(last=False)
    return data


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
    return _cache_synthetic(src.key, data)


def _synthetic_pair(src: SyntheticSource) -> LayerData:
    """The synthetic layer as the quantized model would feed it. Its full-precision inputs X are load()'s;
    they come out of an upstream layer X = Z A^T (A a random orthogonal matrix, so Z = X A), and the
    quantized model's upstream layer is RTN(A) (UPSTREAM): X_q = Z RTN(A)^T = X + X A (RTN(A) - A)^T.
    The perturbation is structured (a linear function of X, as a real upstream layer's error is), not
    independent noise; it is about 10% of X. Deterministic in the seed."""
    key = (*src.key, "pair")
    if key in _SYNTH_CACHE:
        _SYNTH_CACHE.move_to_end(key)
        return _SYNTH_CACHE[key]
    fp = _synthetic(src)
    d_in = src.d_in
    rng = np.random.default_rng((src.seed, 1))  # a stream of its own: load()'s data stays as it was
    A, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
    E = rtn_quantize(A, QuantConfig(**UPSTREAM)).weight - A

    def quantized(X: np.ndarray) -> np.ndarray:
        return X + (X @ A) @ E.T

    X_calib, X_heldout = quantized(fp.X_calib), quantized(fp.X_heldout)
    rel = np.linalg.norm(X_calib - fp.X_calib) / np.linalg.norm(fp.X_calib)
    data = LayerData(
        fp.W, X_calib, X_heldout, fp.name,
        f"{fp.description} Quantized model's inputs: an upstream layer's {UPSTREAM_LABEL} error, "
        f"{rel:.0%} of the inputs (X_q = X + X A (RTN(A) - A)^T, A random orthogonal).",
        X_calib_fp=fp.X_calib, X_heldout_fp=fp.X_heldout)
    return _cache_synthetic(key, data)


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
_STRUCTURES: dict = {}  # model name -> (blocks, sublayers), from the layer store: no model loaded


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
    """(number of blocks, quantizable sublayer names of a block) for a model: of the loaded model, else as
    a stored layer of it recorded it, else the model is loaded."""
    with _MODEL_LOCK:
        if name not in _MODELS and name in _STRUCTURES:
            n_blocks, subs = _STRUCTURES[name]
            return n_blocks, list(subs)
    lm = get_model(name, progress)
    adapter = _adapter(lm)
    return len(adapter.get_blocks(lm.model)), adapter.linear_names()


def cached_model_structure(name: str) -> tuple[int, list[str]] | None:
    """model_structure for a model that is loaded already or whose layer came from the store; None (and
    nothing loaded) otherwise."""
    with _MODEL_LOCK:  # reentrant: held while model_structure finds it, so it cannot be evicted between
        return model_structure(name) if name in _MODELS or name in _STRUCTURES else None


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
        return self._load(self.key, self._capture, progress, should_cancel)

    def load_pair(self, progress: Progress | None = None, should_cancel: ShouldCancel | None = None
                  ) -> LayerData:
        """The layer with both streams: the quantized model's inputs (the blocks before this one quantized
        with UPSTREAM) and the full-precision model's, for the same tokens (see the module doc)."""
        return self._load(self.pair_key, self._capture_pair, progress, should_cancel)

    @property
    def pair_key(self) -> tuple:
        return (*self.key, "pair")

    def _load(self, key: tuple, capture, progress: Progress | None, should_cancel: ShouldCancel | None
              ) -> LayerData:
        progress = progress or _noop_progress
        should_cancel = should_cancel or _never
        pair = key == self.pair_key
        data = _cached(key) or self._from_store(pair)
        if data is not None:
            return data
        # One capture at a time: two forward hooks on one shared module would stop each other's forward
        # pass, and a second caller of the same layer (the app's preload, then the lab) gets the first's.
        while not _CAPTURE_LOCK.acquire(timeout=0.1):
            _check_cancel(should_cancel)
        try:
            data = _cached(key)
            if data is None:
                data = _remember(key, capture(progress, should_cancel))
                progress(0.98, "storing the layer for the next visitors")
                self._to_store(pair, data)
        finally:
            _CAPTURE_LOCK.release()
        return data

    def cached(self) -> LayerData | None:
        """The layer's data if it was captured already, here or into the layer store (nothing is loaded:
        a stored layer is read with NumPy alone)."""
        return _cached(self.key) or self._from_store(pair=False)

    def cached_pair(self) -> LayerData | None:
        """load_pair()'s data if it was captured already, here or into the layer store (nothing loaded)."""
        return _cached(self.pair_key) or self._from_store(pair=True)

    # -- the layer store (services.layer_store) ----------------------------------------------------------

    def store_key(self, pair: bool = False) -> dict | None:
        """Everything that determines the captured arrays: this source's key fields, what identifies the
        model's files, the corpus' text and the capturing software; for load_pair() the upstream
        quantization too. None when the model is not on this machine (nothing is stored or read)."""
        identity = layer_store.model_identity(self.model)
        if identity is None:
            return None
        key = {"source": self.KIND, **self.key_fields(), "model_identity": identity,
               "corpus_identity": layer_store.corpus_identity(self.corpus), **layer_store.software()}
        if pair:
            key["upstream"] = dict(UPSTREAM)
        return key

    def _from_store(self, pair: bool) -> LayerData | None:
        """The stored layer, put in the memory cache; None when it is not stored (or was damaged)."""
        key = self.store_key(pair) if layer_store.enabled() else None
        entry = layer_store.read(key) if key is not None else None
        if entry is None:
            return None
        a, meta = entry.arrays, entry.meta
        data = LayerData(a["W"], a["X_calib"], a["X_heldout"], meta["name"], meta["description"],
                         X_calib_fp=a.get("X_calib_fp"), X_heldout_fp=a.get("X_heldout_fp"))
        # the stored Hessians fill the cached properties, so the inputs' pages are never read for them
        data.__dict__.update(H=a["H"], H_heldout=a["H_heldout"])
        if "structure" in meta:
            with _MODEL_LOCK:
                _STRUCTURES[self.model] = (int(meta["structure"][0]), list(meta["structure"][1]))
        return _remember(self.pair_key if pair else self.key, data)

    def _to_store(self, pair: bool, data: LayerData) -> None:
        """Store a layer just captured (the model is loaded: its structure costs nothing). Never raises:
        the layer is in memory anyway."""
        try:
            key = self.store_key(pair) if layer_store.enabled() else None
            if key is None:
                return
            arrays = {"W": data.W, "X_calib": data.X_calib, "X_heldout": data.X_heldout,
                      "H": data.H, "H_heldout": data.H_heldout}
            if data.has_fp:
                arrays.update(X_calib_fp=data.X_calib_fp, X_heldout_fp=data.X_heldout_fp)
            n_blocks, subs = model_structure(self.model)
            meta = {"name": data.name, "description": data.description, "structure": [n_blocks, subs]}
            layer_store.write(key, arrays, meta)
        except Exception as exc:  # noqa: BLE001 - storing is an optimisation for later processes
            log.warning("could not store %s in the layer store: %s", self.name, exc)

    def _prepare(self, progress: Progress, should_cancel: ShouldCancel):
        """(loaded model, adapter, blocks, the linear, W float64, calibration ids, held-out ids)."""
        import torch

        from ..data import calibration_windows, evaluation_ids
        from ..models import get_weight

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
        return lm, adapter, blocks, module, W, calib, held

    def _capture(self, progress: Progress, should_cancel: ShouldCancel) -> LayerData:
        from ..models.capture import capture_inputs

        lm, _adapter_, _blocks, module, W, calib, held = self._prepare(progress, should_cancel)
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


    def _capture_pair(self, progress: Progress, should_cancel: ShouldCancel) -> LayerData:
        lm, adapter, blocks, module, W, calib, held = self._prepare(progress, should_cancel)

        def both(ids, start: float, what: str):
            def step(f: float) -> None:
                progress(start + 0.4 * f, f"{what} inputs in both models: {f:.0%}")

            return _two_streams(lm.model, adapter, blocks, self.block, module, ids, self.batch_size,
                                should_cancel, step)

        X_fp, X_q = both(calib, 0.15, "calibration")
        H_fp, H_q = both(held, 0.55, "held-out")
        progress(0.97, "done capturing")
        before = ("no block before it: both models feed it the same inputs, so GPTAQ is GPTQ here"
                  if self.block == 0 else
                  f"block{'s 0-' if self.block > 1 else ' '}{self.block - 1} quantized with {UPSTREAM_LABEL}")
        return LayerData(
            W, X_q, H_q, self.name,
            f"{self.model}, block {self.block}, {self.sublayer} ({W.shape[0]}x{W.shape[1]}): the quantized "
            f"model's inputs ({before}) and the full-precision model's, for the same {self.nsamples} "
            f"calibration windows of {self.seqlen} tokens ('{self.corpus}') and {H_q.shape[0]} held-out "
            "tokens.",
            X_calib_fp=X_fp, X_heldout_fp=H_fp)


def _cached(key: tuple) -> LayerData | None:
    with _ACTS_LOCK:
        if key in _ACTS:
            _ACTS.move_to_end(key)
            return _ACTS[key]
    return None


def _remember(key: tuple, data: LayerData) -> LayerData:
    """Put data in the memory cache; one already there (another thread read the store too) wins, so every
    caller gets the same object."""
    with _ACTS_LOCK:
        if key in _ACTS:
            _ACTS.move_to_end(key)
            return _ACTS[key]
        _ACTS[key] = data
        while len(_ACTS) > MAX_CACHED_LAYERS:
            _ACTS.popitem(last=False)
    return data


def _two_streams(model, adapter, blocks, block: int, module, ids, batch_size: int,
                 should_cancel: ShouldCancel, progress: Callable[[float], None]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """What `module` (a linear of blocks[block]) receives on token windows `ids`, (full-precision model's,
    quantized model's). Both streams start from block 0's inputs and run block by block, the same way
    (so they are equal where nothing differs, bit for bit): through the shared blocks, and through copies
    of the blocks before `block` with their linears rounded (UPSTREAM). The shared model is never changed."""
    import copy

    import torch

    from ..models import BlockInputs, catch_block_inputs, get_weight, run_blocks, set_weight
    from ..models.capture import StopForward, hooks, run_until_stopped

    caught = catch_block_inputs(model, ids, adapter, batch_size=batch_size)
    fp, q = caught.hidden, caught.hidden
    for i in range(block):
        _check_cancel(should_cancel)
        fp = run_blocks([blocks[i]], BlockInputs(fp, caught.args, caught.kwargs), batch_size)
        rounded = copy.deepcopy(blocks[i])
        for mod in adapter.linears(rounded).values():
            w = get_weight(mod).detach().to(torch.float32)
            set_weight(mod, rtn_quantize(w, QuantConfig(**UPSTREAM)).weight)
        q = run_blocks([rounded], BlockInputs(q, caught.args, caught.kwargs), batch_size)
        del rounded
        progress(0.9 * (i + 1) / max(block, 1))

    def inputs_of(hidden) -> np.ndarray:
        rows = []

        def record(call):
            x = call.input.detach()
            rows.append(x.reshape(-1, x.shape[-1]).to("cpu", torch.float32).numpy())
            raise StopForward  # nothing after the linear is needed

        with hooks({"x": module}, record, when="before"):
            for s in range(0, hidden.shape[0], batch_size):
                _check_cancel(should_cancel)
                run_until_stopped(blocks[block], hidden[s:s + batch_size], *caught.args, **caught.kwargs)
        return np.concatenate(rows)

    X_fp = inputs_of(fp)
    X_q = X_fp if block == 0 else inputs_of(q)
    progress(1.0)
    return X_fp, X_q


def clear_caches() -> None:
    """Forget cached models and captured activations (frees memory; the layer store stays)."""
    with _MODEL_LOCK:
        _MODELS.clear()
        _STRUCTURES.clear()
    with _ACTS_LOCK:
        _ACTS.clear()
    _SYNTH_CACHE.clear()
