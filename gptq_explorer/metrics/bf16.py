"""Does a bf16 forward pass pay off on this machine? Time and perplexity of fp32 vs bf16.

Two ways to run bf16 on a CPU:
  * autocast: weights stay fp32, each matmul casts to bf16 (keeps the fp32 model intact);
  * bf16 weights: a bf16 copy of the model (halves memory; the copy is lossy, so never cast back).
Whether either is faster depends on the CPU: AMX / AVX512-BF16 have native bf16 matmuls, plain AVX2
does not (then bf16 is usually slower). Run bf16_study() and look before turning it on.
"""

from __future__ import annotations

import copy
import time

import torch

from .perplexity_eval import perplexity


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bf16 features (Linux /proc/cpuinfo); empty when it has none or we cannot tell."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")})


def bf16_study(
    model, ids, seqlen: int = 512, n_windows: int = 8, batch_size: int = 1, repeats: int = 2
) -> dict:
    """Perplexity and wall time of the same windows in fp32, bf16 autocast and bf16 weights.

    The modes are interleaved and each keeps its fastest repeat, so a busy machine hurts them alike.
    """
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    modes = {
        "fp32": (model, None),
        "bf16_autocast": (model, torch.bfloat16),
        "bf16_weights": (bf16_model, None),
    }
    for m, amp in modes.values():  # untimed warm-up: lazy initialisation is not what we measure
        perplexity(m, ids, seqlen=seqlen, progress=False, amp_dtype=amp, max_windows=1)
    best = {k: float("inf") for k in modes}
    res = {}
    for _ in range(repeats):
        for k, (m, amp) in modes.items():
            t0 = time.perf_counter()
            res[k] = perplexity(
                m,
                ids,
                seqlen=seqlen,
                batch_size=batch_size,
                progress=False,
                amp_dtype=amp,
                max_windows=n_windows,
            )
            best[k] = min(best[k], time.perf_counter() - t0)
    del bf16_model
    out = {
        "windows": res["fp32"].n_windows,
        "seqlen": seqlen,
        "threads": torch.get_num_threads(),
        "cpu_bf16_flags": cpu_bf16_flags(),
    }
    for k in modes:
        out[k] = {
            "ppl": res[k].ppl,
            "seconds": best[k],
            "speedup_vs_fp32": best["fp32"] / best[k],
            "ppl_change_pct": 100 * (res[k].ppl / res["fp32"].ppl - 1),
        }
    return out
