"""The method table: RTN, GPTQ and the methods after it on the whole default model, one CLI run each.

    python benchmarks/bench_methods.py                    # every row (reduced protocol, ~1-5 min a run)
    python benchmarks/bench_methods.py --only gptaq       # the rows whose name contains 'gptaq'
    python benchmarks/bench_methods.py --table            # print the table of what is stored
    python benchmarks/bench_methods.py --layers           # time each method on one layer, beside GPTQ
    python benchmarks/bench_methods.py --rotation         # the rotation step: dense products vs the fast one
    python benchmarks/bench_methods.py --grid             # the MSE grid search of one group, before and now
    python benchmarks/bench_methods.py --seed 1 --only w4-g128   # a repeat on other calibration windows

Each run is `gptq-explorer quantize` with the reduced protocol below (stated in every report) and writes
its JSON report to data/results/methods/<model>/<name>.json, where tests/test_results_methods.py checks
the claims docs/methods.md makes. Runs that exist are skipped (delete a file to redo it). A repeat with
`--seed N` draws other calibration windows (the evaluation tokens stay the same) and writes to seed-N/ there.
"""

from __future__ import annotations

import argparse
import functools
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
        "gptaq-had": ["--method", "gptq", "--gptaq-alpha", "0.25", "--rotation", "hadamard"],
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
          "gptaq-mse-order": "GPTAQ + MSE grid + GAR", "gptaq-mse-had": "GPTAQ + MSE grid + rotation",
          "gptaq-had": "GPTAQ + rotation"}


def median_layer_error(report: dict) -> float | None:
    """Median over the linears of ||X W^T - X Q^T||^2 / ||X W^T||^2 on their calibration inputs (None for a
    report without them: RTN's)."""
    errs = sorted(x["output_rel_error"] for x in report["layers"] if x.get("output_rel_error") is not None)
    return errs[len(errs) // 2] if errs else None


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
            err = median_layer_error(r)
            lines.append(f"| {grid} | {label} | {ppl['prose']:.2f} | {ppl['code']:.2f} | "
                         f"{'—' if err is None else f'{err:.4f}'} | {t['quantize']:.0f} | "
                         f"{m['peak_rss_bytes'] / 1e9:.2f} |")
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


class _DenseRotation:
    """The torch engine's rotation as it was before the fast transform (rotation.Rotation's products with a
    dense R)."""

    def __init__(self, n, seed=0, like=None):
        import torch

        from gptq_explorer.engine.rotation import hadamard_rotation

        self.R = torch.as_tensor(hadamard_rotation(n, seed), device=like.device).to(like.dtype)

    def apply(self, X, transpose: bool = False):
        return (self.R.T if transpose else self.R) @ X

    def weight(self, W):
        return W @ self.R.T

    def hessian(self, H):
        return self.R @ H @ self.R.T

    def back(self, Q):
        return Q @ self.R

    def matrix(self):
        return self.R


def _mse_search_before(w, dim, xmin, xmax, scale, zero, bits, sym, norm, ternary):
    """The torch engine's MSE grid search as it was before the pruning and exp(norm log e): every row tries
    every shrink factor, |w - q|^norm by pow (the results are identical: tests/test_engine_methods.py)."""
    import torch

    from gptq_explorer.engine import grid as grid_np
    from gptq_explorer.engine import grid_torch

    maxq = 2**bits - 1
    best = torch.full_like(scale, float("inf"))
    scale, zero = scale.clone(), zero.clone()
    for i in range(int(grid_np.MSE_MAXSHRINK * grid_np.MSE_GRID)):
        p = 1 - i / grid_np.MSE_GRID
        s1, z1 = (p * xmax, p * xmin) if ternary else grid_torch._uniform(p * xmin, p * xmax, bits, sym)
        s, z = s1.unsqueeze(dim), z1.unsqueeze(dim)
        if ternary:
            _, q = grid_torch.quantize(w, s, z, maxq, ternary=True)
        else:
            q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z).mul_(s)
        err = (q - w).abs_().pow_(norm).sum(dim=dim)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def _numpy_mse_search_before(w, xmin, xmax, scale, zero, bits, sym, norm, ternary):
    """The NumPy engine's MSE grid search as it was (every row, every shrink factor, pow); uniform grids."""
    import numpy as np

    from gptq_explorer.engine import grid as grid_np

    maxq = 2**bits - 1
    best = np.full(w.shape[0], np.inf)
    scale, zero = scale.copy(), zero.copy()
    for i in range(int(grid_np.MSE_MAXSHRINK * grid_np.MSE_GRID)):
        p = 1 - i / grid_np.MSE_GRID
        s1, z1 = grid_np._uniform(p * xmin, p * xmax, bits, sym)
        s, z = s1[:, None], z1[:, None]
        q = (np.clip(np.round(w / s) + z, 0, maxq) - z) * s
        err = np.sum(np.abs(q - w) ** norm, axis=1)
        better = err < best
        best[better] = err[better]
        scale[better] = s1[better]
        zero[better] = z1[better]
    return scale, zero


def time_grid(repeats: int = 7) -> None:
    """The MSE grid search (norm 2.4) of one group of 128 columns of 576 rows (SmolLM2's q_proj shape, heavy-
    tailed weights), before (every row tries every shrink factor, pow) and now (pruned, exp(norm log e)):
    NumPy float64 (the reference engine, the Layer Lab) and torch float32 (the engine's layout: columns as
    rows). Best of `repeats`, interleaved; the grids are checked to be identical."""
    import time

    import numpy as np
    import torch

    from gptq_explorer.engine import grid as grid_np
    from gptq_explorer.engine import grid_torch

    torch.set_num_threads(1)
    w = np.random.default_rng(0).standard_t(df=4, size=(576, 128)) * 0.02
    wt = torch.tensor(w.T.copy(), dtype=torch.float32)
    print(f"{'grid':>10s} " + " ".join(["NumPy before", "NumPy now", "torch before", "torch now"]) + "  (ms)")
    for bits, sym in ((3, True), (4, True), (3, False)):
        def numpy_before(bits=bits, sym=sym):
            saved = grid_np._mse_search
            grid_np._mse_search = _numpy_mse_search_before
            try:
                return grid_np.grid_params(w, bits, sym, 2.4)
            finally:
                grid_np._mse_search = saved

        runs = {"NumPy before": numpy_before,
                "NumPy now": functools.partial(grid_np.grid_params, w, bits, sym, 2.4),
                "torch before": functools.partial(_before, functools.partial(
                    grid_torch.grid_params, wt, bits, sym, 0, 2.4)),
                "torch now": functools.partial(grid_torch.grid_params, wt, bits, sym, 0, 2.4)}
        out = {name: run() for name, run in runs.items()}
        assert all(np.array_equal(np.asarray(out[a][0]), np.asarray(out[b][0]))
                   for a, b in (("NumPy before", "NumPy now"), ("torch before", "torch now")))
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
        label = f"{bits}-bit {'sym' if sym else 'asym'}"
        print(f"{label:>10s} " + " ".join(f"{best[k] * 1e3:>{len(k)}.1f}" for k in runs))


def _before(run):
    """run() with the torch engine's MSE search and rotation as they were (for the 'before' columns)."""
    from gptq_explorer.engine import gptq_torch, grid_torch

    saved = grid_torch._mse_search, gptq_torch.Rotation
    grid_torch._mse_search, gptq_torch.Rotation = _mse_search_before, _DenseRotation
    try:
        return run()
    finally:
        grid_torch._mse_search, gptq_torch.Rotation = saved


def time_layers(repeats: int = 5) -> None:
    """Each method's time on SmolLM2's three layer shapes (torch path, one thread, 4096 tokens of correlated
    inputs), as a ratio to plain GPTQ measured in the same run; the MSE grid and the rotation also as they
    were before the pruned search and the fast transform ('+mse<' and '+rotation<': the same codes)."""
    import time

    import numpy as np
    import torch

    from gptq_explorer.engine import Hessian, QuantConfig, gptq_quantize

    torch.set_num_threads(1)
    base = QuantConfig(bits=3, group_size=128)
    mse, rotation = base.replace(mse_norm=2.4), base.replace(rotation="hadamard")
    methods = {"gptq": (base, False), "+mse": (mse, False), "+mse<": (mse, True),
               "+gar": (base.replace(group_aware=True), False),
               "gptaq": (base.replace(gptaq_alpha=0.25), False),
               "+rotation": (rotation, False), "+rotation<": (rotation, True),
               "ternary": (base.replace(ternary=True), False)}
    rng = np.random.default_rng(0)
    print(f"{'shape':>11s} " + " ".join(f"{m:>14s}" for m in methods))
    for d_out, d_in in ((576, 576), (1536, 576), (576, 1536)):
        A = torch.tensor(rng.normal(size=(d_in, d_in)) / d_in**0.5, dtype=torch.float32)
        X = torch.randn(4096, d_in) @ A
        h = Hessian(d_in, backend="torch").add_batch(X, X_fp=X + 0.05 * torch.randn_like(X) @ A)
        W = torch.randn(d_out, d_in)
        best = dict.fromkeys(methods, float("inf"))
        codes = {}
        for _ in range(repeats):  # interleaved, so a busy moment costs every method alike
            for name, (cfg, before) in methods.items():
                run = functools.partial(gptq_quantize, W, h.H, cfg, dXXT=h.dXXT)
                t0 = time.perf_counter()
                res = _before(run) if before else run()
                best[name] = min(best[name], time.perf_counter() - t0)
                codes[name] = res.codes
        for now in ("+mse", "+rotation"):  # float32: a few codes may differ by rounding
            same = float((codes[now] == codes[now + "<"]).float().mean())
            assert same > 0.999, f"{now}: {same:.4%} of the codes as before"
        cells = [f"{best[m] * 1e3:6.0f} ms {best[m] / best['gptq']:4.1f}x" for m in methods]
        print(f"{d_out:>5d}x{d_in:<5d} " + " ".join(f"{c:>14s}" for c in cells), flush=True)


def time_rotation(repeats: int = 20) -> None:
    """The rotation step of one layer (W R^T, R H R^T, R dXXT R^T and, for the result, Q R and R itself), one
    thread: as dense products with R (the engines before the fast transform) and with the fast transform
    (engine/rotation.Rotation, which both engines use). Best of `repeats`, interleaved."""
    import time

    import numpy as np
    import torch

    from gptq_explorer.engine import QuantConfig
    from gptq_explorer.engine import rotation as rot_np

    torch.set_num_threads(1)
    cfg = QuantConfig(rotation="hadamard")
    rng = np.random.default_rng(0)

    def torch_dense(W, H, dXXT):
        rot = torch.as_tensor(rot_np.hadamard_rotation(W.shape[1]), device=W.device).to(W.dtype)
        W0t = rot @ W.T.contiguous()
        Hr = rot @ H @ rot.T
        Hr = (Hr + Hr.T) / 2
        return rot, W0t.T @ rot, Hr, rot @ dXXT @ rot.T

    def torch_fast(W, H, dXXT):
        rotate = rot_np.Rotation(W.shape[1], cfg.rotation_seed, like=W)
        rot = rotate.matrix()
        W0t = rotate.apply(W.T.contiguous())
        Hr = rotate.hessian(H)
        Hr = (Hr + Hr.T) / 2
        return rot, rotate.back(W0t.T), Hr, rotate.hessian(dXXT)

    def numpy_dense(W, H, dXXT):
        R = rot_np.hadamard_rotation(W.shape[1])
        return R, (W @ R.T) @ R, R @ H @ R.T, R @ dXXT @ R.T

    def numpy_fast(W, H, dXXT):
        rotate = rot_np.Rotation(W.shape[1])
        return rotate.matrix(), rotate.back(rotate.weight(W)), rotate.hessian(H), rotate.hessian(dXXT)

    print(f"{'shape':>11s} {'torch dense':>12s} {'torch fast':>11s} {'numpy dense':>12s} {'numpy fast':>11s}"
          "   (ms; torch float32, NumPy float64)")
    for d_out, d_in in ((576, 576), (1536, 576), (576, 1536)):
        W, dXXT = rng.normal(size=(d_out, d_in)), rng.normal(size=(d_in, d_in))
        H = dXXT @ dXXT.T
        Wt, Ht, dt = (torch.tensor(a, dtype=torch.float32) for a in (W, H, dXXT))
        runs = {"torch dense": (torch_dense, (Wt, Ht, dt)), "torch fast": (torch_fast, (Wt, Ht, dt)),
                "numpy dense": (numpy_dense, (W, H, dXXT)), "numpy fast": (numpy_fast, (W, H, dXXT))}
        a, b = torch_dense(Wt, Ht, dt), torch_fast(Wt, Ht, dt)
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-3) for x, y in zip(a, b, strict=True))
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):
            for name, (fn, args) in runs.items():
                t0 = time.perf_counter()
                fn(*args)
                best[name] = min(best[name], time.perf_counter() - t0)
        print(f"{d_out:>5d}x{d_in:<5d} " + " ".join(f"{best[k] * 1e3:>{len(k)}.1f}" for k in runs))


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only the rows whose name contains this")
    ap.add_argument("--table", action="store_true", help="print the stored table and exit")
    ap.add_argument("--layers", action="store_true", help="time each method on one layer and exit")
    ap.add_argument("--rotation", action="store_true", help="time the rotation step (dense, fast) and exit")
    ap.add_argument("--grid", action="store_true", help="time the MSE grid search (before, now) and exit")
    ap.add_argument("--markdown", action="store_true", help="print the table of docs/methods.md and exit")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where the reports go (default {OUT})")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (not 0: reports go to seed-N/)")
    args = ap.parse_args()
    OUT = args.out
    if args.seed:
        OUT = OUT / f"seed-{args.seed}"
        PROTOCOL.extend(["--seed", str(args.seed)])
    if args.layers:
        time_layers()
        return
    if args.rotation:
        time_rotation()
        return
    if args.grid:
        time_grid()
        return
    if args.markdown:
        print(markdown(OUT))
        return
    if not args.table:  # the rows first, then the grids: every grid gets its main rows early
        if args.only in "fp" and not args.seed:
            run("fp", ["--method", "fp"])
        for method in rows("w3-g128"):
            for grid, flags in GRIDS.items():
                name = f"{method}-{grid}"
                if args.seed and method.startswith("rtn"):
                    continue  # RTN reads no calibration data: a repeat would give the same numbers
                if args.only in name:
                    run(name, [*flags, *rows(grid)[method]])
    table()


if __name__ == "__main__":
    main()
