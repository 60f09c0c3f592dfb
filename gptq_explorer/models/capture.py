"""Activation capture: named forward hooks that always come off, and one way to stop a forward pass.

Everything in the package that looks inside a running model goes through this module (in the spirit of
TransformerLens' hook points: hook functions attached to named modules for the duration of a run):

    hooks({name: module}, fn, when="after")   context manager: registers fn on every module, removes
                                              every hook on exit (also on an exception). fn(call) gets a
                                              HookCall: .name, .module, .args, .kwargs, .output (None for
                                              when="before"), and .input (the first positional argument,
                                              e.g. a linear's x or a block's hidden states).
                                              when="before" runs fn before the module's forward
                                              (a pre-hook: the weights may still be changed there).
    StopForward                               raise it from a hook to end the forward pass right there
                                              (nothing after that module runs).
    run_until_stopped(fn, *args, **kwargs)    fn(*args, **kwargs) under torch.no_grad(); returns its
                                              output, or None when a hook raised StopForward.
    capture_inputs(model, {name: module}, ids, batch_size=8, stop=True, should_cancel=None,
                   progress=None)             the common case: run a causal LM on token windows ids
                                              (windows, seqlen) batch by batch and return what each module
                                              receives, {name: (tokens, d_in) float32 NumPy}; with stop,
                                              a batch's forward pass ends once every module has fired.
                                              should_cancel() is polled before each batch (True raises
                                              Cancelled); progress(fraction) is called after each one.
    Cancelled                                 what capture_inputs (and the services built on it) raise when
                                              should_cancel() says stop.
    clean_copy(model)                         a deep copy with no hooks on it, in eval mode.
    run_in_turns(fns, on_all)                 run the callables fns (say, one block forward per batch of
                                              samples) in turns; a hook inside one may call park(key):
                                              that forward waits there until all of them wait at key,
                                              then on_all(key) runs once and they go on. turn_index()
                                              says which one is running (None outside the turns).

Typical uses:

    with hooks({"q": block.self_attn.q_proj}, lambda c: seen.append(c.input)):
        model(ids)                              # record, let the model finish

    def stop_at_q(call):
        seen.append(call.input)
        raise StopForward
    with hooks({"q": q_proj}, stop_at_q):
        run_until_stopped(model, input_ids=ids, use_cache=False)   # nothing after q_proj runs

    X = capture_inputs(lm.model, {"q": q_proj, "k": k_proj}, ids)["q"]      # (tokens, d_in)

Turns let one forward pass over many samples run as several smaller ones that meet at chosen points:
whole-model GPTQ needs a group's input over every sample before the group runs, and one forward over all
samples at once makes tensors of hundreds of MB that glibc maps afresh, and the kernel faults in, each time
(docs/performance.md, "Whole models"). Each turn is a greenlet: the same OS thread, so torch's thread pool
and grad mode are shared, and a turn costs no thread. Thread-local state that a forward sets around a
point where it parks (an autocast region, say) would leak into the other turns: park only in hooks of
modules that run outside such regions (a block's linears).

Hooks live on the module objects, so a second capture on the same (shared) model in another thread sees
the first one's hooks: callers that share a model serialise their captures (services.layer_source holds a
lock) or work on clean_copy(model).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported when a capture runs, not with this module (Cancelled is torch-free)
    import torch
    from torch import nn

WHEN = ("before", "after")


class StopForward(Exception):
    """Raised by a hook to end the forward pass once it has what it wants (see run_until_stopped)."""


class Cancelled(Exception):
    """should_cancel() said stop (the user pressed Cancel); nothing partial is returned."""


@dataclass
class HookCall:
    """One call of a hooked module, as a hook function sees it."""

    name: str  # the name the module was given in hooks({name: module}, ...)
    module: nn.Module
    args: tuple  # positional arguments of the call
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the call
    output: Any = None  # what the module returned (None in a "before" hook: it has not run yet)

    @property
    def input(self) -> Any:
        """The first positional argument (a linear's x, a block's hidden states); for a module called
        with keywords only, the `hidden_states` or `input` keyword."""
        if self.args:
            return self.args[0]
        for key in ("hidden_states", "input"):
            if key in self.kwargs:
                return self.kwargs[key]
        raise ValueError(f"{self.name}: called without a positional input (keywords: {sorted(self.kwargs)})")


@contextlib.contextmanager
def hooks(modules: Mapping[str, nn.Module], fn: Callable[[HookCall], None], when: str = "after"
          ) -> Iterator[None]:
    """Call fn(HookCall) at every forward of each named module while the block runs; every hook is
    removed on exit, whatever happens. when: "after" (a forward hook: the call's output is there) or
    "before" (a forward pre-hook, before the module computes). fn's return value is ignored; raise
    StopForward from it to end the forward pass."""
    if when not in WHEN:
        raise ValueError(f"when must be one of {list(WHEN)}, got {when!r}")
    handles = []
    try:
        for name, module in modules.items():
            if when == "before":
                def pre(mod, args, kwargs, _name=name):
                    fn(HookCall(_name, mod, args, kwargs))

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(mod, args, kwargs, output, _name=name):
                    fn(HookCall(_name, mod, args, kwargs, output))

                handles.append(module.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until_stopped(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs) (a model, a block, anything that calls hooked modules) under torch.no_grad().
    Returns its output, or None when a hook ended the pass with StopForward."""
    import torch

    with torch.no_grad():
        try:
            return fn(*args, **kwargs)
        except StopForward:
            return None


class TurnsDiverged(RuntimeError):
    """run_in_turns: the turns did not all park at the same place (or some finished while others parked)."""


def turn_index() -> int | None:
    """The index of the turn running now (see run_in_turns); None outside the turns."""
    import greenlet

    return getattr(greenlet.getcurrent(), "turn_index", None)  # set on the greenlets run_in_turns starts


def park(key: Any) -> None:
    """From a hook inside a turn: wait here until every unfinished turn has parked at key (compared with ==);
    run_in_turns then calls on_all(key) once and resumes the turns in order."""
    import greenlet

    if turn_index() is None:
        raise RuntimeError("park() was called outside run_in_turns: there is no other turn to wait for")
    greenlet.getcurrent().parent.switch(key)


def run_in_turns(fns: list[Callable[[], Any]], on_all: Callable[[Any], None] | None = None) -> list[Any]:
    """Call each of fns in a turn of its own (a greenlet), in order, and return their results. A turn that
    calls park(key) stops there; when all unfinished turns have stopped at the same key, on_all(key) runs
    and they go on, in order, to their next park or their end. A turn that never parks just runs through.
    Turns that stop at different keys, or finish while others wait, raise TurnsDiverged. An exception in
    a turn or in on_all propagates; the turns still waiting are then unwound (GreenletExit) first."""
    import greenlet

    turns = []
    for k, fn in enumerate(fns):
        g = greenlet.greenlet(fn)
        g.turn_index = k
        g.gr_context = contextvars.copy_context()  # a new greenlet would start with an empty context
        turns.append(g)
    results: list[Any] = [None] * len(turns)
    waiting = list(range(len(turns)))
    try:
        while waiting:
            parked: dict[int, Any] = {}
            for k in waiting:
                value = turns[k].switch()
                if turns[k].dead:
                    results[k] = value
                else:
                    parked[k] = value
            if parked:
                first, key = next(iter(parked.items()))
                odd = [(k, parked.get(k, "its end")) for k in waiting if k not in parked or parked[k] != key]
                if odd:
                    k, where = odd[0]
                    raise TurnsDiverged(f"turn {first} waits at {key!r} but turn {k} reached {where!r}: the "
                                        "turns must run the same hooked modules in the same order")
                if on_all is not None:
                    on_all(key)
            waiting = list(parked)
    finally:
        for g in turns:
            if not g.dead:
                g.throw()  # GreenletExit inside the waiting turn: its frames unwind, its finally blocks run
    return results


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_numpy_rows(x: torch.Tensor) -> np.ndarray:
    import torch

    x = x.detach()
    return x.reshape(-1, x.shape[-1]).to("cpu", torch.float32).numpy()


def capture_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    ids: torch.Tensor,
    batch_size: int = 8,
    *,
    stop: bool = True,
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, np.ndarray]:
    """What each named module receives when the causal LM `model` runs on token windows `ids`
    (windows, seqlen): {name: (tokens, d_in) float32 NumPy}, rows in token order.

    One forward pass per batch of `batch_size` windows (on the model's device). With `stop`, the pass ends
    as soon as every module has fired (only the model up to the last of them runs). should_cancel() is
    polled before each batch (True raises Cancelled); progress(fraction done) is called after each.
    A module the forward pass never reaches raises RuntimeError.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    fired: set[str] = set()

    def record(call: HookCall) -> None:
        chunks[call.name].append(_as_numpy_rows(call.input))
        fired.add(call.name)
        if stop and len(fired) == len(chunks):
            raise StopForward

    device = model_device(model)
    n = ids.shape[0]
    with hooks(modules, record):
        for s in range(0, n, batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled")
            fired.clear()
            run_until_stopped(model, input_ids=ids[s:s + batch_size].to(device), use_cache=False)
            missing = [name for name in chunks if name not in fired]
            if missing:
                raise RuntimeError(f"the model's forward pass never reached {missing}")
            if progress is not None:
                progress(min(s + batch_size, n) / n)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def clean_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a model without any hooks (another view may be capturing on the shared model right
    now), in eval mode."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        mod._forward_hooks.clear()
        mod._forward_pre_hooks.clear()
        for extra in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                      "_forward_hooks_always_called"):
            getattr(mod, extra, {}).clear()
    m.eval()
    return m
