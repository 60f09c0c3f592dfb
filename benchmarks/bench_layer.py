"""Per-layer GPTQ time: our torch path and NumPy engine vs the paper's reference code, side by side.

    python benchmarks/bench_layer.py                       # all shapes, best of 3
    python benchmarks/bench_layer.py --reference-dir DIR   # DIR holds IST-DASLab/gptq's gptq.py, quant.py
    python benchmarks/bench_layer.py --quick               # SmolLM2 shapes only, best of 1
    python benchmarks/bench_layer.py --lab                 # the Layer Lab's run (GPTQ + RTN, summary)

Only ratios measured in one run mean anything: other load on the machine moves absolute times 10x. So the
three are timed in turn within each repeat (a drift in the machine's speed reaches all three alike), and
each row's FLOP bound uses the best matmul rate measured between that row's repeats.
Without --reference-dir (or $GPTQ_REFERENCE_DIR) the reference is gptq_explorer.engine.reference, our
faithful torch restatement of its fasterquant loop, and the table says so. The original is never vendored.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import os
import sys
import time

import numpy as np
import torch

from gptq_explorer import Hessian, QuantConfig, gptq_quantize
from gptq_explorer.engine.reference import reference_fasterquant

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]


def load_original(ref_dir: str):
    """Import the paper's GPTQ class from a user's checkout; patch its unconditional cuda.synchronize."""
    sys.path.insert(0, ref_dir)
    module = importlib.import_module("gptq")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    return module


def prepare_original(module, W, H, cfg: QuantConfig):
    """The original's GPTQ object set up for one call, and that call (fasterquant consumes H and writes the
    layer's weight). Only the call is timed: creating the layer (a random init) and copying W and H in are
    set-up (docs/performance.md says how much the table's reference times once included)."""
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    g = module.GPTQ(layer)
    g.H = H.clone()
    g.quantizer = module.Quantizer()
    g.quantizer.configure(cfg.bits, perchannel=True, sym=cfg.sym, mse=False)

    def call():
        with contextlib.redirect_stdout(io.StringIO()):  # it prints time and error
            g.fasterquant(blocksize=cfg.block_size, percdamp=cfg.damp_percent, groupsize=cfg.group_size,
                          actorder=cfg.desc_act)
        return layer.weight.data

    return call


def row_calls(original, W, H, cfg: QuantConfig) -> dict:
    """A table row's three calls, each as a function that sets one up and returns it (set-up is not timed):
    the reference (the original where given, else our restatement), the torch path, the NumPy engine."""
    Wn, Hn = W.double().numpy(), H.double().numpy()

    def reference():
        if original:
            return prepare_original(original, W, H, cfg)
        return functools.partial(reference_fasterquant, W, H, bits=cfg.bits, groupsize=cfg.group_size,
                                 sym=cfg.sym, actorder=cfg.desc_act)

    return {"reference": reference,
            "torch": lambda: functools.partial(gptq_quantize, W, H, cfg),
            "numpy": lambda: functools.partial(gptq_quantize, Wn, Hn, cfg)}


def best_of(fn, repeats: int, *args, **kwargs) -> float:
    return best_of_prepared(lambda: functools.partial(fn, *args, **kwargs), repeats)


def best_of_prepared(prepare, repeats: int, sync=lambda: None) -> float:
    """Best wall time of the call prepare() returns (prepare itself is not timed); sync waits for a GPU."""
    best = float("inf")
    for _ in range(repeats):
        call = prepare()
        sync()
        start = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(n=2048) -> float:
    a = torch.randn(n, n)
    a @ a
    t = best_of(lambda: a @ a, 3)
    return 2 * n**3 / t / 1e9


def flop_bound(rows: int, cols: int, gflops: float) -> float:
    """Seconds the unavoidable dense work takes at the measured matmul rate.

    Cholesky of H (cols^3 / 3) plus the error propagation Err @ U, which touches every later column
    (rows * cols^2 multiply-adds over the whole loop).
    """
    return (cols**3 / 3 + rows * cols**2) / (gflops * 1e9)


def lab_runs(repeats: int) -> None:
    """The Layer Lab's run (ui.layer_run.compute_run: GPTQ with every step kept, RTN, the summary) on the
    synthetic layer in SmolLM2's shapes, with the Layer Lab's default config: median wall time and the
    calling thread's CPU time, with the compiled column step and without it (NumPy ufuncs), interleaved;
    beside it the NumPy engine's stepper alone over every column (what the run drove before)."""
    from gptq_explorer import settings
    from gptq_explorer.engine import column_kernel, gptq_steps
    from gptq_explorer.services.layer_source import SyntheticSource
    from gptq_explorer.ui.layer_lab import DEFAULTS
    from gptq_explorer.ui.layer_run import compute_run

    cfg = QuantConfig.from_dict({k: DEFAULTS[k] for k in settings.QUANT_KEYS if k in DEFAULTS})
    compiled = column_kernel.compiled(np.float64)
    print(f"Layer Lab run, {cfg.label()}; median of {repeats}; compiled column step: "
          f"{'numba' if compiled else 'not available'}")
    print()
    print("| layer (out x in) | run, compiled: wall ms | cpu ms | run, NumPy step: wall ms | cpu ms | "
          "stepper alone: wall ms |")
    print("|" + "---|" * 6)

    def timed(fn, *args) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.thread_time()
        fn(*args)
        return time.perf_counter() - start, time.thread_time() - cpu

    def steps(data):
        return list(gptq_steps(data.W, data.H, cfg))

    for rows, cols in SHAPES[:3]:
        data = SyntheticSource(d_out=rows, d_in=cols).load()
        data.H, data.H_heldout  # noqa: B018 - the cached Hessians, as a loaded layer has them
        variants = {"compiled": True, "numpy": False}
        times = {name: [] for name in (*variants, "stepper")}
        for _ in range(repeats):
            for name, on in variants.items():
                column_kernel.COMPILED = on and compiled
                times[name].append(timed(compute_run, data, cfg))
            column_kernel.COMPILED = True
            times["stepper"].append(timed(steps, data))
        med = {name: np.median(np.array(t), axis=0) * 1e3 for name, t in times.items()}
        print(f"| {rows} x {cols} | {med['compiled'][0]:.0f} | {med['compiled'][1]:.0f} | "
              f"{med['numpy'][0]:.0f} | {med['numpy'][1]:.0f} | {med['stepper'][0]:.0f} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", default=os.environ.get("GPTQ_REFERENCE_DIR"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lab", action="store_true", help="time the Layer Lab's run instead")
    args = parser.parse_args(argv)
    if args.lab:
        lab_runs(max(args.repeats, 11))
        return
    shapes = SHAPES[:3] if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    original = load_original(args.reference_dir) if args.reference_dir else None
    ref_name = "IST-DASLab gptq.py (original)" if original else "reference restated (engine/reference.py)"
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), threads "
          f"{torch.get_num_threads()}, numpy {np.__version__}; {args.tokens} calibration tokens; best of "
          f"{repeats}, the three calls in turn")
    print(f"reference: {ref_name}")
    print()
    header = ("| shape (out x in) | desc_act | reference s | torch s | NumPy f64 s | torch / ref | "
              "NumPy / torch | FLOP bound s |")
    print(header)
    print("|" + "---|" * 8)
    rng = np.random.default_rng(0)
    # once per process, not per layer: loading (or compiling) the compiled column step
    gptq_quantize(torch.randn(64, 64), torch.eye(64), QuantConfig(bits=4, group_size=-1))
    rates = []
    for rows, cols in shapes:
        X = torch.from_numpy(rng.standard_normal((args.tokens, cols), dtype=np.float32))
        X[:, : cols // 16] *= 4
        H = Hessian(cols, backend="torch").add_batch(X).H
        W = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)) * 0.02
        for desc_act in (False, True):
            cfg = QuantConfig(bits=4, group_size=128, desc_act=desc_act, sym=False)
            calls = row_calls(original, W, H, cfg)
            best = dict.fromkeys(calls, float("inf"))
            gflops = 0.0
            for _ in range(repeats):
                for name, prepare in calls.items():
                    best[name] = min(best[name], best_of_prepared(prepare, 1))
                gflops = max(gflops, matmul_gflops())
            rates.append(gflops)
            t_ref, t_torch, t_np = best["reference"], best["torch"], best["numpy"]
            print(f"| {rows} x {cols} | {'on' if desc_act else 'off'} | {t_ref:.3f} | {t_torch:.3f} | "
                  f"{t_np:.3f} | {t_torch / t_ref:.2f} | {t_np / t_torch:.2f} | "
                  f"{flop_bound(rows, cols, gflops):.3f} |", flush=True)
    print()
    print(f"float32 matmul rate (2048^2, best between each row's repeats): {min(rates):.0f}-{max(rates):.0f} "
          "GFLOP/s")


if __name__ == "__main__":
    main()
