"""How fast the static Layer Lab (docs/site.md) answers, in headless Chromium from file://.

For each exported layer: open the page on it (open -> first frame drawn, which includes loading the layer's
data and the GPTQ worker's run up to the cursor's column; -> the whole run and RTN's curve drawn), then
change one setting at a time (bits, desc_act, group size, damping, bits) and time each change -> redraw
(the new run's first frame drawn, as soon as the worker's loop has passed the cursor's column, here 0),
and -> the whole run and RTN's curve drawn (the page waits for both before the next change). Then play the
animation for a few seconds at the page's 15 frames/s and count the columns drawn per second (in the page,
on every animation frame). Goals (issue 20): first frame <= 2 s, a 576 x 576 change <= 0.3 s, a 1536-wide
one <= 1.5 s, the animation at 15 frames/s. Each number is the minimum and the median over the repeats
(and over the changes). The machine's load average is printed before and after: timings on a shared
machine are worth little without it.

    .venv/bin/python benchmarks/bench_site.py                 # exports the default site first (~1-2 min)
    .venv/bin/python benchmarks/bench_site.py --site /tmp/site # an exported site
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser_helpers import CHROMIUM_FLAGS, chromium_path  # noqa: E402

CHANGES = [{"bits": 3}, {"desc_act": True}, {"group_size": -1}, {"damp_percent": 0.1}, {"bits": 4}]
PLAY_S = 4.0

# Counts, on every animation frame, the column the figure shows ([time ms, column] at each change) until
# window.__stopCounting
COUNT_JS = """() => {
  const el = document.querySelector('#figure');
  window.__frames = [];
  window.__stopCounting = false;
  let last = null;
  const tick = (now) => {
    const k = el.gptqState ? el.gptqState.k : null;
    if (k !== null && k !== last) { window.__frames.push([now, k]); last = k; }
    if (!window.__stopCounting) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


def play_rate(page, seconds: float = PLAY_S) -> dict:
    """Play from column 0 for `seconds`: columns drawn per second (from the first step to the last), and
    the longest wait between two steps."""
    page.evaluate("() => window.gptqExplorer.set({col: 0})")
    page.evaluate(COUNT_JS)
    page.click("#play")
    page.wait_for_timeout(seconds * 1000)
    page.click("#play")
    frames = page.evaluate("() => { window.__stopCounting = true; return window.__frames; }")
    steps = [(t, k) for t, k in frames if k > 0]  # from the first step after column 0
    if len(steps) < 2:
        return {"fps": 0.0, "max_gap_ms": None, "skipped": None}
    pairs = list(zip(steps, steps[1:]))
    fps = 1000 * (steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0])
    return {"fps": fps, "max_gap_ms": max(b[0] - a[0] for a, b in pairs),
            "skipped": sum(b[1] - a[1] - 1 for a, b in pairs)}


def measure(site: Path, repeat: int) -> list[dict]:
    from playwright.sync_api import sync_playwright

    manifest = json.loads((site / "manifest.json").read_text())
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        for entry in manifest["layers"]:
            opens, completes, changes, fulls, plays = [], [], [], [], []
            for _ in range(repeat):
                page = browser.new_page(viewport={"width": 1600, "height": 1100})
                page.route("**/*", lambda r: (r.continue_() if r.request.url.startswith("file://")
                                              else r.abort()))
                page.goto((site / "index.html").as_uri()
                          + f"#model={entry['model']}&block={entry['block']}&sublayer={entry['sublayer']}")
                page.wait_for_function("window.gptqExplorer !== undefined")
                page.evaluate("() => window.gptqExplorer.ready()")
                for values in CHANGES:
                    page.evaluate("(v) => window.gptqExplorer.set(v)", values)
                t = page.evaluate("() => window.gptqExplorer.timings()")
                plays.append(play_rate(page))
                opens.append(t["open_to_first_frame_ms"])
                # (a page from before RTN had its own worker drew both at once: no separate numbers)
                completes.append(t.get("open_to_complete_ms", t["open_to_first_frame_ms"]))
                changes += [c["ms"] for c in t["changes"]]
                fulls += [c.get("full_ms", c["ms"]) for c in t["changes"]]
                page.close()
            rows.append({"layer": entry["key"], "shape": f"{entry['d_out']}x{entry['d_in']}",
                         "open": (min(opens), statistics.median(opens)),
                         "open_complete": (min(completes), statistics.median(completes)),
                         "change": (min(changes), statistics.median(changes), max(changes)),
                         "full": (min(fulls), statistics.median(fulls), max(fulls)),
                         "fps": (min(p["fps"] for p in plays), statistics.median(p["fps"] for p in plays)),
                         "play_gap_ms": max(p["max_gap_ms"] or 0 for p in plays),
                         "skipped": sum(p["skipped"] or 0 for p in plays)})
        browser.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", type=Path, default=None, help="an exported site (default: export one)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    tmp = None
    site = args.site
    if site is None:
        from gptq_explorer.services.site_export import export_site

        tmp = Path(tempfile.mkdtemp())
        site = tmp / "site"
        export_site(site, progress=print)
    load_before = os.getloadavg()
    try:
        rows = measure(site, args.repeat)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)
    load_after = os.getloadavg()
    s = lambda ms: f"{ms / 1000:.2f}"  # noqa: E731
    print("seconds, min / median (/ max) over the repeats (and the changes); frames/s while playing at 15")
    print(f"{'layer':25s} {'shape':>9s} {'open->frame':>12s} {'->complete':>11s} {'change->redraw':>17s} "
          f"{'->complete':>17s} {'frames/s':>11s} {'gap ms':>6s}")
    for r in rows:
        print(f"{r['layer']:25s} {r['shape']:>9s} {'/'.join(map(s, r['open'])):>12s} "
              f"{'/'.join(map(s, r['open_complete'])):>11s} {'/'.join(map(s, r['change'])):>17s} "
              f"{'/'.join(map(s, r['full'])):>17s} {'/'.join(f'{v:.1f}' for v in r['fps']):>11s} "
              f"{r['play_gap_ms']:6.0f}" + (f"  ({r['skipped']} columns skipped)" if r["skipped"] else ""))
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
        *load_before, *load_after))


if __name__ == "__main__":
    main()
