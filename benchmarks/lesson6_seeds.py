"""Lesson 6's whole-model calibration-domain runs, repeated over calibration seeds.

    python benchmarks/lesson6_seeds.py --seeds 0 1 2 3 4 [--calib prose code "prose + code"]

Each run is lessons.damping_calibration.whole_model_run on the offline smollm2-135m with the lesson's
settings (GPTQ 4-bit g128 sym, damp 0.01, 16 calibration windows of 512 tokens drawn with the seed,
perplexity on the first 8 x 512 evaluation tokens of prose and of code: the same tokens for every run). One
JSON per run in data/results/lessons/calibration_seeds/ (an existing one is skipped, so two processes can
share the list: each claims a run with a lock file). Seed 0 repeats the runs lesson 6 stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "results" / "lessons" / "calibration_seeds"


def run_path(calib: str, seed: int) -> Path:
    return OUT / f"gptq-w4-g128-calib-{calib.replace(' + ', '+')}-seed{seed}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--calib", nargs="+", default=["prose", "code", "prose + code"])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import fcntl

    import torch

    from gptq_explorer import DEFAULT_MODEL, QuantConfig, load_model
    from gptq_explorer.lessons.damping_calibration import whole_model_run

    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    locks = Path(tempfile.gettempdir()) / "gptq-explorer-lesson6-locks"
    locks.mkdir(exist_ok=True)
    lm = None
    for seed in a.seeds:
        for calib in a.calib:
            path = run_path(calib, seed)
            if path.exists():
                continue
            lock = open(locks / path.name, "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another process runs it
            if path.exists():
                continue
            lm = lm or load_model(DEFAULT_MODEL)
            res = whole_model_run(lm, QuantConfig(bits=4), "gptq", calib=calib, seed=seed)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1) + "\n")
            os.replace(tmp, path)  # never a half-written result
            print(f"{path.name}: prose {res['ppl prose']:.3f} code {res['ppl code']:.3f} "
                  f"({res['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
