"""A preheated Voila kernel: how it learns its visitor's link (gptq_explorer.ui.preheat.page_query), against
a stand-in for Voila's request-info socket on loopback (the query comes through; a kernel with no visitor
yet calls its preload once; a socket that cannot be reached costs the link's settings, never the page),
and the preload itself (on where cores are spare; only while the machine is quiet, until the visitor
comes)."""

from __future__ import annotations

import functools
import json
import os
import threading
import time

import pytest

from gptq_explorer.ui import preheat as preheat_module
from gptq_explorer.ui.preheat import page_query, voila_request_info_url, wait_for_visitor

pytest.importorskip("websockets")
from websockets.sync.server import serve  # noqa: E402

REQUEST = {"QUERY_STRING": "bits=3&tab=model", "SERVER_NAME": "127.0.0.1", "PATH_INFO": "/"}


class RequestInfoServer:
    """Sends REQUEST `delay` seconds after a kernel connects; records the paths it was asked on."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.closing = threading.Event()
        self.paths: list[str] = []
        self.server = serve(self._handle, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handle(self, connection):
        self.paths.append(connection.request.path)
        if not self.closing.wait(self.delay):
            connection.send(json.dumps(REQUEST))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def preheated(monkeypatch):
    """The environment Voila gives a preheated kernel (less the port, set per test)."""
    for key, value in {"VOILA_PREHEAT": "True", "VOILA_APP_IP": "127.0.0.1", "VOILA_SERVER_URL": "/",
                       "VOILA_KERNEL_ID": "kernel-1", "VOILA_BASE_URL": "/"}.items():
        monkeypatch.setenv(key, value)
    for key in ("VOILA_WS_BASE_URL", "VOILA_WS_PROTOCOL", *REQUEST):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(preheat_module, "PRELOAD_AFTER_S", 0.3)
    return monkeypatch


def test_the_visitors_query_reaches_the_kernel(preheated):
    calls = []
    with RequestInfoServer() as server:
        preheated.setenv("VOILA_APP_PORT", str(server.port))
        assert page_query(10, while_waiting=lambda: calls.append(1)) == "bits=3&tab=model"
    assert server.paths == ["/voila/query/kernel-1"]
    assert calls == []  # the visitor was there at once: nothing preloaded
    assert os.environ["SERVER_NAME"] == "127.0.0.1" and os.environ["QUERY_STRING"] == "bits=3&tab=model"


def test_a_kernel_without_visitor_preloads_once_then_gets_the_query(preheated):
    calls = []
    with RequestInfoServer(delay=1.0) as server:
        preheated.setenv("VOILA_APP_PORT", str(server.port))
        t0 = time.monotonic()
        assert page_query(10, while_waiting=lambda: calls.append(time.monotonic() - t0)) == "bits=3&tab=model"
    assert len(calls) == 1 and 0.25 < calls[0] < 0.9, calls


def test_no_socket_costs_the_links_settings_not_the_page(preheated, caplog):
    with RequestInfoServer() as server:
        port = server.port
    preheated.setenv("VOILA_APP_PORT", str(port))  # nobody listens there any more
    assert page_query(5) == ""
    assert "no request info" in caplog.text


def test_a_visitor_who_never_comes_times_out(preheated):
    with RequestInfoServer(delay=60.0) as server:
        preheated.setenv("VOILA_APP_PORT", str(server.port))
        t0 = time.monotonic()
        assert wait_for_visitor(voila_request_info_url(), timeout=0.5) == {}
        assert time.monotonic() - t0 < 3


def test_outside_a_preheated_kernel(monkeypatch):
    monkeypatch.setenv("VOILA_PREHEAT", "False")
    monkeypatch.setenv("QUERY_STRING", "?bits=2")
    assert page_query() == "bits=2"  # a kernel Voila started for the request has it in its environment
    for key in [k for k in os.environ if k.startswith("VOILA_")]:
        monkeypatch.delenv(key)
    assert page_query() == ""  # not in Voila


def test_request_info_url_follows_voilas_settings():
    env = {"VOILA_APP_IP": "0.0.0.0", "VOILA_APP_PORT": "9000", "VOILA_SERVER_URL": "/srv/",
           "VOILA_KERNEL_ID": "k"}
    assert voila_request_info_url(env) == "ws://0.0.0.0:9000/srv/voila/query/k"
    env.update(VOILA_WS_BASE_URL="/ws/", VOILA_WS_PROTOCOL="wss")
    assert voila_request_info_url(env) == "wss://0.0.0.0:9000/ws/voila/query/k"


# ---------------------------------------------------------------------------------------------------------
# the preload of a kernel that waits for its visitor


def test_preload_is_on_where_cores_are_spare(monkeypatch):
    from gptq_explorer.ui.preheat import PRELOAD_MIN_CPUS, preload_enabled

    assert preload_enabled({"GPTQ_EXPLORER_PRELOAD": "1"})
    assert not preload_enabled({"GPTQ_EXPLORER_PRELOAD": "0"})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(PRELOAD_MIN_CPUS - 2)), raising=False)
    assert not preload_enabled({})
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(PRELOAD_MIN_CPUS)), raising=False)
    assert preload_enabled({}) and preload_enabled({"GPTQ_EXPLORER_PRELOAD": "auto"})


def scripted_cpu(monkeypatch, idle_fractions):
    """cpu_times() as a machine whose successive windows were idle this fraction of the time (then idle)."""
    state = {"idle": 0.0, "total": 0.0, "i": 0}

    def cpu_times():
        i = state["i"]
        state["i"] += 1
        if i:
            frac = idle_fractions[i - 1] if i - 1 < len(idle_fractions) else 1.0
            state["idle"] += 100 * frac
            state["total"] += 100
        return state["idle"], state["total"]

    monkeypatch.setattr(preheat_module, "cpu_times", cpu_times)
    return state


def test_waiting_for_a_quiet_machine(monkeypatch):
    from gptq_explorer.ui.preheat import wait_for_quiet_machine

    # busy, busy, one quiet window (not enough), busy, then quiet: 2 quiet windows in a row are needed
    state = scripted_cpu(monkeypatch, [0.1, 0.5, 0.9, 0.3, 0.8, 0.95])
    waited = wait_for_quiet_machine(quiet_s=0.02, window_s=0.01)
    assert state["i"] == 7 and waited >= 0.06
    state = scripted_cpu(monkeypatch, [0.0] * 1000)  # never quiet: max_wait_s, or a stop
    assert 0.1 <= wait_for_quiet_machine(window_s=0.01, max_wait_s=0.1) < 1.0
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    assert wait_for_quiet_machine(window_s=0.01, stop=stop) < 1.0
    monkeypatch.setattr(preheat_module, "cpu_times", lambda: None)  # no /proc/stat: no waiting
    assert wait_for_quiet_machine() < 0.05


def test_a_preload_waits_for_a_quiet_machine_or_its_visitor(monkeypatch, tmp_path):
    """The spare kernel preloads only while the machine is quiet; once its visitor is there, at full
    speed. The layer then sits in the Layer Lab's cache."""
    pytest.importorskip("transformers")
    from tiny_models import make_tiny_model

    from gptq_explorer.services import layer_source
    from gptq_explorer.ui.preheat import preload_default_layer

    folder = str(make_tiny_model("llama", tmp_path / "llama"))
    tiny = functools.partial(layer_source.ModelSource, model=folder, nsamples=4, seqlen=32, heldout_tokens=64)
    monkeypatch.setattr(layer_source, "ModelSource", tiny)
    monkeypatch.setattr(preheat_module, "PRELOAD_IMPORTS", ("json",))
    scripted_cpu(monkeypatch, [0.0] * 10**6)  # a busy machine
    visitor_here = threading.Event()
    thread = preload_default_layer(visitor_here)
    time.sleep(1.0)
    assert thread.is_alive() and tiny().cached() is None  # still waiting for the machine to calm down
    visitor_here.set()
    thread.join(60)
    data = tiny().cached()
    assert not thread.is_alive() and data is not None and data.W.shape == (64, 64)
    assert tiny().load() is data


def test_without_the_sync_client_voilas_helper_answers(preheated, monkeypatch):
    """websockets older than 11 has no sync client: the query then comes from Voila's own helper."""
    import sys

    voila_utils = pytest.importorskip("voila.utils")
    monkeypatch.setitem(sys.modules, "websockets.sync.client", None)  # `import` of it -> ImportError
    monkeypatch.setattr(voila_utils, "get_query_string", lambda url=None: "?bits=2&tab=sweeps")
    assert page_query(5) == "bits=2&tab=sweeps"
