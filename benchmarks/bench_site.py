"""How fast the static Layer Lab (docs/site.md) answers, in headless Chromium from file://.

For each exported layer: open the page on it (open -> first frame drawn, which includes loading the layer's
data and the GPTQ worker's run), then change one setting at a time (bits, desc_act, group size, damping,
bits) and time each change -> redraw (the new run's first frame drawn), and -> RTN's curve drawn too (the
other worker computes RTN's Gram matrix meanwhile; the page waits for both before the next change). Goals
(issue 20): first frame <= 2 s, a 576 x 576 change <= 0.3 s, a 1536-wide one <= 1.5 s. The machine's load
average is printed before and after: timings on a shared machine are worth little without it.

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


def measure(site: Path, repeat: int) -> list[dict]:
    from playwright.sync_api import sync_playwright

    manifest = json.loads((site / "manifest.json").read_text())
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        for entry in manifest["layers"]:
            opens, completes, changes, fulls = [], [], [], []
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
                opens.append(t["open_to_first_frame_ms"])
                # (a page from before RTN had its own worker drew both at once: no separate numbers)
                completes.append(t.get("open_to_complete_ms", t["open_to_first_frame_ms"]))
                changes += [c["ms"] for c in t["changes"]]
                fulls += [c.get("full_ms", c["ms"]) for c in t["changes"]]
                page.close()
            rows.append({"layer": entry["key"], "shape": f"{entry['d_out']}x{entry['d_in']}",
                         "open_ms": statistics.median(opens),
                         "open_complete_ms": statistics.median(completes),
                         "change_ms_median": statistics.median(changes), "change_ms_max": max(changes),
                         "full_ms_median": statistics.median(fulls)})
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
    print(f"{'layer':26s} {'shape':>9s} {'open->frame (RTN)':>18s} {'change->redraw median / max':>28s} "
          f"{'->RTN too':>10s}")
    for r in rows:
        print(f"{r['layer']:26s} {r['shape']:>9s} {r['open_ms'] / 1000:8.2f}s "
              f"({r['open_complete_ms'] / 1000:.2f}s) "
              f"{r['change_ms_median'] / 1000:19.2f}s / {r['change_ms_max'] / 1000:.2f}s "
              f"{r['full_ms_median'] / 1000:9.2f}s")
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
        *load_before, *load_after))


if __name__ == "__main__":
    main()
