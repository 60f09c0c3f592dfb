"""Which layer the Layer Lab shows, and loading it: at once (the synthetic layer, a captured one) or in a
background job with a progress bar and Cancel (a model's layer: cancellation takes effect between steps;
the model load itself, one call, finishes first). A failed or cancelled load leaves what is on screen.
"""

from __future__ import annotations

import dataclasses
import functools
import html

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
        """Show the first layer: loaded here when that is quick (synthetic, or captured already) or asked
        for (threaded=False); a model's layer is otherwise left to the background, with the synthetic
        layer shown meanwhile. Returns the source still to load, or None."""
        captured = (isinstance(source, ModelSource) and source.cached() is not None
                    and cached_model_structure(source.model) is not None)  # nothing left to load
        pending = None
        if isinstance(source, SyntheticSource) or not self.threaded or captured:
            try:
                self.data = source.load()
                if isinstance(source, ModelSource):
                    self._structures[source.model] = model_structure(source.model)
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

    def _show_data(self, source, data: LayerData) -> None:
        run = self._get_run(source, data, self.config())
        with self._lock:
            self.data, self._source, self.run = data, source, run
            self._shown_source_values = self._source_values()
            self._sync_slider_ranges()
            self._render_full()
        if run.warnings:
            self._info("<br>".join(html.escape(w) for w in run.warnings))
        else:
            self._clear_message()

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
        self._cancel_job()
        job = Job(f"loading {source.model}")
        self._job = job
        self.progress.start(job.label)

        def work():
            try:
                self._load_in_job(job, source, fresh_model)
            except Exception as exc:  # noqa: BLE001
                if job is self._job:
                    self.show_error(exc, where=job.label)
                    self._set_source_controls(self._shown_source_values)
            finally:
                if job is self._job:
                    self.progress.stop()
                    self._job = None

        run_job(job, work, self.threaded, "LayerLab-load")

    def _load_in_job(self, job: Job, source: ModelSource, fresh_model: bool) -> None:
        """The background job's work: the model's structure, the layer's data, then the run."""
        progress = functools.partial(self._progress, job)
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
        if job is not self._job:
            return
        progress(0.98, "running GPTQ")
        self._set_source_controls(state_of_source(src))
        self._show_data(src, data)
