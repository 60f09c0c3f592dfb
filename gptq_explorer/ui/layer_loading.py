"""Which layer the Layer Lab shows, and loading it: at once (the synthetic layer, a captured one) or in a
background job with a progress bar and Cancel (a model's layer: cancellation takes effect between steps;
the model load itself, one call, finishes first). A failed or cancelled load leaves what is on screen.

GPTAQ needs the layer's inputs in both models (source.load_pair()): `pair`, loaded only once a config
asks for it (the synthetic layer's at once; a model's layer's in a background job, its second capture),
so the default view costs what it did.

A model's layer in the layer store (services.layer_store: `gptq-explorer prepare` stores the default one,
any capture adds its own) counts as captured: it is read with NumPy alone, shown at once, and neither
torch nor the model is loaded for it.
"""

from __future__ import annotations

import dataclasses
import functools

from ..services.layer_source import (
    SYNTHETIC,
    SYNTHETIC_BLOCKS,
    SYNTHETIC_SUBLAYERS,
    Cancelled,
    LayerData,
    ModelSource,
    SyntheticSource,
    cached_model_structure,
    curated_models,
    model_structure,
)
from .common import InputError, Job, run_job


def model_options(models, source) -> list[tuple[str, str]]:
    """The model dropdown's (label, value) pairs: the synthetic layer, then `models` (None: the curated
    list; a dict {id: description} or ids), then the source's model if it is none of them."""
    if models is None:
        models = curated_models()
    items = list(models.items()) if isinstance(models, dict) else [(m, m) for m in models]
    opts = [("Synthetic layer (instant, no model)", SYNTHETIC)]
    for mid, desc in items:
        if mid != SYNTHETIC:
            label = mid if desc == mid else f"{mid} — {desc}"
            opts.append((label[:90], mid))
    if isinstance(source, ModelSource) and source.model not in [v for _, v in opts]:
        opts.append((source.model, source.model))  # a Python caller's choice is trusted
    return opts


def state_of_source(source) -> dict:
    """The source controls' values that show `source`."""
    if isinstance(source, ModelSource):
        return {"model": source.model, "block": source.block, "sublayer": source.sublayer,
                "corpus": source.corpus, "nsamples": source.nsamples}
    seed = getattr(source, "seed", 0)
    return {"model": SYNTHETIC, "block": seed if 0 <= seed < SYNTHETIC_BLOCKS else 0,
            "sublayer": SYNTHETIC_SUBLAYERS[0]}


class LayerLoading:
    """The layer side of LayerLab (a mixin): `_source` and `data` (the layer shown), `_structures` (the
    blocks and sublayers of the models seen), `_job` (the background load). Uses the lab's controls, its
    progress bar, `threaded`, `_show_data`-related drawing and `show_error`."""

    def _load_first(self, source):
        """Show the first layer: loaded here when that is quick (synthetic, or captured already: in this
        process or into the layer store) or asked for (threaded=False); a model's layer is otherwise left
        to the background, with the synthetic layer shown meanwhile. Returns the source still to load, or
        None."""
        self.pair = None
        captured = (isinstance(source, ModelSource) and source.cached() is not None
                    and cached_model_structure(source.model) is not None  # nothing left to load
                    and (not self._needs_pair() or source.cached_pair() is not None))
        pending = None
        if isinstance(source, SyntheticSource) or not self.threaded or captured:
            try:
                self.data = source.load()
                if isinstance(source, ModelSource):
                    self._structures[source.model] = model_structure(source.model)
                    if self._needs_pair():
                        self.pair = source.load_pair()
            except Exception as exc:  # noqa: BLE001
                self.show_error(exc, where="load")
                source = self._synthetic
                self.data = source.load()
        else:
            pending, source = source, self._synthetic
            self.data = source.load()
        self._source = source
        return pending

    def _structure_options(self, model) -> tuple[list, list] | None:
        """(block options, sublayer options) of a model, or None while its structure is not known yet."""
        if model == SYNTHETIC:
            return list(range(SYNTHETIC_BLOCKS)), list(SYNTHETIC_SUBLAYERS)
        if model in self._structures:
            n_blocks, subs = self._structures[model]
            return list(range(n_blocks)), list(subs)
        return None

    def _source_values(self) -> dict:
        return {k: self.controls[k].value for k in ("model", "block", "sublayer", "corpus", "nsamples")}

    def _source_changed(self, changed: str | None = None) -> None:
        self._cancel_compare()  # a table for the layer being left
        c = self.controls
        model = c["model"].value
        if model == SYNTHETIC:
            self._cancel_job()
            blocks, subs = self._structure_options(SYNTHETIC)
            with self._quietly():
                if list(c["block"].options) != blocks:
                    c["block"].options = blocks
                    c["block"].value = 0
                if list(c["sublayer"].options) != subs:
                    c["sublayer"].options = subs
            c["corpus"].disabled = c["nsamples"].disabled = True
            self._load_now(dataclasses.replace(self._synthetic, seed=int(c["block"].value)))
            return
        c["corpus"].disabled = c["nsamples"].disabled = False
        if changed == "model" and model in self._structures:
            with self._quietly():
                c["block"].options, c["sublayer"].options = self._structure_options(model)
        source = ModelSource(model=model, block=int(c["block"].value), sublayer=c["sublayer"].value,
                             corpus=c["corpus"].value, nsamples=int(c["nsamples"].value))
        self._start_source_job(source, fresh_model=changed == "model")

    def _load_now(self, source) -> None:
        self._show_data(source, source.load())

    def _show_data(self, source, data: LayerData, pair: LayerData | None = None) -> None:
        with self._lock:
            self.data, self._source, self.pair = data, source, pair
            self._shown_source_values = self._source_values()
        self._recompute(clear=True)
        self._mark_compare_stale()

    # -- both models' inputs, for GPTAQ ------------------------------------------------------------------

    def _needs_pair(self, cfg=None) -> bool:
        return (cfg or self.config()).gptaq_alpha > 0

    def _data_for(self, cfg) -> LayerData | None:
        """The data a run of `cfg` needs: the layer's, or for GPTAQ both models' inputs (loaded here when
        that is quick; None while a model's layer's second capture is still to do)."""
        if not self._needs_pair(cfg):
            return self.data
        if self.pair is None:
            source = self._source
            if isinstance(source, ModelSource):
                self.pair = source.cached_pair()
            elif hasattr(source, "load_pair"):  # the synthetic layer: a matmul
                self.pair = source.load_pair()
            else:
                raise InputError(f"{source!r} has no full-precision stream (load_pair): no GPTAQ on it")
        return self.pair

    def _start_pair_job(self, source: ModelSource) -> None:
        """Capture the layer's inputs in the quantized model too (a background job), then run the config.
        A load of another layer running meanwhile loads them itself (_load_in_job)."""
        job = self._job
        if job is not None and (getattr(job, "pair_of", None) == source.key or not hasattr(job, "pair_of")):
            return
        self._info("Capturing this layer's inputs in the quantized model too (GPTAQ needs both); showing "
                   "the previous run meanwhile.")

        def load(job: Job) -> None:
            pair = source.load_pair(functools.partial(self._progress, job), job.cancel.is_set)
            with self._lock:
                if job is not self._job or self._source.key != source.key:
                    return
                self.pair = pair
            self._recompute(clear=True)

        self._start_load(f"{source.model}: the quantized model's inputs", load, pair_of=source.key)

    def _start_deferred_load(self) -> None:
        with self._lock:
            pending, self._deferred = self._deferred, None
        if pending is not None and not self._closed:
            self._start_source_job(pending)

    def _cancel_job(self) -> None:
        """Drop the running job (its result will be ignored) and hide the progress bar."""
        self._deferred = None  # the user chose another layer before the deferred load began
        if self._job is not None:
            self._job.cancel.set()
            self._job = None
            self.progress.stop()

    def _progress(self, job: Job, fraction: float, text: str) -> None:
        if job is self._job:
            self.progress.set(fraction, f"{job.label}: {text}")

    def _start_source_job(self, source: ModelSource, fresh_model: bool = False) -> None:
        self._start_load(f"loading {source.model}", lambda job: self._load_in_job(job, source, fresh_model))

    def _start_load(self, label: str, load, pair_of: tuple | None = None) -> None:
        """Run load(job) as the lab's background job (the one before it is cancelled); a failure is shown,
        and the controls go back to what is on screen. pair_of: the source key of a second capture."""
        self._cancel_job()
        job = Job(label)
        if pair_of is not None:
            job.pair_of = pair_of
        self._job = job
        self.progress.start(job.label)

        def work():
            try:
                load(job)
            except Exception as exc:  # noqa: BLE001
                if job is self._job:
                    self.show_error(exc, where=job.label)
                    self._set_source_controls(self._shown_source_values)
                    self._show_config(self.run.cfg)
            finally:
                if job is self._job:
                    self.progress.stop()
                    self._job = None

        run_job(job, work, self.threaded, "LayerLab-load")

    def _load_in_job(self, job: Job, source: ModelSource, fresh_model: bool) -> None:
        """The background job's work: the model's structure, the layer's data, then the run."""
        progress = functools.partial(self._progress, job)
        source.cached()  # a stored layer brings its model's structure: then no model is loaded for it
        n_blocks, subs = model_structure(source.model, progress)
        self._structures[source.model] = (n_blocks, subs)
        src = source
        if src.sublayer not in subs or not 0 <= src.block < n_blocks:
            if not fresh_model:
                raise InputError(f"{source.model} has blocks 0..{n_blocks - 1} and sublayers {subs}; "
                                 f"got block {src.block}, sublayer {src.sublayer!r}")
            src = dataclasses.replace(src, block=min(src.block, n_blocks - 1),
                                      sublayer=src.sublayer if src.sublayer in subs else subs[0])
        if job.cancel.is_set():
            raise Cancelled("cancelled")
        data = src.load(progress, job.cancel.is_set)
        pair = src.load_pair(progress, job.cancel.is_set) if self._needs_pair() else None
        if job is not self._job:
            return
        progress(0.98, "running GPTQ")
        self._set_source_controls(state_of_source(src))
        self._show_data(src, data, pair)
        if self._needs_pair() and self.pair is None and job is self._job:  # GPTAQ was picked meanwhile
            pair = src.load_pair(progress, job.cancel.is_set)
            if job is self._job:
                self.pair = pair
                self._recompute(clear=True)
