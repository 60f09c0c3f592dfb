"""The Layer Lab's figure and its animation: drawing, the Play control, frames sent ahead, the watchdog.

The animation's clock runs in the figure's view (layer_figure): an ipywidgets Play gives the buttons (its
own timer parked at PLAY_PARKED_MS), its playing/value are jslinked to the view, which advances the cursor
at the frames/s setting through frames the kernel sends ahead while playing; the column slider follows the
Play (jslink) and drives the text.

The watchdog: anywidget gives each model 2 s to load its ESM; a view that misses the deadline either never
draws, or draws its first state and drops every later message from the kernel (seen with plotly's 5 MB
FigureWidget, which the canvas replaced; the guard stays). The view answers the frames it drew with their
seq, so the kernel can tell: frames sent and no answer for FIGURE_STALE_S while a browser shows the page
(the page probe, common.page_probe, said so) -> replace the figure by a fresh widget holding the same
state, which starts while the page is idle. At most MAX_REBUILDS times.
"""

from __future__ import annotations

import logging
import threading
import time

import ipywidgets as widgets
import numpy as np

from .common import guarded, page_probe
from .layer_figure import LabFigure
from .layer_run import frame, window
from .layer_text import explain_html, summary_html

log = logging.getLogger(__name__)

PLAY_PARKED_MS = 10**9  # the Play control's own timer never fires (the figure's view runs the clock)
AHEAD_FRAMES = 20  # while playing, frames sent ahead of the kernel's column (over a second of animation)
FIGURE_DEADLINE_S = 60.0  # after the page rendered, the figure must have drawn itself (see _on_probe)
FIGURE_STALE_S = 30.0  # updates unanswered this long: frozen (a loaded browser can take seconds to answer)
MAX_REBUILDS = 3


class LayerAnimation:
    """The figure side of LayerLab (a mixin). Uses the lab's controls ("col", "fps", "rows", "cols",
    "row0"), `run`, `_lock`, `_hover`, `show_error` and `_start_deferred_load`; provides `play`, `probe`,
    `figure` / `fig`, the drawing (`_render_*`) and the watchdog (`figure_frozen`, `rebuild_figure`)."""

    # -- construction ------------------------------------------------------------------------------------

    def _build_play(self, col: widgets.IntSlider) -> None:
        """The Play control (its own timer parked: the figure's view runs the clock, so a step never
        waits for the kernel), jslinked to the column slider."""
        self.play = widgets.Play(min=0, max=575, step=1, interval=PLAY_PARKED_MS, show_repeat=False,
                                 description="play")
        widgets.jslink((self.play, "value"), (col, "value"))
        # keep Play's value equal to the column on the Python side too: when a browser connects, jslink
        # copies Play's value onto the slider, which would otherwise reset a restored column to 0
        col.observe(self._sync_play, names="value")
        col.observe(self._on_col, names="value")

    def _build_probe(self) -> None:
        """The page probe; created before the figure, so a browser creates (and renders) it first."""
        self.probe = page_probe(FIGURE_DEADLINE_S)
        self.figure_rebuilds = 0
        self._figure_alive = False
        self._watchdog: threading.Thread | None = None
        self._closed = False
        if self.probe is not None:
            self.probe.on_msg(self._on_probe)

    def _build_figures(self) -> None:
        """The one figure, built complete from the current run (see layer_figure), then wrapped."""
        k = self.col
        win = self._window(k)
        fr = self._frame(self.run, k, win)
        self.figure = LabFigure(self.run, k, win, fr, self._on_hover, self._on_click, lock=self._lock,
                                basis=self.controls["basis"].value)
        self.fig = self.figure.widget
        self._link_figure()
        self._watch_figure()

    def _link_figure(self) -> None:
        """The view's clock follows the Play control (and the slider the view's cursor), in the browser."""
        for link in getattr(self, "_figure_links", ()):
            link.unlink()
        self.fig.fps = int(self.controls["fps"].value)
        self.fig.cursor = int(self.play.value)
        self._figure_links = (widgets.jslink((self.play, "value"), (self.fig, "cursor")),
                              widgets.jslink((self.play, "playing"), (self.fig, "playing")))
        self.fig.observe(self._on_playing, names="playing")

    # -- playing -----------------------------------------------------------------------------------------

    @guarded
    def _on_playing(self, change) -> None:
        if change["new"]:
            self._send_ahead()
        else:  # paused: the synced frame is the column shown (a browser that connects later draws it)
            self._render_frame(force=True)
            self._send_ahead()  # so that Play resumes at once

    def _send_ahead(self) -> None:
        """The frames after the current column that the view has not got yet: while playing, and once
        after a new run or a pause, so that pressing Play needs no round trip to the kernel."""
        with self._lock:
            run = self.run

            def make(j):
                win = self._window(j)
                return win, self._frame(run, j, win)

            self.figure.send_ahead(run, self.col, make, AHEAD_FRAMES)

    @guarded
    def _sync_play(self, change) -> None:
        # Only for columns set here (goto, a link): a column the browser sent is already the Play's there
        # (jslink), and it reaches the kernel late; pushing it back to the Play (while playing, or from a
        # message still queued at Pause) would make the animation jump back
        from_browser = "value" in getattr(self.controls["col"], "_property_lock", {})
        if not from_browser and not self.play.playing and self.play.value != change["new"]:
            self.play.value = change["new"]

    @guarded
    def _on_col(self, change) -> None:
        if self._quiet:
            return
        self._render_frame()
        if self.fig.playing:
            self._send_ahead()

    @guarded
    def _on_fps(self, change) -> None:
        self.fig.fps = int(change["new"])

    # -- drawing -----------------------------------------------------------------------------------------

    def _frame(self, run, k: int, win) -> dict:
        """Step k's views on the crop, in the basis the toggle shows (a rotated run's)."""
        return frame(run, k, win, self.controls["basis"].value)

    def _window(self, k: int):
        c = self.controls
        return window(self.run, k, int(c["rows"].value), int(c["cols"].value), int(c["row0"].value))

    def _render_full(self) -> None:
        """Everything that depends on the run (config or layer change), then the frame; then re-sync."""
        with self._lock:
            self.figure.full(self.run, self.controls["basis"].value)
            self._render_frame(force=True)
            self.summary = dict(self.run.summary)
            self.summary_html.value = summary_html(self.run)
            if getattr(self, "room", None) is not None:  # built with the layout, after the first draw
                self._room_picture(self.run)

    def _render_frame(self, force: bool = False) -> None:
        """One animation frame: the cropped heatmaps, the column profile, the cursor, the curves, the text.
        While playing, a frame the view got ahead is not sent again (only the text is)."""
        with self._lock:
            run = self.run
            k = int(np.clip(self.col, 0, run.n - 1))
            win = self._window(k)
            if force:
                self.figure.win = None
            sent = not force and bool(self.fig.playing) and self.figure.has_sent(k)
            self.figure.frame(run, k, win, self._frame(run, k, win), self._hover, sent=sent)
            self._last_window = win
            self.explain.value = explain_html(run, k, win)
            if force and self.fig.playing:
                # a new run or crop while playing: the view's frames are void and it steps only onto a
                # frame it has, so it waits for the next ones; without them no cursor change comes back
                # to ask for more, and the animation would stop there
                self._send_ahead()

    def _render_hover(self) -> None:
        with self._lock:
            self.figure.hover(self._hover, self._last_window or self._window(self.col))

    # -- the watchdog (see the module doc) ---------------------------------------------------------------

    def _watch_figure(self) -> None:
        self._figure_alive = False
        self._answered_at = time.monotonic()
        self._answered_id = int(self.fig.seq)
        self._waiting_since = time.monotonic()
        self._present_gen = -1  # the generation whose next frames this view got while paused
        self.figure.on_answer = lambda msg: self._on_figure_answer({"new": msg})
        self.fig.observe(self._on_figure_edit, names="seq")

    def _on_figure_answer(self, change) -> None:
        msg = change["new"]
        if not isinstance(msg, dict):
            return
        self._figure_alive = True
        self._answered_at = time.monotonic()
        self._answered_id = max(self._answered_id, int(msg.get("trace_edit_id") or 0))
        # The view has drawn a new run or crop (paused): now send it the next frames, once per generation,
        # so that pressing Play needs no round trip. Not before the draw: it would delay the redraw.
        if (not self.fig.playing and self._answered_id >= int(self.fig.seq)
                and self._present_gen != self.figure.gen):
            self._present_gen = self.figure.gen
            self._send_ahead()
        if self._deferred is not None:  # the page has drawn: now the model may take the CPU
            self._start_deferred_load()

    def figure_frozen(self, now: float | None = None) -> bool:
        """The figure drew itself in a browser, updates are waiting since, and it has not answered any for
        FIGURE_STALE_S. (One that never drew is the page probe's case: see _on_probe.)"""
        now = time.monotonic() if now is None else now
        if not self._figure_alive:
            return False
        if int(self.fig.seq) <= self._answered_id:
            return False  # caught up
        return now - max(self._answered_at, self._waiting_since) > FIGURE_STALE_S

    def _on_figure_edit(self, change) -> None:
        if self._answered_id >= int(change["old"] or 0):  # was caught up: the clock starts now
            self._waiting_since = time.monotonic()

    @guarded
    def _on_probe(self, _widget, content, _buffers) -> None:
        """Messages of the page probe (common.page_probe): "rendered" (a browser shows the page: start
        watching the figure's answers) and "figure" {drawn} (whether it drew itself within the deadline)."""
        if not isinstance(content, dict):
            return
        if content.get("event") == "rendered":
            self._answered_at = time.monotonic()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name="LayerLab-figure-watchdog",
                                                  daemon=True)
                self._watchdog.start()
        elif content.get("event") == "figure":
            if content.get("drawn"):
                if not self._figure_alive:
                    self._figure_alive = True
                    self._answered_at = time.monotonic()
            elif not self._figure_alive and self.figure_rebuilds < MAX_REBUILDS:
                self.rebuild_figure()

    def _watch_loop(self) -> None:
        while self.figure_rebuilds < MAX_REBUILDS and not self._closed:
            time.sleep(1.0)
            try:
                if self.figure_frozen():
                    self.rebuild_figure()
            except Exception as exc:  # noqa: BLE001 - a watchdog thread: show it, never raise
                self.show_error(exc, where="rebuilding the figure")
                return

    def rebuild_figure(self) -> None:
        """Replace the figure's widget by a fresh one showing the same state."""
        with self._lock:
            old = self.fig
            self.figure.adopt(self.figure.fresh_copy())
            self.fig = self.figure.widget
            self._link_figure()
            self._watch_figure()
            self._fig_box.children = (self.fig, *self._fig_box.children[1:])
            self.figure_rebuilds += 1
        log.warning("LayerLab: the figure stopped answering in the browser; rebuilt it (%d)",
                    self.figure_rebuilds)
        old.close()
        if self.probe is not None:
            self.probe.send({"watch": True})
