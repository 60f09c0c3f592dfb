"""deploy/jupyterhub_config.py, tried as a class would use it: a JupyterHub on loopback with
configurable-http-proxy, three users log in through the hub's form in their own browser contexts, each
lands on the explorer under Voilà with a kernel of their own (their own process, their own HOME), and when
one user's kernel is killed the hub and the other users carry on and that user's reload gets a new kernel.

The hub uses the config's trial settings (local processes, any name let in) and the synthetic layer
(GPTQ_EXPLORER_HUB_QUERY=model=synthetic) so that three kernels fit the test machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser_helpers import error_texts, free_port, http_status, open_page, wait_for_app, wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "jupyterhub_config.py"
USERS = ("ada", "grace", "alan")
APP_TIMEOUT = 240.0  # three servers and kernels starting at once on 2 busy cores


def proxy_command() -> str | None:
    """configurable-http-proxy: GPTQ_EXPLORER_HUB_PROXY, PATH, or where ./run.sh test installs it."""
    venv = Path(sys.executable).parent.parent
    for candidate in (os.environ.get("GPTQ_EXPLORER_HUB_PROXY"), shutil.which("configurable-http-proxy"),
                      str(venv / "hub-proxy" / "node_modules" / ".bin" / "configurable-http-proxy")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


class Hub:
    """`jupyterhub -f deploy/jupyterhub_config.py` in its own session, state in a temporary folder."""

    def __init__(self, state: Path, proxy: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self.log_path = state / "hub.log"
        self.env = {**os.environ, "GPTQ_EXPLORER_HUB_STATE": str(state),
                    "GPTQ_EXPLORER_HUB_PORT": str(self.port),
                    "GPTQ_EXPLORER_HUB_API_PORT": str(free_port()),
                    "GPTQ_EXPLORER_HUB_PROXY_API_PORT": str(free_port()), "GPTQ_EXPLORER_HUB_PROXY": proxy,
                    "GPTQ_EXPLORER_HUB_SPAWNER": "simple", "GPTQ_EXPLORER_HUB_AUTH": "dummy",
                    "GPTQ_EXPLORER_HUB_QUERY": "model=synthetic"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Hub:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(CONFIG)], cwd=self.state,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.answers, 90, 0.5, "the hub to answer /hub/api/")
        return self

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyterhub exited with {self.proc.returncode}:\n{self.log_tail()}")
        return http_status(f"{self.url}/hub/api/") == 200

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the hub stops its users' servers and its proxy
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for p in tree:  # whatever outlived it
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(tree, timeout=5)
        self._log.close()


@pytest.fixture(scope="module")
def hub(chromium, tmp_path_factory):
    if importlib_missing("jupyterhub"):
        pytest.skip("jupyterhub is not installed (pip install -e '.[dev]')")
    proxy = proxy_command()
    if proxy is None:
        pytest.skip("configurable-http-proxy is not installed (npm install configurable-http-proxy; "
                    "./run.sh test does it)")
    server = Hub(tmp_path_factory.mktemp("hub"), proxy).start()
    try:
        yield server
    finally:
        server.stop()
        print(f"[hub] log: {server.log_path}")


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def kernel_process(kernel_id: str):
    """The ipykernel process of a kernel id (its connection file is named after it)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if any(f"kernel-{kernel_id}.json" in part for part in p.info["cmdline"] or ()):
            return p
    return None


def log_in(browser, hub: Hub, user: str):
    page = open_page(browser)  # a context of its own: its own cookies, so its own hub session
    page.goto(f"{hub.url}/hub/login", timeout=60_000)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", "any")
    page.click("input[type=submit], button[type=submit]")
    return page


def test_a_class_of_three_on_jupyterhub(browser, hub):
    pages = {u: log_in(browser, hub, u) for u in USERS}  # all at once, as a class arrives
    kernels = {}
    for user, page in pages.items():
        wait_for_app(page, APP_TIMEOUT)
        landing = rf"/user/{user}/voila/render/explorer\.ipynb\?model=synthetic&?$"
        assert re.search(landing, page.url), page.url
        assert "synthetic" in page.inner_text("body")
        assert error_texts(page) == [], (user, error_texts(page))
        # Voila's server-extension page asks CDNs for its icon font and MathJax; offline they are just absent
        assert all(re.search("fontawesome|mathjax", url) for url in page.blocked), page.blocked
        assert len(page.kernel_ids) == 1, page.kernel_ids
        kernels[user] = page.kernel_ids[0]
    assert len(set(kernels.values())) == len(USERS)

    # each kernel is its own process, started by that user's server with that user's HOME
    procs = {u: kernel_process(k) for u, k in kernels.items()}
    assert all(procs.values()), procs
    assert len({p.pid for p in procs.values()}) == len(USERS)
    for user, p in procs.items():
        assert Path(p.environ()["HOME"]).name == user
        assert p.environ()["GPTQ_EXPLORER_THREADS"] == "1"  # the config's per-user environment

    # one user's kernel dies: the hub stays up, the others' apps keep working, and a reload starts afresh
    victim, other = USERS[0], USERS[1]
    procs[victim].kill()
    procs[victim].wait(timeout=10)
    time.sleep(1)
    assert hub.proc.poll() is None, hub.log_tail()
    assert hub.answers()
    for user in (other, victim):
        page = pages[user]
        page.kernel_ids.clear()
        page.reload(timeout=60_000)
        wait_for_app(page, APP_TIMEOUT)
        assert error_texts(page) == [], (user, error_texts(page))
        assert len(page.kernel_ids) == 1 and page.kernel_ids[0] != kernels[user]
    assert kernel_process(kernels[USERS[2]]).is_running()  # the third user's kernel was never touched
    for page in pages.values():
        page.close()
