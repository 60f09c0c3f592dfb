"""The method table: RTN, GPTQ and the methods after it on the whole default model, one CLI run each.

    python benchmarks/bench_methods.py                    # every row (reduced protocol, ~1-5 min a run)
    python benchmarks/bench_methods.py --only gptaq       # the rows whose name contains 'gptaq'
    python benchmarks/bench_methods.py --table            # print the table of what is stored

Each run is `gptq-explorer quantize` with the reduced protocol below (stated in every report) and writes
its JSON report to data/results/methods/<model>/<name>.json, where tests/test_results_methods.py checks
the claims docs/methods.md makes. Runs that exist are skipped (delete a file to redo it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "results" / "methods" / "smollm2-135m"
PROTOCOL = ["--nsamples", "32", "--seqlen", "512", "--eval-tokens", "16384", "--calib", "prose"]
GRIDS = {"w4-g128": ["--bits", "4", "--group-size", "128"], "w3-g128": ["--bits", "3", "--group-size", "128"],
         "w3-grow": ["--bits", "3", "--group-size", "-1"]}


def rows(grid: str) -> dict[str, list[str]]:
    order = ["--desc-act"] if grid.endswith("grow") else ["--group-aware"]  # GAR needs groups
    return {
        "rtn": ["--method", "rtn"],
        "rtn-mse": ["--method", "rtn", "--mse-norm", "2.4"],
        "rtn-had": ["--method", "rtn", "--rotation", "hadamard"],
        "gptq": ["--method", "gptq"],
        "gptq-mse": ["--method", "gptq", "--mse-norm", "2.4"],
        "gptq-order": ["--method", "gptq", *order],
        "gptaq": ["--method", "gptq", "--gptaq-alpha", "0.25"],
        "gptq-had": ["--method", "gptq", "--rotation", "hadamard"],
        "gptaq-mse-order": ["--method", "gptq", "--gptaq-alpha", "0.25", "--mse-norm", "2.4", *order],
    }


def run(name: str, args: list[str]) -> None:
    out = OUT / f"{name}.json"
    if out.exists():
        return
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gptq_explorer.cli", "quantize", *args, *PROTOCOL, "--json", str(out),
           "--quiet"]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def table() -> None:
    print(f"{'run':28s} {'prose':>8s} {'code':>8s} {'quantize s':>10s} {'peak RSS GB':>11s}")
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        ppl, t, m = r["perplexity"], r["timings"], r.get("memory", {})
        print(f"{path.stem:28s} {ppl['prose']:8.2f} {ppl['code']:8.2f} {t.get('quantize', 0):10.1f} "
              f"{m.get('peak_rss_bytes', 0) / 1e9:11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only the rows whose name contains this")
    ap.add_argument("--table", action="store_true", help="print the stored table and exit")
    args = ap.parse_args()
    if not args.table:
        for grid, flags in GRIDS.items():
            for method, extra in rows(grid).items():
                name = f"{method}-{grid}"
                if args.only in name:
                    run(name, [*flags, *extra])
    table()


if __name__ == "__main__":
    main()
