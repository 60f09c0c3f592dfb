"""Whole-model quantization with the GPTQ paper's sequential method (opt.py / llama.py), on the torch path.

    1. catch the inputs of block 0 (hidden states + the kwargs every block gets);
    2. for each block, for each true-sequential group of its linears (LLaMA: [k,v,q], [o], [up,gate],
       [down]): collect the Hessian of the group's input over all calibration samples, quantize the
       group and write the de-quantized weights back, so later groups see quantized outputs;
    3. the block's outputs with all its weights quantized are the next block's inputs, so every block is
       calibrated on what the quantized model before it really produces.

Two schedules give the same result:
  * single pass (default when it fits in memory): all samples go through a block as ONE batch; a forward
    pre-hook on each group quantizes the group when its input arrives, before the group runs. One block
    forward per block.
  * the paper's loop (single_pass=False, in batches of batch_size): one pass per group (stopped after the
    group's last linear) plus a final pass for the outputs: ~2.7 block forwards per block, but only a
    batch of activations alive at a time.
RTN needs no data: without calib_ids it quantizes every linear directly; with them it runs the same
schedule only to fill the per-layer report (Hessian statistics, output errors).

Memory: the model + two (nsamples, seqlen, hidden) float32 buffers (block inputs and outputs; SmolLM2 at
128 x 512: 2 x 151 MB) + one group's Hessian (at most 1536^2 floats = 9.4 MB for SmolLM2) + the
activations of one block: for the whole calibration set in single-pass mode (about
nsamples*seqlen*(3*intermediate + 8*hidden)*4 bytes; single_pass=None only picks it when that is under
min(4 GiB, 30% of free RAM), or 25% of free GPU memory), for one batch otherwise.

The model is changed in place (pass inplace=False to work on a copy). On cancel or any error the
original weights are put back, so a half-quantized model is never left behind.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import resource
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .adapters import (
    Adapter,
    BlockInputs,
    _to,
    catch_block_inputs,
    find_linear_like,
    get_adapter,
    get_weight,
    model_device,
    run_block,
    set_weight,
)
from .capture import HookCall, StopForward, hooks, run_until_stopped

CACHE_FORMAT = 1  # bump when the cached files change meaning
# Kept results: uint8 codes and the module's own weight (True), or int32 codes and a separate float32 copy
# of the weight (False: the earlier layout, kept so that benchmarks/bench_memory.py can compare the two).
COMPACT_RESULTS = True


class QuantizationCancelled(RuntimeError):
    """quantize_model was cancelled; the model's original weights have been restored."""

    def __init__(self, msg: str, layers_done: list | None = None):
        super().__init__(msg)
        self.layers_done = layers_done or []


@dataclass
class LayerReport:
    name: str  # full module path, e.g. "model.layers.3.mlp.down_proj"
    block: int
    group: int  # index of its true-sequential group inside the block
    shape: tuple[int, int]  # (out_features, in_features)
    bits: int
    group_size: int
    sym: bool
    method: str
    h_trace: float | None = None  # Hessian statistics (H = 2/n sum x x^T over calibration tokens)
    h_mean_diag: float | None = None
    dead_columns: int | None = None  # inputs that were always zero
    h_condition: float | None = None  # condition number of the damped H that GPTQ factorizes
    damp_percent_used: float | None = None
    loss: float | None = None  # GPTQ's OBS loss (sum over columns), in units of H
    output_mse: float | None = None  # ||X W^T - X Q^T||^2 / numel on the calibration inputs
    output_rel_error: float | None = None  # the same divided by ||X W^T||^2
    weight_rel_error: float = 0.0  # ||W - Q|| / ||W||
    seconds: float = 0.0  # quantization time of this layer (Hessian collection is shared, not included)


@dataclass
class QuantizedModel:
    model: Any
    tokenizer: Any
    config: Any  # the base QuantConfig
    method: str
    results: dict = field(default_factory=dict)  # module path -> QuantResult (tensors on the CPU)
    layers: list = field(default_factory=list)  # LayerReport per quantized linear, in order
    seconds: float = 0.0
    cancelled: bool = False  # a returned model is always complete; cancellation raises QuantizationCancelled
    true_sequential: bool = True
    overrides: dict = field(default_factory=dict)
    nsamples: int = 0
    seqlen: int = 0
    timings: dict = field(default_factory=dict)  # catch / forward / hessian / quantize seconds
    memory: dict = field(default_factory=dict)  # activation buffer bytes, Hessian bytes, peak RSS / CUDA
    cache_key: str | None = None
    from_cache: bool = False

    def report_rows(self) -> list[dict]:
        return [asdict(r) for r in self.layers]


# ---------------------------------------------------------------------------------------------------------
# per-layer configs from overrides


def _aliases(adapter: Adapter, name: str, n_blocks: int) -> list[str]:
    """A layer can be named by its full path or by the family-neutral 'blocks.<i>.<rel>' (i may be negative:
    'blocks.-1.*' is the last block)."""
    prefix = adapter.blocks + "."
    rest = name[len(prefix) :]
    i, rel = rest.split(".", 1)
    return [name, f"blocks.{i}.{rel}", f"blocks.{int(i) - n_blocks}.{rel}"]


def layer_configs(names: list[str], cfg, overrides: dict | None, adapter: Adapter, n_blocks: int) -> dict:
    """Module path -> QuantConfig after applying overrides {glob pattern: {field: value}} in order."""
    out = {n: cfg for n in names}
    fields = set(cfg.to_dict()) if hasattr(cfg, "to_dict") else set(asdict(cfg))
    for pattern, change in (overrides or {}).items():
        bad = set(change) - fields
        if bad:
            raise ValueError(
                f"override {pattern!r} has unknown field(s) {sorted(bad)}; allowed: {sorted(fields)}"
            )
        hits = [
            n for n in names if any(fnmatch.fnmatchcase(a, pattern) for a in _aliases(adapter, n, n_blocks))
        ]
        if not hits:
            raise ValueError(
                f"override pattern {pattern!r} matches no quantized layer. Layers look like "
                f"{names[0]!r} or 'blocks.0.{names[0].split('.', len(adapter.blocks.split('.')) + 1)[-1]}'"
                " (glob patterns, e.g. 'blocks.0.*', 'blocks.-1.*', '*.down_proj')."
            )
        for n in hits:
            out[n] = out[n].replace(**change)
    return out


# ---------------------------------------------------------------------------------------------------------
# Hessian collection with hooks


class _GroupCollector:
    """Hessians of one group's linears, fed by a forward hook (models.capture.hooks) on each of them: the
    hook keeps the linear's input; after each batch, flush() adds each distinct input tensor to one Hessian
    (k, v, q see the very same tensor, so they share one Hessian). Once every linear of the group has run,
    the hook ends the block's forward pass (StopForward): the rest of the block is not needed."""

    def __init__(self, modules: dict[str, torch.nn.Module], device):
        from ..engine import Hessian

        self._Hessian = Hessian
        self.modules = modules
        self.device = device
        self.hessians: dict[str, Any] = {}
        self._inputs: dict[str, torch.Tensor] = {}

    def hook(self, call: HookCall) -> None:
        self._inputs[call.name] = call.input.detach()
        if len(self._inputs) == len(self.modules):
            raise StopForward

    def flush(self) -> None:
        seen: list[tuple[torch.Tensor, Any]] = []
        for name in self.modules:
            x = self._inputs[name]
            h = next((h for t, h in seen if t is x), None)
            if h is None:
                if name not in self.hessians:
                    self.hessians[name] = self._Hessian(x.shape[-1], backend="torch", device=self.device)
                h = self.hessians[name]
                h.add_batch(x)
                seen.append((x, h))
            elif name not in self.hessians:
                self.hessians[name] = h
        self._inputs.clear()


# ---------------------------------------------------------------------------------------------------------
# the sequential method


def _cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _hessian_stats(H: torch.Tensor, damp: float, condition: bool) -> dict:
    d = torch.diagonal(H)
    stats = {"h_trace": float(d.sum()), "h_mean_diag": float(d.mean()), "dead_columns": int((d == 0).sum())}
    if condition:
        # float32 is enough: damping keeps the smallest eigenvalue >= damp * mean(diag) (cond <~ 1e6)
        Hd = H.float().clone()
        Hd[d == 0, d == 0] = 1.0  # as GPTQ does before damping
        Hd += (
            damp * float(torch.diagonal(Hd).mean()) * torch.eye(H.shape[0], dtype=Hd.dtype, device=Hd.device)
        )
        ev = torch.linalg.eigvalsh(Hd)
        stats["h_condition"] = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf")
    return stats


def _output_errors(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    # with H = 2/n sum x x^T: ||X D^T||^2 / (n * out) = tr(D H D^T) / (2 * out)
    D = (W - Q).to(H.dtype)
    err = float(((D @ H) * D).sum())
    ref = float(((W.to(H.dtype) @ H) * W.to(H.dtype)).sum())
    return err / (2 * W.shape[0]), (err / ref if ref > 0 else 0.0)


def _result_to_cpu(res, module=None):
    """The result as kept in QuantizedModel.results: on the CPU and small. Codes become uint8 (bits <= 8:
    a quarter of int32), and when `module` already holds exactly this weight as float32 on the CPU,
    res.weight is a view of the module's weight instead of a second copy (for SmolLM2 these two save
    ~0.7 GB; the module's weight then IS the result, so changing one changes the other)."""
    for f in ("weight", "codes", "scales", "zeros", "g_idx", "perm", "losses", "dead_columns"):
        v = getattr(res, f, None)
        if isinstance(v, torch.Tensor):
            setattr(res, f, v.detach().cpu())
    if not COMPACT_RESULTS:
        return res
    if isinstance(res.codes, torch.Tensor) and res.config.bits <= 8:
        res.codes = res.codes.to(torch.uint8)
    if module is not None and isinstance(res.weight, torch.Tensor):
        w = get_weight(module)
        if w.dtype == torch.float32 and w.device.type == "cpu" and torch.equal(w, res.weight):
            res.weight = w
    return res


def _forward_pass(block, inps, kwargs_dev, device, batch_size, cancel, collector=None, out=None):
    """Run block over all samples in batches; with a collector, feed its Hessians (the pass stops after the
    group's last linear); with out, store the block's outputs."""
    for i in range(0, inps.shape[0], batch_size):
        if _cancelled(cancel):
            raise QuantizationCancelled("cancelled")
        x = inps[i : i + batch_size].to(device)
        y = run_until_stopped(run_block, block, x, kwargs_dev)
        if collector is not None:
            collector.flush()
        if out is not None:
            out[i : i + batch_size] = y.to(out.device, out.dtype)


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
    one at a time, like the paper's code). batch_size: calibration samples per block forward.
    single_pass: true-sequential in ONE forward pass per block: all samples go through the block as one
    batch and each group is quantized by a pre-hook the moment its input arrives, before its own forward
    (the paper's code needs one pass per group plus one). Same result, ~2.5x fewer block forwards, but the
    activations of the whole calibration set are alive at once. None = when they fit in memory.
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
    # a LoadedModel (or anything with .model/.tokenizer) or the model itself; careful: a bare
    # LlamaForCausalLM also has a `.model` attribute (its LlamaModel body)
    is_module = isinstance(model_or_loaded, torch.nn.Module)
    model = model_or_loaded if is_module else model_or_loaded.model
    tokenizer = tokenizer or (None if is_module else getattr(model_or_loaded, "tokenizer", None))
    if not inplace:
        model = copy.deepcopy(model)
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
    if calib_ids is None:
        if method == "gptq":
            raise ValueError("GPTQ needs calibration data: pass calib_ids (nsamples, seqlen)")
    else:
        calib_ids = torch.as_tensor(calib_ids, dtype=torch.long)
        calib_ids = calib_ids[None] if calib_ids.dim() == 1 else calib_ids
        if calib_ids.dim() != 2:
            raise ValueError(f"calib_ids must be (nsamples, seqlen), got shape {tuple(calib_ids.shape)}")
    home = model_device(model)
    qm = QuantizedModel(model, tokenizer, cfg, method, true_sequential=true_sequential)
    qm.overrides = dict(overrides or {})
    qm.nsamples, qm.seqlen = (0, 0) if calib_ids is None else tuple(calib_ids.shape)

    if cache_dir is not None:
        qm.cache_key = cache_key(model, calib_ids, cfg, method, true_sequential, overrides)
        if _load_cached(qm, Path(cache_dir) / qm.cache_key):
            qm.seconds = time.perf_counter() - t_start
            return qm

    device = torch.device(device) if device is not None else home
    if single_pass is None:
        single_pass = calib_ids is not None and _single_pass_fits(model, *calib_ids.shape, device)
    job = _Job(
        qm=qm, adapter=adapter, cfgs=cfgs, device=device, home=home, batch_size=batch_size,
        progress=progress, cancel=cancel, hessian_condition=hessian_condition,
        keep_hessians=save_hessians and cache_dir is not None,
        single_pass=bool(single_pass and true_sequential),
    )  # fmt: skip
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
                f"quantization cancelled after {len(qm.layers)} of {len(names)} layers; the original "
                "weights were restored, so the model is unchanged",
                qm.layers,
            ) from None
        raise
    model.train(was_training)
    qm.seconds = time.perf_counter() - t_start
    qm.memory["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if job.device.type == "cuda":
        qm.memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(job.device)
    if qm.cache_key is not None:
        try:
            _save_cached(qm, Path(cache_dir) / qm.cache_key, job.hessians, job.alias)
        except OSError as exc:  # a full disk must not throw away a finished quantization
            warnings.warn(
                f"the quantized model is complete but could not be cached in {cache_dir} "
                f"({exc.strerror or exc}); nothing was written there. Free some disk space there, or pass "
                "another cache_dir (or None).", RuntimeWarning, stacklevel=2)
    return qm


@dataclass
class _Job:
    """Everything one quantize_model run needs to carry around."""

    qm: QuantizedModel
    adapter: Adapter
    cfgs: dict  # module path -> QuantConfig (overrides applied)
    device: torch.device
    home: torch.device
    batch_size: int
    progress: bool
    cancel: Any
    hessian_condition: bool
    keep_hessians: bool
    single_pass: bool = False
    originals: dict = field(default_factory=dict)  # weights we changed (CPU copies), to restore on failure
    hessians: dict = field(default_factory=dict)  # owner layer -> H, when caching
    alias: dict = field(default_factory=dict)  # layer -> owner layer, for layers sharing an input (k, v, q)

    def check_cancel(self):
        if _cancelled(self.cancel):
            raise QuantizationCancelled("cancelled")


def _quantize_layer(job: _Job, name, block_idx, group_idx, module, H=None, stats=None):
    from ..engine import gptq_quantize, rtn_quantize

    qm, cfg_l, device = job.qm, job.cfgs[name], job.device
    t0 = time.perf_counter()
    W = get_weight(module).detach().to(device=device, dtype=torch.float32, copy=True)
    if stats is None:
        stats = _hessian_stats(H, cfg_l.damp_percent, job.hessian_condition) if H is not None else {}
    if qm.method == "gptq":
        res = gptq_quantize(W, H, cfg_l, backend="torch", device=device)
    else:
        res = rtn_quantize(W, cfg_l, backend="torch", device=device)
    Q = res.weight
    job.originals.setdefault(name, module.weight.data.detach().to("cpu", copy=True))
    set_weight(module, Q)
    wn = float(W.norm())
    rep = LayerReport(
        name=name, block=block_idx, group=group_idx, shape=tuple(W.shape), bits=cfg_l.bits,
        group_size=cfg_l.group_size, sym=cfg_l.sym, method=qm.method, **stats,
        damp_percent_used=res.damp_percent_used,
        loss=None if res.losses is None else float(res.losses.sum()),
        weight_rel_error=float((W - Q).norm()) / wn if wn > 0 else 0.0,
    )  # fmt: skip
    if H is not None:
        rep.output_mse, rep.output_rel_error = _output_errors(W, Q, H)
    rep.seconds = time.perf_counter() - t0
    qm.results[name] = _result_to_cpu(res, module)
    qm.layers.append(rep)


def _rtn_without_data(job: _Job, blocks):
    from tqdm.auto import tqdm

    ad = job.adapter
    for i, block in enumerate(tqdm(blocks, desc="rtn", unit="block", disable=not job.progress)):
        linears = ad.linears(block)
        for gi, group in enumerate(ad.groups(True)):
            for rel in group:
                job.check_cancel()
                _quantize_layer(job, f"{ad.block_prefix(i)}.{rel}", i, gi, linears[rel])


def _single_pass_bytes(model, nsamples: int, seqlen: int) -> int:
    """Rough peak activation memory of one block run on the whole calibration set at once (float32)."""
    c = model.config
    hidden = c.hidden_size
    inter = next(
        (v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(c, k, None))), 4 * hidden
    )
    return nsamples * seqlen * (3 * inter + 8 * hidden) * 4


def _single_pass_fits(model, nsamples: int, seqlen: int, device) -> bool:
    need = _single_pass_bytes(model, nsamples, seqlen)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need <= 0.25 * free
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 8 << 30
    return need <= min(4 << 30, 0.3 * avail)


def _single_pass_block(job: _Job, i, block, linears, groups, inps, extra, tm, bar):
    """Quantize one block in a single forward over all samples: a pre-hook on each group's linears
    collects the Hessian from the group's input and quantizes the whole group before the first of them
    runs, so everything downstream already sees quantized weights (true-sequential semantics)."""
    from ..engine import Hessian

    ad, qm, device = job.adapter, job.qm, job.device
    seen: dict[int, torch.Tensor] = {}  # group index -> its input (the members must all share it)
    spent = {"q": 0.0, "h": 0.0}

    group_of = {r: gi for gi, g in enumerate(groups) for r in g}

    def before_linear(call: HookCall) -> None:
        gi, rel = group_of[call.name], call.name
        x = call.input
        if gi in seen:
            if x is not seen[gi]:
                raise RuntimeError(
                    f"{ad.block_prefix(i)}.{rel} does not share its input with the rest of its group "
                    f"{groups[gi]}; run quantize_model with single_pass=False"
                )
            return
        job.check_cancel()
        seen[gi] = x
        t0 = time.perf_counter()
        H = Hessian(x.shape[-1], backend="torch", device=device).add_batch(x).H
        spent["h"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        owner = f"{ad.block_prefix(i)}.{groups[gi][0]}"
        stats = _hessian_stats(H, job.cfgs[owner].damp_percent, job.hessian_condition)
        qm.memory["hessian_bytes_max_group"] = max(qm.memory["hessian_bytes_max_group"], H.numel() * 4)
        if job.keep_hessians:
            job.hessians[owner] = H.detach().cpu()
        for r in groups[gi]:
            name = f"{ad.block_prefix(i)}.{r}"
            bar.set_postfix_str(name)
            if name != owner:
                job.alias[name] = owner
            _quantize_layer(job, name, i, gi, linears[r], H, dict(stats))
        spent["q"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    with hooks({r: linears[r] for g in groups for r in g}, before_linear, when="before"):
        job.check_cancel()
        out = run_block(block, inps.to(device), extra)
    missing = [g for gi, g in enumerate(groups) if gi not in seen]
    if missing:
        raise RuntimeError(f"block {i}: the linears {missing} never ran, so they were not quantized")
    tm["quantize"] += spent["q"]
    tm["hessian"] = tm.get("hessian", 0.0) + spent["h"]
    tm["forward"] += time.perf_counter() - t0 - spent["q"] - spent["h"]
    return out.to(inps.device)


def _sequential(job: _Job, blocks, calib_ids):
    from tqdm.auto import tqdm

    qm, ad, device, home, bs = job.qm, job.adapter, job.device, job.home, job.batch_size
    tm = {"catch": 0.0, "forward": 0.0, "quantize": 0.0}
    t0 = time.perf_counter()
    caught = catch_block_inputs(qm.model, calib_ids, ad, batch_size=bs, device=device)
    tm["catch"] = time.perf_counter() - t0
    # activations stay on the CPU when blocks are streamed to a GPU; otherwise where they are
    inps = caught.hidden.to("cpu") if device != home and device.type == "cuda" else caught.hidden
    outs = None if job.single_pass else torch.empty_like(inps)
    extra = BlockInputs(inps, _to(caught.args, device), _to(caught.kwargs, device))
    del caught
    qm.memory["activation_buffers_bytes"] = 2 * inps.numel() * inps.element_size()
    qm.memory["single_pass"] = job.single_pass
    qm.memory["hessian_bytes_max_group"] = 0
    groups = ad.groups(qm.true_sequential)
    bar = tqdm(
        total=len(blocks), desc=f"{qm.method} {qm.config.label()}", unit="block", disable=not job.progress
    )
    try:
        for i, block in enumerate(blocks):
            if device != home:
                block.to(device)
            linears = ad.linears(block)
            if job.single_pass:
                inps = _single_pass_block(job, i, block, linears, groups, inps, extra, tm, bar)
                if device != home:
                    block.to(home)
                bar.update(1)
                continue
            for gi, group in enumerate(groups):
                t0 = time.perf_counter()
                coll = _GroupCollector({rel: linears[rel] for rel in group}, device)
                with hooks(coll.modules, coll.hook):
                    _forward_pass(block, inps, extra, device, bs, job.cancel, collector=coll)
                tm["forward"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                owners: dict[int, tuple] = {}  # id(Hessian) -> (owner layer, stats); coll keeps them alive
                group_bytes = 0
                for rel in group:
                    name = f"{ad.block_prefix(i)}.{rel}"
                    bar.set_postfix_str(name)
                    h = coll.hessians[rel]
                    H = h.H
                    if id(h) in owners:  # shares its input with an earlier layer of the group
                        job.alias[name] = owners[id(h)][0]
                        stats = owners[id(h)][1]
                    else:
                        group_bytes += H.numel() * H.element_size()
                        stats = _hessian_stats(H, job.cfgs[name].damp_percent, job.hessian_condition)
                        owners[id(h)] = (name, stats)
                        if job.keep_hessians:
                            job.hessians[name] = H.detach().cpu()
                    job.check_cancel()
                    _quantize_layer(job, name, i, gi, linears[rel], H, dict(stats))
                del coll, owners
                qm.memory["hessian_bytes_max_group"] = max(qm.memory["hessian_bytes_max_group"], group_bytes)
                tm["quantize"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            _forward_pass(block, inps, extra, device, bs, job.cancel, out=outs)  # the next block's inputs
            tm["forward"] += time.perf_counter() - t0
            inps, outs = outs, inps
            if device != home:
                block.to(home)
            bar.update(1)
    finally:
        bar.close()
    qm.timings = tm


# ---------------------------------------------------------------------------------------------------------
# on-disk cache: results (+ Hessians) keyed by sha256 of (model weights, data, config)


def _sha_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(
        t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes()
    )


def cache_key(model, calib_ids, cfg, method, true_sequential, overrides) -> str:
    """sha256 over everything that determines the result: the model's weights, the calibration ids, the
    config, the method and the overrides (and the cache format version)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "type": model.config.model_type,
                "cfg": cfg.to_dict(),
                "method": method,
                "true_sequential": bool(true_sequential),
                "overrides": {k: dict(v) for k, v in (overrides or {}).items()},
            },
            sort_keys=True,
        ).encode()
    )
    for name, p in model.state_dict(keep_vars=False).items():
        h.update(name.encode())
        _sha_tensor(h, p)
    h.update(b"no-data" if calib_ids is None else b"data")
    if calib_ids is not None:
        _sha_tensor(h, torch.as_tensor(calib_ids, dtype=torch.long))
    return h.hexdigest()[:32]


_RESULT_FIELDS = ("codes", "scales", "zeros", "g_idx", "perm", "losses")


def _save_cached(qm: QuantizedModel, folder: Path, hessians: dict | None, alias: dict | None) -> None:
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tensors, meta = {}, {}
        for name, r in qm.results.items():
            for f in _RESULT_FIELDS:
                v = getattr(r, f)
                if isinstance(v, torch.Tensor):
                    v = v.to(torch.uint8) if f == "codes" and r.config.bits <= 8 else v
                    tensors[f"{name}::{f}"] = v.contiguous()
            meta[name] = {
                "config": r.config.to_dict(),
                "method": r.method,
                "damp_percent_used": r.damp_percent_used,
            }
        save_file(tensors, str(tmp / "results.safetensors"))
        if hessians:
            save_file({k: v.contiguous() for k, v in hessians.items()}, str(tmp / "hessians.safetensors"))
        info = {
            "format": CACHE_FORMAT,
            "method": qm.method,
            "config": qm.config.to_dict(),
            "true_sequential": qm.true_sequential,
            "overrides": qm.overrides,
            "nsamples": qm.nsamples,
            "seqlen": qm.seqlen,
            "seconds": qm.seconds,
            "timings": qm.timings,
            "memory": qm.memory,
            "results": meta,
            "layers": qm.report_rows(),
            "hessian_alias": alias or {},
        }
        (tmp / "report.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "report.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(qm: QuantizedModel, folder: Path) -> bool:
    from safetensors.torch import load_file

    from ..engine import QuantConfig, QuantResult

    if not (folder / "report.json").is_file():
        return False
    try:  # read and check everything before touching the model
        info = json.loads((folder / "report.json").read_text())
        tensors = load_file(str(folder / "results.safetensors"))
        results = {}
        for name, meta in info["results"].items():
            parts = {f: tensors.get(f"{name}::{f}") for f in _RESULT_FIELDS}
            parts["codes"] = parts["codes"].to(torch.uint8 if meta["config"]["bits"] <= 8 else torch.int32)
            res = QuantResult(
                weight=None,
                **parts,
                config=QuantConfig.from_dict(meta["config"]),
                method=meta["method"],
                damp_percent_used=meta["damp_percent_used"],
            )
            res.weight = res.dequantize().to(torch.float32)
            results[name] = res
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in info["layers"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        warnings.warn(f"cache entry {folder} is damaged ({exc}); recomputing it", RuntimeWarning,
                      stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    mods = dict(qm.model.named_modules())
    with torch.no_grad():
        for name, res in results.items():
            set_weight(mods[name], res.weight)
            qm.results[name] = _result_to_cpu(res, mods[name])  # one copy of the weight, as after a run
    qm.layers = layers
    qm.timings, qm.memory = info.get("timings", {}), info.get("memory", {})
    qm.from_cache = True
    return True


def load_cached_hessians(cache_dir, key: str) -> dict[str, torch.Tensor]:
    """Module path -> Hessian (2/n sum x x^T of its calibration inputs) of a cached run; layers that share
    an input (k, v, q) share one tensor."""
    from safetensors.torch import load_file

    folder = Path(cache_dir) / key
    path = folder / "hessians.safetensors"
    if not path.is_file():
        return {}
    hs = load_file(str(path))
    alias = json.loads((folder / "report.json").read_text()).get("hessian_alias", {})
    hs.update({name: hs[owner] for name, owner in alias.items()})
    return hs
