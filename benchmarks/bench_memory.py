"""Peak memory of quantize_model on the offline default model, side by side in one run: the compact kept
results (uint8 codes, the module's own weight as the result's weight) vs the earlier layout (int32 codes
and a separate float32 copy of every quantized weight).

    python benchmarks/bench_memory.py [--nsamples 16] [--seqlen 512] [--threads 1]

Each layout runs in a fresh child process (peak RSS = ru_maxrss of that process); both quantize the same
calibration ids with GPTQ 4-bit g128 and must give identical weights (checked by a checksum).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(a) -> None:
    import hashlib

    import torch

    from gptq_explorer import QuantConfig
    from gptq_explorer.data import calibration_windows
    from gptq_explorer.models import DEFAULT_MODEL, load_model
    from gptq_explorer.models import quantize as qmod

    torch.set_num_threads(a.threads)
    qmod.COMPACT_RESULTS = a.layout == "compact"
    lm = load_model(DEFAULT_MODEL)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = calibration_windows(lm.tokenizer, "prose", a.nsamples, a.seqlen, 0)
    qm = qmod.quantize_model(lm, ids, QuantConfig(bits=4, group_size=128), progress=False)
    h = hashlib.sha256()
    for name in sorted(qm.results):
        h.update(qm.model.get_submodule(name).weight.detach().numpy().tobytes())
    kept = sum(t.numel() * t.element_size() for r in qm.results.values()
               for t in (r.weight, r.codes) if isinstance(t, torch.Tensor))
    shared = sum(r.weight.numel() * 4 for n, r in qm.results.items()
                 if r.weight.untyped_storage().data_ptr()
                 == qm.model.get_submodule(n).weight.untyped_storage().data_ptr())
    print(json.dumps({"layout": a.layout, "peak_rss_bytes": qm.memory["peak_rss_bytes"],
                      "rss_after_load_bytes": base, "kept_weight_and_codes_bytes": kept - shared,
                      "seconds": qm.seconds, "weights_sha256": h.hexdigest()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layout", choices=("compact", "separate"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.layout:
        child(a)
        return 0
    rows = {}
    for layout in ("separate", "compact"):
        out = subprocess.run([sys.executable, __file__, "--layout", layout, "--nsamples", str(a.nsamples),
                              "--seqlen", str(a.seqlen), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True).stdout
        rows[layout] = json.loads(out.strip().splitlines()[-1])
    gb = 1 << 30
    print(f"quantize_model, SmolLM2-135M, GPTQ 4-bit g128, {a.nsamples} x {a.seqlen} prose, "
          f"{a.threads} thread(s)")
    print(f"{'layout':10s} {'peak RSS':>10s} {'after load':>11s} {'kept results':>13s} {'seconds':>8s}")
    for k, r in rows.items():
        print(f"{k:10s} {r['peak_rss_bytes'] / gb:9.2f}G {r['rss_after_load_bytes'] / gb:10.2f}G "
              f"{r['kept_weight_and_codes_bytes'] / gb:12.2f}G {r['seconds']:8.1f}")
    s, c = rows["separate"], rows["compact"]
    print(f"compact / separate peak RSS: {c['peak_rss_bytes'] / s['peak_rss_bytes']:.2f} "
          f"({(s['peak_rss_bytes'] - c['peak_rss_bytes']) / gb:.2f} GB less); identical weights: "
          f"{s['weights_sha256'] == c['weights_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
