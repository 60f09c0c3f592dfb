"""The lessons and the explorer inside JupyterLab, as `./run.sh lessons` serves them: a JupyterLab server on
loopback, a learner's "Run All Cells" from the Run menu, and what they should see — every code cell run
without an error, lesson 1's plotly figures drawn, the explorer's Layer Lab canvas drawn.

nbval (in ./run.sh test) runs the same notebooks in a plain kernel; this test is about the front end:
JupyterLab's widget, plotly and anywidget extensions.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser_helpers import free_port, http_status, open_page, plot_drawn, wait_until

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "artifacts" / "browser"
RUN_TIMEOUT = 420.0  # lesson 1 loads the model and runs it over calibration text, on 2 busy cores


@pytest.fixture(scope="module")
def lab(chromium, tmp_path_factory):
    """`jupyter lab` on the notebooks folder, as ./run.sh lessons starts it, with every cell rendered (no
    windowing: JupyterLab 4 otherwise only puts the cells near the viewport into the page)."""
    tmp = tmp_path_factory.mktemp("lab")
    # a copy: JupyterLab saves a notebook it has run (outputs and all), and the repository's stay clean
    notebooks = tmp / "notebooks"
    shutil.copytree(NOTEBOOKS, notebooks, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={notebooks}",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
           "--no-browser", f"--LabApp.user_settings_dir={tmp / 'settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQ_EXPLORER_THREADS": "1",
           "JUPYTER_RUNTIME_DIR": str(tmp)}
    log = open(tmp / "lab.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=notebooks, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is None and http_status(f"{url}/api/status?token={token}") == 200,
                   120, 0.5, "jupyter lab to answer")
        yield url, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        print(f"[lab] log: {tmp / 'lab.log'}")


CELLS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map((c) => ({
  prompt: (c.querySelector('.jp-InputPrompt') || {}).textContent || '',
  errors: Array.from(c.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]'))
    .map((o) => o.textContent).filter((t) => /Traceback|^\\w+Error:/m.test(t)).map((t) => t.slice(0, 300)),
}))"""


def run_all(page, url: str, token: str, notebook: str) -> list[dict]:
    """Open a notebook in JupyterLab, Run > Run All Cells, wait until every code cell has run; the cells'
    prompts and error outputs."""
    # ?reset: a fresh workspace, or JupyterLab reopens the previous test's notebook beside this one
    page.goto(f"{url}/lab/tree/{notebook}?reset&token={token}", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
    # the Run menu acts on the notebook only once its kernel is up: wait for "Idle" in the status bar
    wait_until(lambda: "Idle" in page.inner_text(".jp-StatusBar-Widget"), 120, 0.5, "the kernel to be idle")
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    def finished():
        cells = page.evaluate(CELLS_JS)
        if any(c["errors"] for c in cells):
            return cells  # stop early: the assertion shows the error
        done = cells and all(re.fullmatch(r"\[\d+\]:", c["prompt"].strip()) for c in cells)
        return cells if done else None

    return wait_until(finished, RUN_TIMEOUT, 1.0, f"every cell of {notebook} to run")


def test_lesson_1_runs_in_jupyterlab(browser, lab):
    url, token = lab
    page = open_page(browser, viewport=(1280, 900))
    try:
        t = time.monotonic()
        cells = run_all(page, url, token, "01_why_rtn_fails.ipynb")
        print(f"[lab timing] lesson 1 run all: {time.monotonic() - t:.1f} s")
        assert [c["errors"] for c in cells if c["errors"]] == []
        # its figures are plotly's, drawn by JupyterLab's plotly extension
        wait_until(lambda: page.locator(".jp-OutputArea .js-plotly-plot .main-svg").count() >= 2, 60, 0.5,
                   "lesson 1's plotly figures")
        assert page.page_errors == [], page.page_errors
        assert page.blocked == [], page.blocked
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-lesson1.png"))
    finally:
        page.close()


def test_explorer_runs_in_jupyterlab(browser, lab):
    url, token = lab
    page = open_page(browser, viewport=(1280, 900))
    try:
        cells = run_all(page, url, token, "explorer.ipynb")
        assert [c["errors"] for c in cells if c["errors"]] == []
        # the app's widgets and the Layer Lab's one canvas (anywidget) render inside the notebook (no link
        # query in JupyterLab: the default SmolLM2 layer)
        state = wait_until(lambda: plot_drawn(page), 180, 0.5, "the Layer Lab canvas drawn in JupyterLab")
        assert state["n"] > 0 and state["diag_h"].size == state["n"]
        assert page.locator(".jp-OutputArea .widget-tab").count() >= 1
        assert page.page_errors == [], page.page_errors
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "jupyterlab-explorer.png"))
    finally:
        page.close()
