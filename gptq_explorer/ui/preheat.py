"""What a preheated Voila kernel does before its visitor comes: wait for the page's query string, and
meanwhile preload the default model's first layer: from the layer store where it is stored (NumPy only),
else, where cores are spare, by loading the model.

Voila (0.5) runs the notebook in a pool kernel when the server starts; the app's cell then waits here for
the request of the visitor who takes that kernel. page_query asks the server's request-info socket for it
directly (Voila's helper imports Voila's server side, a noticeable part of the kernel's start, after the
visitor asked for the page; docs/performance.md). preload_default_layer fills the Layer Lab's caches
(gptq_explorer.services.layer_source) in a thread, one step at a time and only while the machine is
quiet, so the spare kernel never slows the visitors of the others; once its own visitor is there, at full
speed.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
import time

PRELOAD_AFTER_S = 3.0  # a preheated kernel with no visitor this long preloads the default layer
PRELOAD_MIN_CPUS = 4  # ... by default only on a machine with this many cores (preload_enabled)
# what loading the default model (SmolLM2, a Llama) imports, in order, one at a time (each import's cost:
# docs/performance.md)
PRELOAD_IMPORTS = ("torch", "transformers", "transformers.models.auto.modeling_auto",
                   "transformers.models.llama.configuration_llama",
                   "transformers.models.llama.modeling_llama", "gptq_explorer.models", "gptq_explorer.data")

log = logging.getLogger(__name__)


def in_voila() -> bool:
    return any(key.startswith("VOILA_") for key in os.environ)


def page_query(timeout: float = 24 * 3600.0, *, while_waiting=None) -> str:
    """The Voila page's query string ('' outside Voila). A preheated kernel waits here for its visitor;
    `while_waiting()` is called once if none has come after PRELOAD_AFTER_S.

    Voila's own helper (voila.utils.get_query_string) does the same, but importing voila.utils imports
    voila's server (jupyter_server, jupyterlab_server), which is slow (docs/performance.md), after the
    visitor has asked for the page. This asks the server's request-info socket directly, as that helper
    does."""
    if not in_voila():
        return ""
    if os.environ.get("VOILA_PREHEAT", "False") == "False":  # a kernel started for this request
        return os.environ.get("QUERY_STRING", "").lstrip("?")
    try:
        info = wait_for_visitor(voila_request_info_url(), timeout, while_waiting=while_waiting)
    except ImportError:  # websockets older than 11 (no sync client): Voila's helper, slower
        from voila.utils import get_query_string

        return (get_query_string() or "").lstrip("?")
    os.environ.update(info)  # what Voila's helper does: the request's SERVER_NAME, PATH_INFO...
    return info.get("QUERY_STRING", "").lstrip("?")


def voila_request_info_url(env=None) -> str:
    """Where Voila (0.5) hands a preheated kernel its request: ws://ip:port{base}voila/query/<kernel id>."""
    env = os.environ if env is None else env
    base = env.get("VOILA_WS_BASE_URL") or env.get("VOILA_SERVER_URL", "/")
    return (f"{env.get('VOILA_WS_PROTOCOL', 'ws')}://{env.get('VOILA_APP_IP', '127.0.0.1')}:"
            f"{env.get('VOILA_APP_PORT', '8866')}{base}voila/query/{env.get('VOILA_KERNEL_ID', '')}")


def wait_for_visitor(url: str, timeout: float = 24 * 3600.0, *, while_waiting=None) -> dict[str, str]:
    """The request info ({QUERY_STRING, SERVER_NAME, ...}) the server sends on `url` when a visitor takes
    this kernel; {} (with a warning in the log) when the socket cannot be reached or nothing comes within
    `timeout`. `while_waiting()` is called once when no visitor has come after PRELOAD_AFTER_S."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    deadline = time.monotonic() + timeout
    try:
        with connect(url, open_timeout=5) as socket:
            try:
                message = socket.recv(timeout=min(PRELOAD_AFTER_S, timeout))
            except TimeoutError:
                if while_waiting is not None:
                    while_waiting()
                message = socket.recv(timeout=max(deadline - time.monotonic(), 0.0))
    except (OSError, TimeoutError, WebSocketException) as exc:
        log.warning("no request info from %s (%s): the page's link settings are not applied", url, exc)
        return {}
    info = json.loads(message)
    return {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {}


def preload_enabled(env=None) -> bool:
    """GPTQ_EXPLORER_PRELOAD: 1 or 0; `auto` (the default) preloads on machines with PRELOAD_MIN_CPUS
    cores or more. On 2 cores the spare kernel's preload took CPU from the visitor already there (slower
    redraws, their own model layer later: docs/performance.md), for a visitor who may never come."""
    env = os.environ if env is None else env
    value = env.get("GPTQ_EXPLORER_PRELOAD", "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= PRELOAD_MIN_CPUS


def preload_default_layer(visitor_here: threading.Event | None = None) -> threading.Thread:
    """Load the default model and capture its first layer's inputs into the Layer Lab's caches, in a
    thread; where the layer store has that layer, it is only read (NumPy, no torch). Until `visitor_here`
    is set, each step waits for a quiet machine (wait_for_quiet_machine): the kernel that is preloading is
    the pool's spare, and the CPU belongs to the visitors of other kernels. A failure is only logged: the
    Layer Lab tries again when a visitor asks and shows the error there."""
    visitor_here = visitor_here or threading.Event()

    def polite() -> bool:  # polled between the load's steps: waits, never cancels
        if not visitor_here.is_set():
            wait_for_quiet_machine(stop=visitor_here)
        return False

    def work():
        from ..services.layer_source import ModelSource, models_available

        try:
            if ModelSource().cached() is not None:  # the layer store has it: no torch, no model
                return
            # the imports are most of it (loading the cached weights and capturing the layer's inputs
            # take far less; docs/performance.md): one module at a time, so that a busy machine is not kept
            # waiting
            for module in PRELOAD_IMPORTS:
                polite()
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
            polite()
            if models_available():
                ModelSource().load(should_cancel=polite)
        except Exception as exc:  # noqa: BLE001 - the Layer Lab will retry and show it in the page
            log.warning("preloading the default layer failed: %s", exc)

    thread = threading.Thread(target=work, name="explorer-preload", daemon=True)
    thread.start()
    return thread


def cpu_times() -> tuple[float, float] | None:
    """(idle, total) CPU time of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0.0), sum(fields[:8])


def wait_for_quiet_machine(idle_fraction: float = 0.75, quiet_s: float = 0.5, window_s: float = 0.25,
                           max_wait_s: float = 120.0, stop: threading.Event | None = None) -> float:
    """Wait until the machine's cores have been idle_fraction idle (or more) for quiet_s in a row,
    measured over windows of window_s (the caller sleeps meanwhile, so what is busy is other work);
    max_wait_s at most, or until `stop` is set. Returns the seconds waited; at once where /proc/stat is
    missing (not Linux)."""
    t0 = time.monotonic()
    before = cpu_times()
    quiet = 0.0
    while before is not None and time.monotonic() - t0 < max_wait_s and not (stop and stop.is_set()):
        if stop is not None:
            stop.wait(window_s)
        else:
            time.sleep(window_s)
        after = cpu_times()
        elapsed = after[1] - before[1]  # CPU time of all cores over the window
        quiet = quiet + window_s if elapsed > 0 and (after[0] - before[0]) / elapsed >= idle_fraction else 0.0
        if quiet >= quiet_s:
            break
        before = after
    return time.monotonic() - t0
