"""The sequential method, block by block (see models/quantize.py for the whole story): Hessian collection with
hooks, one layer's quantization and report, and the two schedules that give the same result: the single
pass (one block forward, in turns of a few samples that wait for each other at each group, where a
pre-hook quantizes the group once every turn's input is in; GPTAQ first runs the block once more with its
original weights, keeping each group's full-precision input) and the paper's loop (one pass per group plus
one for the outputs). RTN without data quantizes every linear directly."""

from __future__ import annotations

import copy
import functools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import (
    Adapter,
    BlockInputs,
    _to,
    catch_block_inputs,
    get_weight,
    run_block,
    set_weight,
)
from .capture import (
    HookCall,
    StopForward,
    TurnsDiverged,
    hooks,
    park,
    run_in_turns,
    run_until_stopped,
    turn_index,
)
from .quantize_results import LayerReport, QuantizationCancelled, QuantizedModel, _result_to_cpu

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
        self.peak_bytes = 0  # the most one batch's inputs kept alive (GPTAQ reports it for the FP stream)

    def hook(self, call: HookCall) -> None:
        # the very tensor, not a .detach() of it (a new object each call): flush() tells a shared input by
        # identity (no gradients here: every pass runs under torch.no_grad)
        self._inputs[call.name] = call.input
        if len(self._inputs) == len(self.modules):
            self.peak_bytes = max(self.peak_bytes, _distinct_bytes(self._inputs.values()))
            raise StopForward

    def flush(self, fp_inputs: dict | None = None) -> None:
        """Add the batch's inputs to the Hessians; fp_inputs (GPTAQ): the same linears' inputs in the
        full-precision block, for dXXT."""
        seen: list[tuple[torch.Tensor, Any]] = []
        for name in self.modules:
            x = self._inputs[name]
            h = next((h for t, h in seen if t is x), None)
            if h is None:
                if name not in self.hessians:
                    self.hessians[name] = self._Hessian(x.shape[-1], backend="torch", device=self.device)
                h = self.hessians[name]
                h.add_batch(x, X_fp=None if fp_inputs is None else fp_inputs[name])
                seen.append((x, h))
            elif name not in self.hessians:
                self.hessians[name] = h
        self._inputs.clear()
        if fp_inputs is not None:
            fp_inputs.clear()


def _distinct_bytes(tensors) -> int:
    """Memory the tensors keep alive: each storage once (k, v, q see the very same input)."""
    storages = {}
    for t in tensors:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------------------
# cancelling, one layer's statistics, one batched pass, one layer's quantization


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


def _forward_pass(block, inps, kwargs_dev, device, batch_size, cancel, collector=None, out=None, fp=None,
                  tm=None):
    """Run block over all samples in batches; with a collector, feed its Hessians (the pass stops after the
    group's last linear); with out, store the block's outputs. fp (GPTAQ): (full-precision block, its
    inputs, a collector of its linears' inputs), run on the same batch first, so each Hessian also gets
    the full-precision inputs of the same tokens; its time goes to tm["forward_fp"]."""
    for i in range(0, inps.shape[0], batch_size):
        if _cancelled(cancel):
            raise QuantizationCancelled("cancelled")
        if fp is not None:
            fp_block, fp_inps, fp_coll = fp
            t0 = time.perf_counter()
            with hooks(fp_coll.modules, fp_coll.hook):
                run_until_stopped(run_block, fp_block, fp_inps[i : i + batch_size].to(device), kwargs_dev)
            tm["forward_fp"] = tm.get("forward_fp", 0.0) + time.perf_counter() - t0
        x = inps[i : i + batch_size].to(device)
        y = run_until_stopped(run_block, block, x, kwargs_dev)
        if collector is not None:
            collector.flush(None if fp is None else fp[2]._inputs)
        if out is not None:
            out[i : i + batch_size] = y.to(out.device, out.dtype)


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
    gptaq: bool = False  # carry the full-precision model's activations too (GPTAQ)
    compact: bool = True  # the kept results' layout (models.quantize.COMPACT_RESULTS)
    originals: dict = field(default_factory=dict)  # weights we changed (CPU copies), to restore on failure
    hessians: dict = field(default_factory=dict)  # owner layer -> H, when caching
    alias: dict = field(default_factory=dict)  # layer -> owner layer, for layers sharing an input (k, v, q)

    def check_cancel(self):
        if _cancelled(self.cancel):
            raise QuantizationCancelled("cancelled")


def _quantize_layer(job: _Job, name, block_idx, group_idx, module, H=None, stats=None, dXXT=None):
    from ..engine import gptq_quantize, rtn_quantize

    qm, cfg_l, device = job.qm, job.cfgs[name], job.device
    t0 = time.perf_counter()
    W = get_weight(module).detach().to(device=device, dtype=torch.float32, copy=True)
    if stats is None:
        stats = _hessian_stats(H, cfg_l.damp_percent, job.hessian_condition) if H is not None else {}
    if qm.method == "gptq":
        res = gptq_quantize(W, H, cfg_l, dXXT=dXXT if cfg_l.gptaq_alpha > 0 else None, backend="torch",
                            device=device)
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
    qm.results[name] = _result_to_cpu(res, module, job.compact)
    qm.layers.append(rep)


# ---------------------------------------------------------------------------------------------------------
# the schedules: RTN without data, the single pass, the paper's loop


def _rtn_without_data(job: _Job, blocks):
    from tqdm.auto import tqdm

    ad = job.adapter
    for i, block in enumerate(tqdm(blocks, desc="rtn", unit="block", disable=not job.progress)):
        linears = ad.linears(block)
        for gi, group in enumerate(ad.groups(True)):
            for rel in group:
                job.check_cancel()
                _quantize_layer(job, f"{ad.block_prefix(i)}.{rel}", i, gi, linears[rel])


# The single pass runs a block over the samples in turns (models.capture.run_in_turns) that meet at each
# group: on a CPU, as many whole samples per turn as keep the widest activation (tokens x the MLP's width,
# float32) within TURN_BYTES. glibc serves an allocation above 32 MB with a fresh mapping, faulted in 4 KB
# at a time on every forward; within a few MB a turn's tensors are reused from malloc's heap and stay in
# cache. On a GPU one turn takes every sample (its memory was checked by _single_pass_fits).
TURN_BYTES = 16 << 20


def _widths(model) -> tuple[int, int]:
    """(hidden size, the MLP's intermediate size) from the model's config."""
    c = model.config
    hidden = c.hidden_size
    inter = next(
        (v for k in ("intermediate_size", "ffn_dim", "n_inner") if (v := getattr(c, k, None))), 4 * hidden
    )
    return hidden, inter


def _samples_per_turn(model, seqlen: int) -> int:
    """Whole samples per turn on a CPU: as many as keep the widest activation within TURN_BYTES."""
    return max(1, TURN_BYTES // (seqlen * max(_widths(model)) * 4))


def _turns(job: _Job, nsamples: int, seqlen: int) -> list[slice]:
    """The single pass's turns: slices of whole samples (one slice on a GPU)."""
    if job.device.type == "cuda":
        return [slice(0, nsamples)]
    step = _samples_per_turn(job.qm.model, seqlen)
    return [slice(s, min(s + step, nsamples)) for s in range(0, nsamples, step)]


def _single_pass_bytes(model, nsamples: int, seqlen: int, gptaq: bool = False) -> int:
    """Rough peak activation memory of one block run on the whole calibration set at once (float32), a
    bound the turns keep well under; gptaq: plus the full-precision inputs kept for the quantized pass
    (q/k/v, o, gate/up: hidden each, down: intermediate) and the full-precision stream's hidden states."""
    hidden, inter = _widths(model)
    per_token = 3 * inter + 8 * hidden + (inter + 4 * hidden if gptaq else 0)
    return nsamples * seqlen * per_token * 4


def _single_pass_fits(model, nsamples: int, seqlen: int, device, gptaq: bool = False) -> bool:
    need = _single_pass_bytes(model, nsamples, seqlen, gptaq)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need <= 0.25 * free
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 8 << 30
    return need <= min(4 << 30, 0.3 * avail)


def _group_input_hook(job: _Job, i, groups, on_first):
    """A pre-hook for a single pass over block i, run in turns: on_first(gi, x) with a turn's input of
    group gi the first time one of its linears runs in that turn; a later member must get the very same
    tensor (the single pass gives a group one Hessian, built before any member runs). Returns the hook
    and the groups it has seen."""
    group_of = {r: gi for gi, g in enumerate(groups) for r in g}
    seen: dict[tuple, weakref.ref] = {}  # (turn, group) -> its input; weak: the turn owns the tensor
    groups_seen: set[int] = set()

    def before_linear(call: HookCall) -> None:
        gi, x = group_of[call.name], call.input
        key = (turn_index(), gi)
        if key in seen:
            if x is not seen[key]():
                raise RuntimeError(
                    f"{job.adapter.block_prefix(i)}.{call.name} does not share its input with the rest of "
                    f"its group {groups[gi]}; run quantize_model with single_pass=False"
                )
            return
        job.check_cancel()
        seen[key] = weakref.ref(x)
        groups_seen.add(gi)
        on_first(gi, x)

    return before_linear, groups_seen


def _in_turns(job: _Job, i, block, inps, extra, hook, linears, groups, on_all=None) -> torch.Tensor:
    """Block i over inps in turns (_turns), hook on every linear of the groups before it runs; returns
    the block's outputs (on inps' device). on_all(gi): every turn has parked at group gi (see
    models.capture.run_in_turns)."""
    out = torch.empty_like(inps)

    def forward(sl: slice) -> None:
        out[sl] = run_block(block, inps[sl].to(job.device), extra).to(out.device, out.dtype)

    try:
        with hooks({r: linears[r] for g in groups for r in g}, hook, when="before"):
            job.check_cancel()
            run_in_turns([functools.partial(forward, sl) for sl in _turns(job, *inps.shape[:2])], on_all)
    except TurnsDiverged as e:
        raise RuntimeError(f"block {i}: {e}; run quantize_model with single_pass=False") from e
    return out


def _fp_pass_block(job: _Job, i, block, linears, groups, fp_inps, extra, tm):
    """GPTAQ's full-precision stream in the single pass: block i, its weights still the original ones, run
    over all samples (in the quantized pass's turns); returns ({(turn, group): (its input, that tensor's
    version)}, the block's outputs). The quantized pass then pairs each kept input with its own for dXXT,
    so the full-precision block never has to run again, nor be copied."""
    kept: dict[tuple, tuple] = {}
    # with its version: an in-place write later in the block would make it something else than the input
    hook, _ = _group_input_hook(job, i, groups,
                                lambda gi, x: kept.__setitem__((turn_index(), gi), (x, x._version)))
    t0 = time.perf_counter()
    out = _in_turns(job, i, block, fp_inps, extra, hook, linears, groups)
    spent = time.perf_counter() - t0
    tm["forward"] += spent
    tm["forward_fp"] = tm.get("forward_fp", 0.0) + spent
    mem, kept_bytes = job.qm.memory, _distinct_bytes(x for x, _ in kept.values())
    mem["gptaq_fp_inputs_bytes"] = max(mem["gptaq_fp_inputs_bytes"], kept_bytes)
    return kept, out


def _single_pass_block(job: _Job, i, block, linears, groups, inps, extra, tm, bar, fp_in=None):
    """Quantize one block in a single forward over all samples, run in turns that meet at each group: a
    pre-hook on each group's linears adds a turn's input to the group's Hessian and parks the turn; once
    every turn is there the whole group is quantized, before the first of them runs, so everything
    downstream already sees quantized weights (true-sequential semantics).
    fp_in (GPTAQ): the groups' full-precision inputs per turn from _fp_pass_block, for each Hessian's
    dXXT; each is dropped once it has been added."""
    from ..engine import Hessian

    device = job.device
    spent = {"q": 0.0, "h": 0.0}
    hessians: dict[int, Hessian] = {}

    def add_input(gi: int, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        h = hessians.setdefault(gi, Hessian(x.shape[-1], backend="torch", device=device))
        if fp_in is None:
            h.add_batch(x)
        else:
            x_fp, version = fp_in.pop((turn_index(), gi))
            if x_fp._version != version:  # a later op of the block wrote into it: no longer its input
                raise RuntimeError(f"block {i}: the full-precision input of {groups[gi]} was changed in "
                                   "place after they ran; run quantize_model with single_pass=False")
            h.add_batch(x, X_fp=x_fp)
            del x_fp
        spent["h"] += time.perf_counter() - t0
        park(gi)  # until every turn has added its input: then quantize_group(gi) has run

    def quantize_group(gi: int) -> None:
        t0 = time.perf_counter()
        h = hessians.pop(gi)  # every linear of a group sees the same input: one Hessian
        _quantize_group(job, i, gi, dict.fromkeys(groups[gi], h), linears, bar)
        spent["q"] += time.perf_counter() - t0

    hook, seen = _group_input_hook(job, i, groups, add_input)
    t0 = time.perf_counter()
    out = _in_turns(job, i, block, inps, extra, hook, linears, groups, quantize_group)
    missing = [g for gi, g in enumerate(groups) if gi not in seen]
    if missing:
        raise RuntimeError(f"block {i}: the linears {missing} never ran, so they were not quantized")
    tm["quantize"] += spent["q"]
    tm["hessian"] = tm.get("hessian", 0.0) + spent["h"]
    tm["forward"] += time.perf_counter() - t0 - spent["q"] - spent["h"]
    return out


def _quantize_group(job: _Job, i, gi, hessians: dict, linears, bar) -> None:
    """Quantize block i's linears named in `hessians` (block-relative name -> engine Hessian, in order), for
    both schedules. Linears that share an input (k, v, q) share one Hessian object: its H, dXXT and
    statistics are made, and H kept, once, under the first of them (the owner); the others are recorded as
    its aliases."""
    qm, ad = job.qm, job.adapter
    owners: dict[int, tuple] = {}  # id(Hessian) -> (owner layer, H, dXXT, stats)
    group_bytes = 0
    for rel, h in hessians.items():
        name = f"{ad.block_prefix(i)}.{rel}"
        bar.set_postfix_str(name)
        if id(h) in owners:  # shares its input with an earlier layer of the group
            owner, H, dXXT, stats = owners[id(h)]
            job.alias[name] = owner
        else:
            H, dXXT = h.H, (h.dXXT if job.gptaq else None)
            stats = _hessian_stats(H, job.cfgs[name].damp_percent, job.hessian_condition)
            owners[id(h)] = (name, H, dXXT, stats)
            group_bytes += sum(t.numel() * t.element_size() for t in (H, dXXT) if t is not None)
            if job.keep_hessians:
                job.hessians[name] = H.detach().cpu()
        job.check_cancel()
        _quantize_layer(job, name, i, gi, linears[rel], H, dict(stats), dXXT)
    qm.memory["hessian_bytes_max_group"] = max(qm.memory["hessian_bytes_max_group"], group_bytes)


def _papers_loop_block(job: _Job, i, block, linears, groups, inps, outs, extra, tm, bar, fp=None) -> None:
    """Quantize one block the paper's way, in batches of job.batch_size: per group, one pass (stopped after
    the group's last linear) collects the group's Hessians, then the group is quantized; a final pass
    writes the block's outputs, all its weights quantized, into outs (the next block's inputs).
    fp (GPTAQ): (the full-precision stream's inputs, outputs): a copy of the block with its original weights
    runs beside it, giving each Hessian its dXXT and the next block its full-precision inputs."""
    device, bs = job.device, job.batch_size
    fp_block = copy.deepcopy(block) if fp is not None else None  # before any of its weights change
    for gi, group in enumerate(groups):
        t0 = time.perf_counter()
        coll = _GroupCollector({rel: linears[rel] for rel in group}, device)
        fp_pass = None
        if fp is not None:
            fp_linears = job.adapter.linears(fp_block)
            fp_pass = (fp_block, fp[0], _GroupCollector({rel: fp_linears[rel] for rel in group}, device))
        with hooks(coll.modules, coll.hook):
            _forward_pass(block, inps, extra, device, bs, job.cancel, collector=coll, fp=fp_pass, tm=tm)
        tm["forward"] += time.perf_counter() - t0
        if fp_pass is not None:
            mem = job.qm.memory
            mem["gptaq_fp_inputs_bytes"] = max(mem["gptaq_fp_inputs_bytes"], fp_pass[2].peak_bytes)
        t0 = time.perf_counter()
        _quantize_group(job, i, gi, {rel: coll.hessians[rel] for rel in group}, linears, bar)
        del coll, fp_pass  # free the group's Hessians before the next group collects its own
        tm["quantize"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    _forward_pass(block, inps, extra, device, bs, job.cancel, out=outs)  # the next block's inputs
    if fp is not None:
        t1 = time.perf_counter()
        _forward_pass(fp_block, fp[0], extra, device, bs, job.cancel, out=fp[1])
        tm["forward_fp"] = tm.get("forward_fp", 0.0) + time.perf_counter() - t1
    tm["forward"] += time.perf_counter() - t0


def _sequential(job: _Job, blocks, calib_ids):
    """Catch block 0's inputs, then quantize the blocks in order, each calibrated on the outputs of the
    (already quantized) blocks before it; per block, the single pass or the paper's loop. GPTAQ carries
    the full-precision model's hidden states beside the quantized ones: in the single pass each block runs
    once on each stream (_fp_pass_block first, while its weights are the original ones); the loop runs a
    copy of the block beside every pass."""
    from tqdm.auto import tqdm

    qm, ad, device, home, bs = job.qm, job.adapter, job.device, job.home, job.batch_size
    tm = {"catch": 0.0, "forward": 0.0, "quantize": 0.0}
    t0 = time.perf_counter()
    caught = catch_block_inputs(qm.model, calib_ids, ad, batch_size=bs, device=device)
    tm["catch"] = time.perf_counter() - t0
    # activations stay on the CPU when blocks are streamed to a GPU; otherwise where they are
    inps = caught.hidden.to("cpu") if device != home and device.type == "cuda" else caught.hidden
    outs = None if job.single_pass else torch.empty_like(inps)
    # GPTAQ: the full-precision model's activations (inputs, outputs), carried block by block beside the
    # quantized ones; the single pass makes new outputs each block, the loop writes into fixed buffers
    fp = None
    if job.gptaq:
        fp = (inps, None) if job.single_pass else (inps.clone(), torch.empty_like(inps))
    extra = BlockInputs(inps, _to(caught.args, device), _to(caught.kwargs, device))
    del caught
    # hidden-state buffers alive at once: in and out per stream (the single pass's GPTAQ frees the
    # full-precision inputs before the quantized stream makes its outputs: three)
    n_buffers = 2 if fp is None else (3 if job.single_pass else 4)
    qm.memory["activation_buffers_bytes"] = n_buffers * inps.numel() * inps.element_size()
    qm.memory["gptaq_streams"] = 2 if fp else 1
    qm.memory["single_pass"] = job.single_pass
    qm.memory["hessian_bytes_max_group"] = 0
    if fp is not None:  # the most the full-precision stream's kept linear inputs took at once
        qm.memory["gptaq_fp_inputs_bytes"] = 0
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
                fp_in = None
                if fp is not None:
                    fp_in, fp_out = _fp_pass_block(job, i, block, linears, groups, fp[0], extra, tm)
                    fp = (fp_out, None)
                inps = _single_pass_block(job, i, block, linears, groups, inps, extra, tm, bar, fp_in)
            else:
                _papers_loop_block(job, i, block, linears, groups, inps, outs, extra, tm, bar, fp)
                inps, outs = outs, inps
                fp = None if fp is None else (fp[1], fp[0])
            if device != home:
                block.to(home)
            bar.update(1)
    finally:
        bar.close()
    qm.timings = tm
