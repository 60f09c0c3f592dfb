"""The issue's results table on a real model: FP vs RTN vs GPTQ, 4 and 3 bits, g128 and per row, sym and
asym, as `gptq-explorer quantize --json` reports, one per run, in data/results/<model>/<run-id>.json.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/bench_models.py          # run what is missing
    (same command in a second terminal: a second worker; each run is claimed with a file lock, and two
     1-thread workers get ~1.5x the throughput of one 2-thread process on this 2-core machine)
    python benchmarks/bench_models.py --table-only                              # the table so far
    python benchmarks/bench_models.py --only gptq-w3-g128-sym --force           # redo one run
    python benchmarks/bench_models.py --device cuda --out DIR                   # on a GPU, into DIR
                                      (the report records the device; see docs/results.md, "On a GPU")

Protocol: calibration 128 x 512 tokens of prose (seed 0; RTN's result uses none, but it runs the same
data through to report its per-layer output errors on the same inputs as GPTQ: --rtn-calib); evaluation
on the first 65,536 held-out tokens of prose and of code in non-overlapping windows of 2048 (the paper's
perplexity protocol; tail dropped); greedy samples of the standard prompts (Model Lab shows them).
Resumable: a run whose JSON exists is skipped, and each JSON is written (atomically) the moment its run
finishes. Runs go in order of importance, so an interrupted benchmark has the key rows.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import tempfile
import time
from pathlib import Path

from gptq_explorer import cli
from gptq_explorer.models.catalog import DEFAULT_MODEL
from gptq_explorer.services.results import model_dir, read_reports, results_table, run_id, write_json

NSAMPLES, SEQLEN, EVAL_TOKENS, EVAL_SEQLEN = 128, 512, 65536, 2048


def planned_runs() -> list[tuple[str, str, int, int, bool]]:
    """(run id, method, bits, group size, sym) in order of importance."""
    order = [("fp", 4, 128, True)]
    key = [(4, 128, True), (3, 128, True)]
    rest = [(4, 128, False), (3, 128, False), (4, -1, True), (3, -1, True), (4, -1, False), (3, -1, False)]
    for bits, g, sym in key + rest:
        order += [("rtn", bits, g, sym), ("gptq", bits, g, sym)]
    return [(run_id(m, b, g, s), m, b, g, s) for m, b, g, s in order]


def cli_args(model: str, method: str, bits: int, group: int, sym: bool, threads: int, device: str = "cpu"
             ) -> list[str]:
    argv = ["quantize", "--model", model, "--method", method, "--bits", str(bits), "--group-size", str(group),
            "--sym" if sym else "--asym", "--calib", "prose", "--nsamples", str(NSAMPLES), "--seqlen",
            str(SEQLEN), "--seed", "0", "--eval", "prose,code", "--eval-tokens", str(EVAL_TOKENS),
            "--eval-seqlen", str(EVAL_SEQLEN), "--threads", str(threads), "--device", device, "--samples",
            "--quiet"]
    return argv + (["--rtn-calib"] if method == "rtn" else [])


@contextlib.contextmanager
def claim(model: str, rid: str):
    """Yields True when this process holds run `rid` (an exclusive lock another worker cannot take; the
    kernel drops it if this process dies, so a killed worker never blocks the run), else False."""
    folder = Path(tempfile.gettempdir()) / "gptq-explorer-bench-locks" / model
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{rid}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def add_fp_samples(model: str, out: Path) -> None:
    """The FP report without samples gets them (a few seconds; FP needs no quantization to reproduce)."""
    from gptq_explorer.metrics import generate_samples
    from gptq_explorer.models import load_model

    path = out / "fp.json"
    if not path.exists():
        return
    report = json.loads(path.read_text())
    if report.get("samples"):
        return
    loaded = load_model(model)
    report["samples"] = generate_samples(loaded.model, loaded.tokenizer)
    write_json(path, report)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--table-only", action="store_true", help="print the table from the stored runs")
    p.add_argument("--only", action="append", default=[], help="run id(s) to run (default: all missing)")
    p.add_argument("--force", action="store_true", help="re-run runs that already have a report")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--list", action="store_true", help="list the planned runs and which are done")
    p.add_argument("--device", default="cpu", help="where blocks run and GPTQ solves: cpu or cuda (the "
                   "report records it; a CUDA run's codes differ from the CPU's only by float32 rounding)")
    p.add_argument("--out", type=Path, help="write the reports here instead of data/results/<model>")
    a = p.parse_args(argv)
    out = a.out or model_dir(a.model)
    out.mkdir(parents=True, exist_ok=True)
    plan = planned_runs()
    if a.list or a.table_only:
        if a.list:
            for rid, *_ in plan:
                print(f"{rid:24s} {'done' if (out / f'{rid}.json').exists() else 'missing'}")
        runs = read_reports(out)
        print(f"\n{a.model}: {len(runs)} of {len(plan)} runs in {out}\n")
        print(results_table(runs))
        return 0
    unknown = set(a.only) - {rid for rid, *_ in plan}
    if unknown:
        p.error(f"unknown run id(s) {sorted(unknown)}; see --list")
    done = lambda rid: (out / f"{rid}.json").exists()  # noqa: E731
    todo = [r for r in plan if (not a.only or r[0] in a.only) and (a.force or not done(r[0]))]
    print(f"{len(todo)} run(s) to do: {', '.join(r[0] for r in todo)}", flush=True)
    with claim(a.model, "fp-samples") as mine:
        if mine:
            add_fp_samples(a.model, out)
    spent: dict[str, list[float]] = {}
    for k, (rid, method, bits, group, sym) in enumerate(todo):
        with claim(a.model, rid) as mine:
            if not mine or (done(rid) and not a.force):  # another worker has it, or just finished it
                continue
            t0 = time.perf_counter()
            print(f"[{time.strftime('%H:%M:%S')}] {rid} ...", flush=True)
            args = cli.build_parser().parse_args(cli_args(a.model, method, bits, group, sym, a.threads,
                                                                   a.device))
            report = cli.run_quantize(args)
            report = {"run_id": rid, **report}
            write_json(out / f"{rid}.json", report)
        dt = time.perf_counter() - t0
        spent.setdefault(method, []).append(dt)
        left = todo[k + 1 :]
        avg = {m: sum(v) / len(v) for m, v in spent.items()}
        fallback = max(avg.values())
        eta = sum(avg.get(m, fallback) for _, m, *_ in left)
        ppl = ", ".join(f"{c} {v:.3f}" for c, v in report["perplexity"].items())
        print(f"[{time.strftime('%H:%M:%S')}] {rid} done in {dt / 60:.1f} min: {ppl}; "
              f"{len(left)} left, about {eta / 60:.0f} min", flush=True)
    print()
    print(results_table(read_reports(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
