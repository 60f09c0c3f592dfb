"""CUDA check: the torch path on the GPU agrees with the CPU, and how fast it is.

    python benchmarks/gpu_check.py            # exits 0 with a note when there is no CUDA device

Prints the card, the code agreement (float64 and float32) with the CPU result on a 1536x576 layer, and
GPU times (best of 3, synchronized) for 4096x4096 and 8192x4096 layers, 4-bit g128, desc_act off and on.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from gptq_explorer import Hessian, QuantConfig, gptq_quantize


def layer(rows: int, cols: int, tokens: int = 2048, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g)
    X[:, : cols // 16] *= 4
    W = torch.randn(rows, cols, generator=g) * 0.02
    H = Hessian(cols, backend="torch", device=device).add_batch(X.to(device)).H
    return W.to(device), H


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (the CPU path is covered by the test suite)")
        return 0
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.backends.cuda.matmul.allow_tf32 = False  # as the reference: TF32 would change the codes
    failures = 0
    W, H = layer(1536, 576)
    for dtype in (torch.float64, torch.float32):
        for cfg in (QuantConfig(), QuantConfig(bits=3, sym=False, desc_act=True, group_size=32)):
            cpu = gptq_quantize(W.to(dtype), H.to(dtype), cfg)
            gpu = gptq_quantize(W.to("cuda", dtype), H.to("cuda", dtype), cfg)
            agree = float((gpu.codes.cpu() == cpu.codes).float().mean())
            need = 1.0 if dtype == torch.float64 else 0.999
            ok = agree >= need and gpu.weight.device.type == "cuda"
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dtype):14s} {cfg.label():28s} codes agree {agree:.5%}")
    print("\n| shape | desc_act | GPU s (float32) |\n|---|---|---|")
    for rows, cols in ((4096, 4096), (8192, 4096)):
        W, H = layer(rows, cols, device="cuda")
        for desc_act in (False, True):
            cfg = QuantConfig(desc_act=desc_act)
            gptq_quantize(W, H, cfg)  # warm-up
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                gptq_quantize(W, H, cfg)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            print(f"| {rows} x {cols} | {'on' if desc_act else 'off'} | {np.min(times):.3f} |")
    print("\nall CUDA checks passed" if not failures else f"\n{failures} CUDA check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
