"""The method table: RTN, GPTQ and the methods after it on the whole default model, one CLI run each.

    python benchmarks/bench_methods.py                    # every row (reduced protocol, ~1-5 min a run)
    python benchmarks/bench_methods.py --only gptaq       # the rows whose name contains 'gptaq'
    python benchmarks/bench_methods.py --table            # print the table of what is stored
    python benchmarks/bench_methods.py --layers           # time each method on one layer, beside GPTQ

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
# One thread: on a shared 2-core machine, two threads per run stall on each other's waits.
PROTOCOL = ["--nsamples", "32", "--seqlen", "512", "--eval-tokens", "16384", "--calib", "prose",
            "--threads", "1"]
GRIDS = {"w4-g128": ["--bits", "4", "--group-size", "128"], "w3-g128": ["--bits", "3", "--group-size", "128"],
         "w3-grow": ["--bits", "3", "--group-size", "-1"]}


def rows(grid: str) -> dict[str, list[str]]:
    order = ["--desc-act"] if grid.endswith("grow") else ["--group-aware"]  # GAR needs groups
    return {
        "rtn": ["--method", "rtn"],
        "gptq": ["--method", "gptq"],
        "gptq-mse": ["--method", "gptq", "--mse-norm", "2.4"],
        "gptq-order": ["--method", "gptq", *order],
        "gptaq": ["--method", "gptq", "--gptaq-alpha", "0.25"],
        "gptq-had": ["--method", "gptq", "--rotation", "hadamard"],
        "gptaq-mse-order": ["--method", "gptq", "--gptaq-alpha", "0.25", "--mse-norm", "2.4", *order],
        "gptaq-mse-had": ["--method", "gptq", "--gptaq-alpha", "0.25", "--mse-norm", "2.4", "--rotation",
                          "hadamard"],
        "rtn-had": ["--method", "rtn", "--rotation", "hadamard"],
        "rtn-mse": ["--method", "rtn", "--mse-norm", "2.4"],
    }


def run(name: str, args: list[str]) -> None:
    out = OUT / f"{name}.json"
    if (OUT / f"{name}.failed").exists():
        return
    if out.exists():
        return
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "gptq_explorer.cli", "quantize", *args, *PROTOCOL, "--json", str(out),
           "--quiet"]
    print(" ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        (OUT / f"{name}.failed").write_text("see the log\n")


LABELS = {"fp": "FP (no quantization)", "rtn": "RTN", "rtn-had": "RTN + rotation",
          "rtn-mse": "RTN + MSE grid", "gptq": "GPTQ", "gptq-mse": "GPTQ + MSE grid",
          "gptq-order": "GPTQ + GAR",
          "gptaq": "GPTAQ (alpha 0.25)", "gptq-had": "GPTQ + rotation",
          "gptaq-mse-order": "GPTAQ + MSE grid + GAR", "gptaq-mse-had": "GPTAQ + MSE grid + rotation"}


def median_layer_error(report: dict) -> str:
    """Median over the linears of ||X W^T - X Q^T||^2 / ||X W^T||^2 on their calibration inputs."""
    errs = sorted(x["output_rel_error"] for x in report["layers"] if x.get("output_rel_error") is not None)
    return f"{errs[len(errs) // 2]:.4f}" if errs else "—"


def markdown(folder: Path = OUT) -> str:
    """The table docs/methods.md shows (tests/test_results_methods.py checks the page against the reports)."""
    lines = ["| grid | method | prose | code | median layer error | quantize (s) | peak RSS (GB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    reports = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    for grid in GRIDS:
        for method in ["rtn", "rtn-had", "rtn-mse", *[m for m in LABELS if m.startswith("gpt")]]:
            r = reports.get(f"{method}-{grid}")
            if r is None:
                continue
            ppl, t, m = r["perplexity"], r["timings"], r["memory"]
            label = LABELS[method].replace("GAR", "desc_act") if grid.endswith("grow") else LABELS[method]
            lines.append(f"| {grid} | {label} | {ppl['prose']:.2f} | {ppl['code']:.2f} | "
                         f"{median_layer_error(r)} | {t['quantize']:.0f} | {m['peak_rss_bytes'] / 1e9:.2f} |")
    if "fp" in reports:
        ppl = reports["fp"]["perplexity"]
        lines.append(f"| — | {LABELS['fp']} | {ppl['prose']:.2f} | {ppl['code']:.2f} | — | — | — |")
    return "\n".join(lines)


def table() -> None:
    print(f"{'run':28s} {'prose':>8s} {'code':>8s} {'quantize s':>10s} {'peak RSS GB':>11s}")
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        ppl, t, m = r["perplexity"], r["timings"], r.get("memory", {})
        print(f"{path.stem:28s} {ppl['prose']:8.2f} {ppl['code']:8.2f} {t.get('quantize', 0):10.1f} "
              f"{m.get('peak_rss_bytes', 0) / 1e9:11.2f}")


def time_layers(repeats: int = 5) -> None:
    """Each method's time on SmolLM2's three layer shapes (torch path, one thread, 4096 tokens of correlated
    inputs), as a ratio to plain GPTQ measured in the same run."""
    import time

    import numpy as np
    import torch

    from gptq_explorer.engine import Hessian, QuantConfig, gptq_quantize

    torch.set_num_threads(1)
    base = QuantConfig(bits=3, group_size=128)
    methods = {"gptq": base, "+mse": base.replace(mse_norm=2.4), "+gar": base.replace(group_aware=True),
               "gptaq": base.replace(gptaq_alpha=0.25), "+rotation": base.replace(rotation="hadamard"),
               "ternary": base.replace(ternary=True)}
    rng = np.random.default_rng(0)
    print(f"{'shape':>11s} " + " ".join(f"{m:>14s}" for m in methods))
    for d_out, d_in in ((576, 576), (1536, 576), (576, 1536)):
        A = torch.tensor(rng.normal(size=(d_in, d_in)) / d_in**0.5, dtype=torch.float32)
        X = torch.randn(4096, d_in) @ A
        h = Hessian(d_in, backend="torch").add_batch(X, X_fp=X + 0.05 * torch.randn_like(X) @ A)
        W = torch.randn(d_out, d_in)
        best = dict.fromkeys(methods, float("inf"))
        for _ in range(repeats):  # interleaved, so a busy moment costs every method alike
            for name, cfg in methods.items():
                t0 = time.perf_counter()
                gptq_quantize(W, h.H, cfg, dXXT=h.dXXT)
                best[name] = min(best[name], time.perf_counter() - t0)
        cells = [f"{best[m] * 1e3:6.0f} ms {best[m] / best['gptq']:4.1f}x" for m in methods]
        print(f"{d_out:>5d}x{d_in:<5d} " + " ".join(f"{c:>14s}" for c in cells))


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only the rows whose name contains this")
    ap.add_argument("--table", action="store_true", help="print the stored table and exit")
    ap.add_argument("--layers", action="store_true", help="time each method on one layer and exit")
    ap.add_argument("--markdown", action="store_true", help="print the table of docs/methods.md and exit")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where the reports go (default {OUT})")
    args = ap.parse_args()
    OUT = args.out
    if args.layers:
        time_layers()
        return
    if args.markdown:
        print(markdown(OUT))
        return
    if not args.table:  # the rows first, then the grids: every grid gets its main rows early
        if args.only in "fp":
            run("fp", ["--method", "fp"])
        for method in rows("w3-g128"):
            for grid, flags in GRIDS.items():
                name = f"{method}-{grid}"
                if args.only in name:
                    run(name, [*flags, *rows(grid)[method]])
    table()


if __name__ == "__main__":
    main()
