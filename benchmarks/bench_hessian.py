"""The torch Hessian's accumulation, side by side: the full x^T x product against the upper-triangle tiles
Hessian.add_batch uses (engine/hessian.py), on the calibration shapes of a SmolLM2 run.

    python benchmarks/bench_hessian.py [--tokens 8192] [--threads 2] [--repeats 7]

Per input width: the best time of each way over interleaved repeats, their ratio, and the largest
difference between the two results relative to max |H| (float32 sums in another order). Also the
tile-width sweep the default was chosen from.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptq_explorer.engine import Hessian
from gptq_explorer.engine.hessian import _tile


def full_product(x: torch.Tensor) -> torch.Tensor:
    """The accumulation before the tiles: one x^T x."""
    return (x.T @ x) * (2.0 / x.shape[0])


def tiled(x: torch.Tensor) -> torch.Tensor:
    return Hessian(x.shape[1], backend="torch").add_batch(x).H


def upper_tiles(x: torch.Tensor, b: int) -> torch.Tensor:
    """The tile sweep: upper-triangle tiles of width b, without the Hessian class around them."""
    d = x.shape[1]
    S = torch.zeros(d, d)
    for i in range(0, d, b):
        S[i : i + b, i:].addmm_(x[:, i : i + b].T, x[:, i:])
    return S


def best(f, x, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--widths", default="576,1536,4096")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.tokens} tokens, {args.threads} threads, best of {args.repeats}")
    print("| d_in | x^T x | upper tiles (width) | ratio | max |diff| / max |H| |")
    print("|---:|---:|---:|---:|---:|")
    for d in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, d)
        ref, new = full_product(x), tiled(x)
        diff = float((ref - new).abs().max() / ref.abs().max())
        t_full = t_tiles = float("inf")
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both
            t_full = min(t_full, best(full_product, x, 1))
            t_tiles = min(t_tiles, best(tiled, x, 1))
        print(f"| {d} | {t_full * 1e3:.1f} ms | {t_tiles * 1e3:.1f} ms ({_tile(d)}) | {t_tiles / t_full:.2f} "
              f"| {diff:.1e} |")
    print("\ntile sweep (ms):")
    for d in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, d)
        widths = [b for b in (128, 192, 256, 384, 512, 768) if b < d]
        row = {b: best(lambda y, b=b: upper_tiles(y, b), x, args.repeats) for b in widths}
        print(f"  d_in {d}: " + ", ".join(f"{b}: {t * 1e3:.1f}" for b, t in row.items()))


if __name__ == "__main__":
    main()
