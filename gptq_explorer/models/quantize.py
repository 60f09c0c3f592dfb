"""Whole-model quantization with the GPTQ paper's sequential method (opt.py / llama.py), on the torch path.

    1. catch the inputs of block 0 (hidden states + the kwargs every block gets);
    2. for each block, for each true-sequential group of its linears (LLaMA: [k,v,q], [o], [up,gate],
       [down]): collect the Hessian of the group's input over all calibration samples, quantize the
       group and write the de-quantized weights back, so later groups see quantized outputs;
    3. the block's outputs with all its weights quantized are the next block's inputs, so every block is
       calibrated on what the quantized model before it really produces.

Two schedules give the same result:
  * single pass (default when it fits in memory): every sample goes through a block once; a forward
    pre-hook on each group quantizes the group when its input has arrived, before the group runs. One block
    forward per block. On a CPU the forward runs in turns of a few samples (models.capture.run_in_turns)
    that wait for each other at each group, so no activation grows past a few MB (quantize_sequential's
    TURN_BYTES); on a GPU in one turn. In turns of b samples it gives the loop's numbers in batches of b,
    bit for bit.
  * the paper's loop (single_pass=False, in batches of batch_size): one pass per group (stopped after the
    group's last linear) plus a final pass for the outputs: ~2.7 block forwards per block, but only a
    batch of activations alive at a time.
GPTAQ (gptaq_alpha > 0) also needs every linear's input in the full-precision model, for the same tokens.
The single pass first runs each block with its original weights over all samples, keeping each group's
input (one tensor per group: q/k/v share one, gate/up share one), then the quantized pass pairs it with
its own input for dXXT and drops it: two block forwards per block. The loop runs a copy of the block with
the original weights beside each of its passes (~2.7 forwards of each stream per block).
RTN needs no data: without calib_ids it quantizes every linear directly; with them it runs the same
schedule only to fill the per-layer report (Hessian statistics, output errors).

Memory: the model + two (nsamples, seqlen, hidden) float32 buffers (block inputs and outputs; SmolLM2 at
128 x 512: 2 x 151 MB; GPTAQ: three in the single pass, four in the loop) + one group's Hessian (at most
1536^2 floats = 9.4 MB for SmolLM2; GPTAQ's dXXT doubles it) + the activations of one block: for the whole
calibration set in single-pass mode (at most nsamples*seqlen*(3*intermediate + 8*hidden)*4 bytes, a bound
that the turns keep well under; GPTAQ
adds the kept full-precision inputs, at most nsamples*seqlen*(3*hidden + intermediate)*4 bytes, reported
as memory["gptaq_fp_inputs_bytes"]; single_pass=None only picks it when all that is under min(4 GiB, 30%
of free RAM), or 25% of free GPU memory), for one batch otherwise.

The model is changed in place (pass inplace=False to work on a copy). On cancel or any error the
original weights are put back, so a half-quantized model is never left behind.

Where it lives: this module runs a quantization (quantize_model, in named steps); quantize_results holds
what a run returns, quantize_overrides the per-layer configs, quantize_sequential the schedules, and
quantize_cache the on-disk cache of results.
"""

from __future__ import annotations

import copy
import resource
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import find_linear_like, get_adapter, model_device
from .quantize_cache import _load_cached, _save_cached, cache_key
from .quantize_overrides import layer_configs
from .quantize_results import LayerReport, QuantizationCancelled, QuantizedModel
from .quantize_sequential import _Job, _rtn_without_data, _sequential, _single_pass_fits

# the public names of whole-model quantization, importable from here as before the split
__all__ = ["COMPACT_RESULTS", "LayerReport", "QuantizationCancelled", "QuantizedModel", "cache_key",
           "layer_configs", "quantize_model"]

# Kept results: uint8 codes and the module's own weight (True), or int32 codes and a separate float32 copy
# of the weight (False: the earlier layout, kept so that benchmarks/bench_memory.py can compare the two).
# Read at the start of each run, so setting models.quantize.COMPACT_RESULTS takes effect on the next one.
COMPACT_RESULTS = True


def quantize_model(
    model_or_loaded,
    calib_ids,
    cfg=None,
    method: str = "gptq",
    true_sequential: bool = True,
    overrides: dict | None = None,
    device=None,
    progress: bool = True,
    cancel: threading.Event | Callable[[], bool] | None = None,
    cache_dir=None,
    batch_size: int = 8,
    single_pass: bool | None = None,
    inplace: bool = True,
    hessian_condition: bool = True,
    save_hessians: bool = True,
    tokenizer=None,
) -> QuantizedModel:
    """Quantize every linear of every decoder block (never embeddings, norms or lm_head).

    model_or_loaded: a transformers causal LM or a LoadedModel. calib_ids: LongTensor (nsamples, seqlen)
    (e.g. from gptq_explorer.data.calibration_windows); may be None for RTN. cfg: QuantConfig.
    overrides: {glob pattern: {QuantConfig field: value}}, matched against full module paths and against
    'blocks.<i>.<name>' (negative i counts from the end), applied in order: e.g.
    {"blocks.0.*": {"bits": 8}, "blocks.-1.*": {"bits": 8}}.
    device: where blocks run and GPTQ solves (None = the model's device; otherwise blocks are moved there
    one at a time, like the paper's code). batch_size: calibration samples per block forward in the
    paper's loop, and per forward when catching block 0's inputs (the single pass sizes its own turns).
    single_pass: true-sequential in ONE forward pass per block: every sample goes through the block once
    (in turns that wait for each other at each group) and each group is quantized by a pre-hook once its
    input over all samples has arrived, before its own forward (the paper's code needs one pass per group
    plus one). Same result, ~2.5x fewer block forwards, but each group's input over the whole calibration
    set is alive at once. None = when that fits in memory. GPTAQ too: one more forward per block with the
    original weights gives each group's full-precision input.
    cancel: a threading.Event or a callable returning True to stop; raises QuantizationCancelled after
    restoring the original weights. cache_dir: reuse / store results (and Hessians, if save_hessians)
    keyed by sha256 of (model weights, calibration ids, config, method, overrides).
    hessian_condition: report cond(H + damping) per Hessian (an eigendecomposition each; False skips it).
    """
    from ..engine import QuantConfig

    t_start = time.perf_counter()
    cfg = QuantConfig.coerce(cfg)
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be 'gptq' or 'rtn', got {method!r}")
    model, tokenizer = _the_model(model_or_loaded, tokenizer, inplace)
    adapter, blocks, names, cfgs = _layer_table(model, cfg, overrides)
    calib_ids = _checked_calib_ids(calib_ids, method)
    home = model_device(model)
    qm = QuantizedModel(model, tokenizer, cfg, method, true_sequential=true_sequential)
    qm.overrides = dict(overrides or {})
    qm.nsamples, qm.seqlen = (0, 0) if calib_ids is None else tuple(calib_ids.shape)

    if cache_dir is not None:
        qm.cache_key = cache_key(model, calib_ids, cfg, method, true_sequential, overrides)
        if _load_cached(qm, Path(cache_dir) / qm.cache_key, COMPACT_RESULTS):
            qm.seconds = time.perf_counter() - t_start
            return qm

    device = torch.device(device) if device is not None else home
    # GPTAQ carries the full-precision activations beside the quantized ones (both schedules do)
    gptaq = method == "gptq" and any(c.gptaq_alpha > 0 for c in cfgs.values())
    if single_pass is None:
        single_pass = calib_ids is not None and _single_pass_fits(model, *calib_ids.shape, device, gptaq)
    job = _Job(
        qm=qm, adapter=adapter, cfgs=cfgs, device=device, home=home, batch_size=batch_size,
        progress=progress, cancel=cancel, hessian_condition=hessian_condition,
        keep_hessians=save_hessians and cache_dir is not None,
        single_pass=bool(single_pass and true_sequential), gptaq=gptaq, compact=COMPACT_RESULTS,
    )  # fmt: skip
    _run_or_restore(job, blocks, calib_ids, len(names))
    qm.seconds = time.perf_counter() - t_start
    qm.memory["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if job.device.type == "cuda":
        qm.memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(job.device)
    if qm.cache_key is not None:
        _store_in_cache(qm, cache_dir, job)
    return qm


# ---------------------------------------------------------------------------------------------------------
# the steps of quantize_model


def _the_model(model_or_loaded, tokenizer, inplace: bool):
    """(model, tokenizer) from a LoadedModel (or anything with .model/.tokenizer) or the model itself;
    a copy of the model when not inplace."""
    # careful: a bare LlamaForCausalLM also has a `.model` attribute (its LlamaModel body)
    is_module = isinstance(model_or_loaded, torch.nn.Module)
    model = model_or_loaded if is_module else model_or_loaded.model
    tokenizer = tokenizer or (None if is_module else getattr(model_or_loaded, "tokenizer", None))
    if not inplace:
        model = copy.deepcopy(model)
    return model, tokenizer


def _layer_table(model, cfg, overrides: dict | None):
    """(adapter, blocks, every quantized linear's module path, path -> QuantConfig with overrides applied);
    refuses a block with a linear the adapter does not list."""
    adapter = get_adapter(model)
    blocks = adapter.get_blocks(model)
    names = [f"{adapter.block_prefix(i)}.{rel}" for i in range(len(blocks)) for rel in adapter.linear_names()]
    cfgs = layer_configs(names, cfg, overrides, adapter, len(blocks))
    for i, block in enumerate(blocks):  # a linear the table does not know would silently stay FP
        extra = set(find_linear_like(block)) - set(adapter.linear_names())
        if extra:
            raise ValueError(
                f"block {i} has linears the '{adapter.family}' adapter does not list: {sorted(extra)}"
            )
    return adapter, blocks, names, cfgs


def _checked_calib_ids(calib_ids, method: str):
    """calib_ids as a (nsamples, seqlen) LongTensor (one sequence becomes one sample), or None for RTN."""
    if calib_ids is None:
        if method == "gptq":
            raise ValueError("GPTQ needs calibration data: pass calib_ids (nsamples, seqlen)")
        return None
    calib_ids = torch.as_tensor(calib_ids, dtype=torch.long)
    calib_ids = calib_ids[None] if calib_ids.dim() == 1 else calib_ids
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be (nsamples, seqlen), got shape {tuple(calib_ids.shape)}")
    return calib_ids


def _run_or_restore(job: _Job, blocks, calib_ids, n_layers: int) -> None:
    """Quantize every block (in eval mode, without gradients); on cancel or any error put every changed
    weight back and re-raise (a cancel as QuantizationCancelled saying how far it got)."""
    qm = job.qm
    model = qm.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if calib_ids is None:
                _rtn_without_data(job, blocks)
            else:
                _sequential(job, blocks, calib_ids)
    except BaseException as exc:
        with torch.no_grad():  # put every changed weight back: no half-quantized model survives
            mods = dict(model.named_modules())
            for name, w in job.originals.items():
                mods[name].weight.data.copy_(w.to(mods[name].weight.device))
        model.train(was_training)
        if isinstance(exc, QuantizationCancelled):
            raise QuantizationCancelled(
                f"quantization cancelled after {len(qm.layers)} of {n_layers} layers; the original "
                "weights were restored, so the model is unchanged",
                qm.layers,
            ) from None
        raise
    model.train(was_training)


def _store_in_cache(qm: QuantizedModel, cache_dir, job: _Job) -> None:
    try:
        _save_cached(qm, Path(cache_dir) / qm.cache_key, job.hessians, job.alias)
    except OSError as exc:  # a full disk must not throw away a finished quantization
        warnings.warn(  # stacklevel 3: quantize_model's caller, as when this was inline there
            f"the quantized model is complete but could not be cached in {cache_dir} "
            f"({exc.strerror or exc}); nothing was written there. Free some disk space there, or pass "
            "another cache_dir (or None).", RuntimeWarning, stacklevel=3)
