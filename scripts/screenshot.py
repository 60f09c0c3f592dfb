"""Take the README's screenshot of the explorer app: docs/app.png.

Starts the app as `./run.sh app` serves it (standalone Voila on a free loopback port, notebooks/voila.json),
opens the explorer in headless Debian Chromium through Playwright, waits until the Layer Lab's figure has
drawn, and saves the page's viewport as a PNG. Nothing is downloaded: Playwright's own browsers are not
used, and every request that does not go to 127.0.0.1 is aborted.

    .venv/bin/python scripts/screenshot.py                      # docs/app.png, 1500 x 905
    .venv/bin/python scripts/screenshot.py --query "model=synthetic&bits=3" --out /tmp/app.png

Needs `chromium` on the PATH (Debian: apt-get install chromium) and the dev extra (playwright).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # browser_helpers: the Voila server and Chromium set-up the tests use

from browser_helpers import (  # noqa: E402
    VoilaServer,
    chromium_path,
    error_texts,
    launch_chromium,
    open_page,
    wait_for_app,
)

NOTEBOOK = ROOT / "notebooks" / "explorer.ipynb"
# The synthetic layer needs no model (instant and deterministic); column 200 shows GPTQ part-way through.
DEFAULT_QUERY = "model=synthetic&col=200"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png")
    ap.add_argument("--query", default=DEFAULT_QUERY, help="the page's link settings (no leading '?')")
    ap.add_argument("--width", type=int, default=1500)  # the Layer Lab's full width
    ap.add_argument("--height", type=int, default=905)  # down to the second row of views
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the figure")
    args = ap.parse_args(argv)

    chromium = chromium_path()
    if chromium is None:
        print("chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    log = ROOT / "artifacts" / "screenshot" / "voila.log"
    server = VoilaServer(NOTEBOOK, log_path=log,
                         env={"OMP_NUM_THREADS": "1", "GPTQ_EXPLORER_THREADS": "1",
                              "GPTQ_EXPLORER_LOCAL": "0", "GPTQ_EXPLORER_PRELOAD": "0"}).start()
    try:
        server.wait_ready(args.timeout)
        with sync_playwright() as p:
            browser = launch_chromium(p, chromium)
            try:
                page = open_page(browser, viewport=(args.width, args.height))
                page.goto(f"{server.url}/?{args.query}", timeout=args.timeout * 1000)
                wait_for_app(page, args.timeout)
                time.sleep(1.0)  # let the last widgets settle (fonts, the summary text)
                problems = error_texts(page) + page.page_errors
                if problems:
                    print(f"the page shows errors: {problems}", file=sys.stderr)
                    return 1
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), type="png")
            finally:
                browser.close()
    finally:
        server.stop()
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB, {args.width} x {args.height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
