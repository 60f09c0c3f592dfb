"""The public app's settings, and a load test of it in a real browser.

1. notebooks/voila.json holds what a public server needs (tracebacks off, sources stripped, culling on, a
   preheated pool, no local-path loading), and the app honours it: with its per-kernel environment the
   Layer Lab offers no local-folder box and a link naming a local folder is refused.
2. (browser) N_SESSIONS concurrent pages (default 4) of the explorer app, each on its own synthetic layer
   (block = seed), each changes settings with the keyboard / the dropdown, plays the animation, changes a
   setting while it plays, and keeps playing (see Budget). Checked all along: zero page errors, zero
   error text in the pages, every page's kernel alive. At the end, every page's summary numbers equal a
   direct engine computation (compute_run on the same layer and config) and the plot's cursor equals the
   column slider; after the pages close, no page kernel is left 30 s later (culling), only the preheated
   pool. Peak memory per kernel and in total (RSS of the server's ipykernel processes, sampled every poll)
   goes to artifacts/browser/load.json and the test output.

Budget: CI allows this test 150 s on 2 cores, and four cold kernels starting at once take much of it, so by
default the sessions play for what is left of the 150 s after the pages are ready, minus 55 s for the final
checks and the culling wait (at least 15 s). GPTQ_EXPLORER_LOAD_SECONDS fixes the duration instead (the
issue's 60 s: `GPTQ_EXPLORER_LOAD_SECONDS=60 pytest -m browser tests/test_ui_load.py -s`);
GPTQ_EXPLORER_LOAD_SESSIONS changes the number of sessions. Skips without Chromium or Playwright.
Run alone: `.venv/bin/python -m pytest -m browser tests/test_ui_load.py -s`.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser_helpers import (
    VoilaServer,
    dump_json,
    error_texts,
    launch_chromium,
    open_page,
    plot_drawn,
    plot_state,
    slider,
    slider_value,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explorer.ipynb"
VOILA_JSON = ROOT / "notebooks" / "voila.json"
ARTIFACTS = ROOT / "artifacts" / "browser"
N_SESSIONS = int(os.environ.get("GPTQ_EXPLORER_LOAD_SESSIONS", "4"))
# How long the sessions play: GPTQ_EXPLORER_LOAD_SECONDS if set (the issue asks 60), else whatever is left of
# the test's CI budget (BUDGET s from server start to the end) after the pages loaded, keeping RESERVE s for
# the final checks and the culling wait, and at least MIN_PLAY s.
_ENV_SECONDS = os.environ.get("GPTQ_EXPLORER_LOAD_SECONDS")
LOAD_SECONDS = float(_ENV_SECONDS) if _ENV_SECONDS else None
BUDGET, RESERVE, MIN_PLAY = 150.0, 55.0, 15.0
# Culling shortened for the test (voila.json: 900 / 60). Not shorter: a kernel whose page is still loading
# has no connection yet, and at 10 s idle the culler killed such kernels when 4 pages loaded at once.
# On a machine loaded by other work even 20 s can be too short: GPTQ_EXPLORER_LOAD_CULL_IDLE raises it (and
# the time allowed after closing with it) for diagnosis.
CULL_IDLE, CULL_INTERVAL = int(os.environ.get("GPTQ_EXPLORER_LOAD_CULL_IDLE", "20")), 5
GONE_AFTER = max(30.0, CULL_IDLE + 2 * CULL_INTERVAL)  # s: no page kernel may be left this long after closing
PAGE_TIMEOUT = float(os.environ.get("GPTQ_EXPLORER_LOAD_PAGE_TIMEOUT", "150"))  # s: N cold kernels at once
# anywidget 0.11 gives a widget's view 2 s to initialise; on a loaded machine plotly's 5 MB FigureWidget
# missed that and the figure ignored every later update. The Layer Lab's figure is now a 20 KB canvas
# widget, but a page where that still happens is recorded, its plot checks are skipped, every other check
# still runs, and the test then xfails naming the cause.
ANYWIDGET_TIMEOUT = "[anywidget] Failed to initialize model."


# ---------------------------------------------------------------------------------------------------------
# 1. the settings file


def test_voila_json_is_safe_for_a_public_server(monkeypatch):
    cfg = json.loads(VOILA_JSON.read_text())
    vc = cfg["VoilaConfiguration"]
    assert vc["show_tracebacks"] is False and vc["strip_sources"] is True
    assert vc["preheat_kernel"] is True and vc["default_pool_size"] >= 1
    assert cfg["Voila"]["ip"] == "127.0.0.1"  # behind a reverse proxy, never on a public interface
    cull = cfg["MappingKernelManager"]
    assert cull["cull_idle_timeout"] > 0 and 0 < cull["cull_interval"] <= cull["cull_idle_timeout"]
    env = cfg["VoilaKernelManager"]["default_env_variables"]
    assert env["GPTQ_EXPLORER_LOCAL"] == "0" and env["OMP_NUM_THREADS"] == "1"
    assert float(env["GPTQ_EXPLORER_MAX_MODEL_GB"]) > 0

    # the app, in that environment: no local folders, by widget or by link
    from gptq_explorer.models import loading
    from gptq_explorer.ui.app import explorer_app, local_mode_from_env
    from gptq_explorer.ui.layer_lab import LayerLab

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert local_mode_from_env() is False
    app = explorer_app("model=synthetic&bits=3")
    lab = getattr(app, "layer_lab", app)  # the tabbed app, or the Layer Lab alone
    assert lab.local_mode is False and lab.local_path is None and lab.state()["bits"] == 3
    _, problems = LayerLab.parse_query(f"model={ROOT}", local_mode=local_mode_from_env())
    assert problems and "is not one of the offered models" in problems[0]
    # and the per-kernel memory cap is what load_model checks against
    budget, why = loading.memory_budget()
    assert budget <= float(env["GPTQ_EXPLORER_MAX_MODEL_GB"]) * 1e9 and "GPTQ_EXPLORER_MAX_MODEL_GB" in why


# ---------------------------------------------------------------------------------------------------------
# 2. the load test


def _kernel_state(url: str, kid: str) -> str | None:
    """execution_state of a kernel ('idle', 'busy', 'dead' ...) or None when the server does not know it."""
    try:
        with urllib.request.urlopen(f"{url}/api/kernels/{kid}", timeout=5) as r:
            return json.loads(r.read()).get("execution_state")
    except Exception:  # noqa: BLE001 - 404 (culled) or no answer
        return None


class Memory:
    """Peak RSS of the server's kernel processes: per kernel (pid) and summed over kernels at one time."""

    def __init__(self, server: VoilaServer):
        self.server = server
        self.per_pid: dict[int, int] = {}
        self.total_peak = 0
        self.max_kernels = 0

    def sample(self) -> None:
        total = 0
        procs = self.server.kernel_processes()
        for p in procs:
            try:
                rss = p.memory_info().rss
            except Exception:  # noqa: BLE001 - it just exited
                continue
            self.per_pid[p.pid] = max(self.per_pid.get(p.pid, 0), rss)
            total += rss
        self.total_peak = max(self.total_peak, total)
        self.max_kernels = max(self.max_kernels, len(procs))

    def report(self) -> dict:
        per = sorted(self.per_pid.values(), reverse=True)
        return {"kernels_seen": len(per), "max_kernels_at_once": self.max_kernels,
                "peak_rss_per_kernel_mb": [round(b / 2**20) for b in per],
                "peak_rss_one_kernel_mb": round(per[0] / 2**20) if per else 0,
                "peak_rss_total_mb": round(self.total_peak / 2**20)}


SUMMARY_JS = """() => {
  const t = Array.from(document.querySelectorAll('table')).find((e) => e.innerText.includes('weight MSE'));
  if (!t) return null;
  return Array.from(t.querySelectorAll('tr'))
    .map((r) => Array.from(r.children).map((c) => c.innerText.trim()));
}"""


def _shown_summary(page) -> dict | None:
    """The numbers the page shows: {row name: (GPTQ, RTN)} as text, the ratio text and the config label."""
    rows = page.evaluate(SUMMARY_JS)
    body = page.inner_text("body").replace("\xa0", " ")
    ratio = re.search(r"Held-out error RTN / GPTQ = ([0-9.]+)×", body)
    label = re.search(r"(\d-bit (?:g\d+|per-row) (?:sym|asym)[^\n]*?) on (synthetic [^\n]+?\(seed \d+\))",
                      body)
    if not rows or not ratio or not label:
        return None
    table = {r[0].split(" (")[0]: (r[1], r[2]) for r in rows if len(r) == 3 and r[0]}
    return {"rows": table, "ratio": ratio.group(1), "label": f"{label.group(1)} on {label.group(2)}"}


def _expected_summary(seed: int, cfg) -> dict:
    """The same numbers from the engine directly, formatted as the page formats them."""
    from gptq_explorer.services.layer_source import SyntheticSource
    from gptq_explorer.ui.layer_run import compute_run

    s = compute_run(SyntheticSource(seed=seed).load(), cfg).summary
    return {
        "weight MSE": (f"{s['weight_mse_gptq']:.3g}", f"{s['weight_mse_rtn']:.3g}"),
        "held-out output MSE": (f"{s['heldout_mse_gptq']:.3g}", f"{s['heldout_mse_rtn']:.3g}"),
        "ratio": f"{s['heldout_ratio']:.2f}",
    }


class Session:
    """One visitor: a page on `?model=synthetic&block=<seed>` with its own plan of setting changes."""

    def __init__(self, browser, server: VoilaServer, seed: int):
        from gptq_explorer import QuantConfig

        self.seed = seed
        self.page = open_page(browser)
        self.url = f"{server.url}/?model=synthetic&block={seed}"
        self.cfg = QuantConfig()  # what the page should be showing, updated with every change we make
        self.ready = False
        self.ready_after: float | None = None
        self.changed = False
        self.mid_change_done = False
        self.restarts = 0
        self.max_col = 0

    @property
    def kernel(self) -> str | None:
        return self.page.kernel_ids[0] if self.page.kernel_ids else None

    def start(self) -> None:
        self.page.goto(self.url, wait_until="commit", timeout=PAGE_TIMEOUT * 1000)

    @property
    def frozen(self) -> bool:
        """The page hit the anywidget initialisation timeout: its figure takes no updates."""
        return any(ANYWIDGET_TIMEOUT in e for e in self.page.page_errors + self.page.console_errors)

    def errors(self) -> list[str]:
        return [e for e in self.page.page_errors if ANYWIDGET_TIMEOUT not in e]

    def poll_ready(self) -> bool:
        """Controls shown, the summary of the page's own layer shown, and (unless frozen) the figure drawn."""
        if not self.ready and self.page.locator(".slider-container").count():
            shown = _shown_summary(self.page)
            if shown and shown["label"].endswith(f"(seed {self.seed})"):
                self.ready = self.frozen or plot_drawn(self.page) is not None
            if self.ready:
                self.ready_after = time.monotonic()
        return self.ready

    def change_settings(self) -> None:
        """bits with the keyboard (even seeds 4 -> 3, odd 4 -> 5); seeds >= 2 also pick group size 64."""
        handle = slider(self.page, "bits").locator(".noUi-handle")
        handle.focus()
        handle.press("ArrowLeft" if self.seed % 2 == 0 else "ArrowRight")
        self.cfg = self.cfg.replace(bits=3 if self.seed % 2 == 0 else 5)
        if self.seed >= 2:
            self._dropdown("group size").select_option(label="64")
            self.cfg = self.cfg.replace(group_size=64)
        self.changed = True

    def change_while_playing(self) -> None:
        """Toggle desc_act during playback: a full GPTQ recompute while frames are being requested."""
        box = self.page.locator(".widget-checkbox").filter(has_text="desc_act").locator("input")
        box.click()
        self.cfg = self.cfg.replace(desc_act=not self.cfg.desc_act)
        self.mid_change_done = True

    def _dropdown(self, label: str):
        return self.page.locator(".widget-dropdown").filter(
            has=self.page.locator("label.widget-label", has_text=re.compile(rf"^{re.escape(label)}$"))
        ).locator("select")

    def play(self) -> None:
        self.page.locator(".widget-play button").first.click()

    def playing(self) -> bool:
        """The Play control's own state: its play/pause button shows a pause icon while playing."""
        return self.page.locator(".widget-play button").first.locator("i.fa-pause").count() > 0

    def pause(self) -> None:
        """Click play/pause while playing, until it is paused. Judged by the button, not by the column
        moving (a loaded page's column readout can still be catching up after the end). The animation can
        also end by itself between the look and the click, which then starts it again from column 0: so
        look again after each click."""
        for _ in range(3):
            if not self.playing():
                return
            self.play()
            try:
                wait_until(lambda: not self.playing(), 5, 0.2, "the pause")
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"session {self.seed} did not pause after 3 clicks")

    def column(self) -> int:
        return int(slider_value(self.page, "column"))

    def label_matches(self) -> bool:
        shown = _shown_summary(self.page)
        return bool(shown) and shown["label"].startswith(self.cfg.label() + " on synthetic")

    def check_clean(self, where: str) -> None:
        errors = self.errors()
        assert errors == [], f"session {self.seed} {where}: page errors {errors}"
        errors = error_texts(self.page)
        assert errors == [], f"session {self.seed} {where}: error text in the page: {errors}"


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GPTQ_EXPLORER_LOAD_TEST") == "0",
                    reason="GPTQ_EXPLORER_LOAD_TEST=0 skips the 4-session load test (minutes)")
def test_concurrent_sessions_under_load(chromium):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = VoilaServer(
        NOTEBOOK, log_path=ARTIFACTS / "voila-load.log",
        extra_args=[f"--MappingKernelManager.cull_idle_timeout={CULL_IDLE}",
                    f"--MappingKernelManager.cull_interval={CULL_INTERVAL}",
                    "--MappingKernelManager.cull_connected=False"],
        env={"GPTQ_EXPLORER_THREADS": "1", "OMP_NUM_THREADS": "1", "GPTQ_EXPLORER_LOCAL": "0"})
    mem = Memory(server)
    t_start = time.monotonic()
    timings: dict = {"sessions": N_SESSIONS, "t_start": t_start}
    server.start()
    try:
        timings["voila_ready"] = round(server.wait_ready(), 1)
        with sync_playwright() as p:
            browser = launch_chromium(p, chromium)
            sessions = [Session(browser, server, seed) for seed in range(N_SESSIONS)]
            try:
                _run_sessions(sessions, server, mem, timings)
            finally:
                closed_at = time.monotonic()
                kernels = [s.kernel for s in sessions if s.kernel]
                for s in sessions:
                    s.page.close(run_before_unload=True)
                browser.close()
        # no page kernel left GONE_AFTER s after the pages closed; only the preheated pool remains
        pool = int(json.loads(VOILA_JSON.read_text())["VoilaConfiguration"]["default_pool_size"])

        def all_gone():
            mem.sample()
            return not any(server.kernel_alive(k) for k in kernels) and len(server.kernel_processes()) <= pool

        try:
            wait_until(all_gone, GONE_AFTER, 0.5, "the closed pages' kernels to go")
        except TimeoutError:
            alive = [k for k in kernels if server.kernel_alive(k)]
            raise AssertionError(f"{GONE_AFTER:.0f} s after the pages closed: page kernels still alive "
                                 f"{alive}, {len(server.kernel_processes())} kernel processes (pool {pool})\n"
                                 f"{server.log_tail()}") from None
        timings["close_to_kernels_gone"] = round(time.monotonic() - closed_at, 1)
        if timings.get("frozen_figures"):
            pytest.xfail(f"known bug: anywidget's 2 s initialisation deadline froze the figure of session(s) "
                         f"{timings['frozen_figures']} (every other check passed)")
    finally:
        server.stop()
        timings.pop("t_start", None)
        timings["total"] = round(time.monotonic() - t_start, 1)
        report = {"timings_s": timings, "memory": mem.report()}
        dump_json(ARTIFACTS / "load.json", report)
        print(f"[load test] {json.dumps(report)}")


def _run_sessions(sessions: list[Session], server: VoilaServer, mem: Memory, timings: dict) -> None:
    t0 = time.monotonic()
    for s in sessions:  # every navigation starts before any page is ready: the kernels start together
        s.start()
    # all pages ready (round robin: one Playwright thread drives every page)
    deadline = t0 + PAGE_TIMEOUT
    while not all(s.poll_ready() for s in sessions):
        mem.sample()
        for s in sessions:
            assert s.errors() == [], f"session {s.seed} while loading: {s.errors()}"
        if time.monotonic() > deadline:
            timings["pages_ready_after"] = sorted(round(s.ready_after - t0, 1) for s in sessions if s.ready)
            for s in sessions:
                if not s.ready:
                    s.page.screenshot(path=str(ARTIFACTS / f"load-not-ready-{s.seed}.png"), full_page=True)
                    (ARTIFACTS / f"load-not-ready-{s.seed}.txt").write_text(
                        f"page errors: {s.page.page_errors}\nconsole errors: {s.page.console_errors}\n\n"
                        + s.page.inner_text("body"))
        assert time.monotonic() < deadline, (
            f"only {sum(s.ready for s in sessions)} of {len(sessions)} pages showed the app after "
            f"{PAGE_TIMEOUT:.0f} s\n{server.log_tail()}")
        time.sleep(0.5)
    timings["pages_ready_after"] = sorted(round(s.ready_after - t0, 1) for s in sessions)
    assert len({s.kernel for s in sessions}) == len(sessions) and all(s.kernel for s in sessions)

    for s in sessions:
        s.change_settings()
        s.play()
    t_play = time.monotonic()
    play_for = LOAD_SECONDS if LOAD_SECONDS is not None else max(
        MIN_PLAY, BUDGET - RESERVE - (t_play - timings.pop("t_start")))
    timings["play_target"] = round(play_for, 1)
    while time.monotonic() - t_play < play_for:
        mem.sample()
        for s in sessions:
            state = _kernel_state(server.url, s.kernel)
            assert state not in (None, "dead"), f"session {s.seed}: kernel {s.kernel} is {state}"
            s.check_clean("while playing")
            col = s.column()
            s.max_col = max(s.max_col, col)
            if not s.mid_change_done and time.monotonic() - t_play > play_for / 2:
                s.change_while_playing()
            elif col >= 575:  # played to the end (no repeat): start over and play again
                s.page.locator("button[title='first column']").click()
                s.play()
                s.restarts += 1
        time.sleep(1.0)
    timings["played"] = round(time.monotonic() - t_play, 1)

    for s in sessions:  # pause (the play button toggles), then check every page's numbers against the engine
        s.pause()
    for s in sessions:
        wait_until(s.label_matches, 60, 0.5, f"session {s.seed}'s summary to show {s.cfg.label()}")
        shown, expected = _shown_summary(s.page), _expected_summary(s.seed, s.cfg)
        for row in ("weight MSE", "held-out output MSE"):
            assert shown["rows"][row] == expected[row], (s.seed, s.cfg.label(), row, shown, expected)
        assert shown["ratio"] == expected["ratio"], (s.seed, shown, expected)
        col = int(wait_until(lambda s=s: _stable_column(s), 20, 0.3, "the column to stop"))
        assert s.max_col > 5 or s.restarts, f"session {s.seed}: the animation never advanced"
        if not s.frozen:
            try:
                st = wait_until(lambda s=s, col=col: (x := plot_state(s.page)) and x["marker_x"].size
                                and int(x["marker_x"][0]) == col and x, 20, 0.3, "the plot cursor")
            except TimeoutError:
                shot = ARTIFACTS / f"load-stale-plot-{s.seed}.png"
                s.page.screenshot(path=str(shot), full_page=True)
                x = plot_state(s.page)
                raise AssertionError(
                    f"session {s.seed}: the column slider stopped at {col}, after 20 s the plot cursor is at "
                    f"{None if x is None else x['marker_x'].tolist()}; page errors {s.page.page_errors}, "
                    f"console errors {s.page.console_errors[:5]} (screenshot {shot.name})") from None
            assert np.isfinite(st["gptq_y"]).sum() == col + 1
        s.check_clean("at the end")
        assert _kernel_state(server.url, s.kernel) not in (None, "dead")
    timings["max_column_reached"] = max(s.max_col for s in sessions)
    timings["restarts"] = sum(s.restarts for s in sessions)
    timings["frozen_figures"] = [s.seed for s in sessions if s.frozen]


def _stable_column(s: Session) -> str | None:
    v = s.column()
    time.sleep(0.4)
    return str(v) if s.column() == v else None
