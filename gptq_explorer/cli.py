"""Command line: `gptq-explorer prepare` and `gptq-explorer quantize`.

    gptq-explorer quantize --model smollm2-135m --method gptq --bits 4 --group-size 128 \\
        --calib prose --eval prose,code --json run.json --save out/

Bad arguments exit with code 2 and a message that names the problem and the fix. Everything that can be
checked before the (slow) quantization is checked first: the output paths, the device, the evaluation
corpora and their sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from .engine import QuantConfig
from .metrics.generation import SAMPLE_TOKENS

# A newcomer's run: small enough to finish in a few minutes on 2 CPU cores (the paper uses 128 x 2048).
DEFAULT_NSAMPLES = 16
DEFAULT_SEQLEN = 512
DEFAULT_EVAL_TOKENS = 8192

_INT_FIELDS = ("bits", "group_size", "block_size")
_BOOL_FIELDS = ("sym", "desc_act", "static_groups")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class UsageError(ValueError):
    """A bad command line found after parsing (exit code 2)."""


def _parse_override(text: str) -> tuple[str, dict]:
    """'blocks.0.*:bits=8,group_size=128' -> ('blocks.0.*', {'bits': 8, 'group_size': 128})."""
    pattern, sep, assignments = text.partition(":")
    fields = ", ".join((*_INT_FIELDS, "damp_percent", *_BOOL_FIELDS))
    if not sep or not pattern.strip() or not assignments.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PATTERN:field=value[,field=value], e.g. 'blocks.0.*:bits=8' or "
            f"'*.down_proj:bits=8,group_size=64' (fields: {fields})"
        )
    values = {}
    for item in assignments.split(","):
        key, eq, raw = item.partition("=")
        key, raw = key.strip().replace("-", "_"), raw.strip()
        if not eq or not key or not raw:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not field=value (e.g. bits=8)")
        try:
            if key in _INT_FIELDS:
                values[key] = int(raw)
            elif key == "damp_percent":
                values[key] = float(raw)
            elif key in _BOOL_FIELDS:
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError
                values[key] = raw.lower() in _TRUE
            else:
                raise argparse.ArgumentTypeError(f"{text!r}: unknown field {key!r}; use one of: {fields}")
        except ValueError:
            kind = {"damp_percent": "a number"}.get(key, "an integer" if key in _INT_FIELDS else "true/false")
            raise argparse.ArgumentTypeError(f"{text!r}: {key}={raw!r} must be {kind}") from None
    return pattern.strip(), values


def _merge_overrides(pairs: list[tuple[str, dict]]) -> dict:
    """Repeated --override flags for the same pattern add up (the later flag wins per field); patterns
    keep the order of their first appearance, which is the order quantize_model applies them in."""
    out: dict = {}
    for pattern, values in pairs:
        out.setdefault(pattern, {}).update(values)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptq-explorer", description="Explore GPTQ quantization.")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="convert the offline model to its safetensors cache (once)")
    prep.add_argument("--model", default="smollm2-135m")

    q = sub.add_parser("quantize", help="quantize a model and measure its perplexity")
    q.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a Hugging Face id, or a folder")
    q.add_argument("--method", choices=("fp", "rtn", "gptq"), default="gptq",
                   help="fp = no quantization (the baseline)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="columns per group; -1 = one group per row")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--desc-act", action="store_true")
    q.add_argument("--static-groups", action="store_true")
    q.add_argument("--damp", type=float, default=0.01, help="damp_percent (fraction of mean diag H)")
    q.add_argument("--block-size", type=int, default=128)
    q.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    q.add_argument("--override", action="append", type=_parse_override, default=[],
                   help="per-layer settings, e.g. 'blocks.0.*:bits=8' (repeatable)")
    q.add_argument("--calib", default="prose", help="prose | code | wikitext2 | c4 | ptb | a text file")
    q.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES)
    q.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="calibration window length")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval", default="prose,code", help="comma-separated corpora ('' = none)")
    q.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="tokens per corpus")
    q.add_argument("--eval-seqlen", type=int, default=None,
                   help="perplexity window length (default: --seqlen; the paper uses 2048)")
    q.add_argument("--device", default=None, help="cpu, cuda, or auto")
    q.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $GPTQ_EXPLORER_THREADS, else torch's default)")
    q.add_argument("--bf16", action="store_true", help="bf16 forward passes for evaluation")
    q.add_argument("--rtn-calib", action="store_true",
                   help="RTN: run the calibration data through too (its result does not change) to report "
                        "per-layer output errors on the same inputs as GPTQ")
    q.add_argument("--samples", action="store_true",
                   help="add greedy continuations of the standard prompts to the report ('samples')")
    q.add_argument("--sample-tokens", type=int, default=SAMPLE_TOKENS, help="new tokens per sample")
    q.add_argument("--cache-dir", default=None, help="reuse/store quantization results here")
    q.add_argument("--json", dest="json_path", default=None, help="write the run's report here")
    q.add_argument("--save", default=None, help="export a GPTQ checkpoint to this folder")
    q.add_argument("--format", choices=("gptq", "gptq_v2"), default=None)
    q.add_argument("--overwrite", action="store_true", help="let --save replace an existing folder")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _threads(args) -> int | None:
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        return args.threads
    env = os.environ.get("GPTQ_EXPLORER_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"GPTQ_EXPLORER_THREADS={env!r} must be a positive integer (e.g. 1)")
        return int(env)
    return None


def check_args(args) -> QuantConfig:
    """Everything about the command line that can be checked without loading the model; returns the
    QuantConfig. Raises UsageError / ValueError naming the fix."""
    import torch

    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, damp_percent=args.damp,
                      desc_act=args.desc_act, static_groups=args.static_groups, block_size=args.block_size)
    if args.nsamples < 1 or args.seqlen < 1:
        raise UsageError(f"--nsamples and --seqlen must be positive (got {args.nsamples}, {args.seqlen})")
    eval_seqlen = args.eval_seqlen or args.seqlen
    if eval_seqlen < 2:
        raise UsageError(f"--eval-seqlen must be at least 2, got {eval_seqlen}")
    if [c for c in args.eval.split(",") if c.strip()] and args.eval_tokens < eval_seqlen:
        raise UsageError(
            f"--eval-tokens {args.eval_tokens} is shorter than one perplexity window of {eval_seqlen} "
            "tokens; "
            f"give --eval-tokens >= {eval_seqlen} or a shorter --eval-seqlen"
        )
    if args.rtn_calib and args.method != "rtn":
        raise UsageError(f"--rtn-calib is for --method rtn (GPTQ always uses its calibration data; "
                         f"fp uses none); drop it or use --method rtn (got --method {args.method})")
    if args.samples and args.sample_tokens < 1:
        raise UsageError(f"--sample-tokens must be at least 1, got {args.sample_tokens}")
    if args.method == "fp":
        if args.save:
            raise UsageError("--save needs --method rtn or gptq: a full-precision run has nothing quantized "
                             "to export (use the original model folder)")
        if args.override:
            raise UsageError("--override needs --method rtn or gptq: a full-precision run quantizes nothing")
    if args.save:
        folder = Path(args.save)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not args.overwrite:
            raise UsageError(
                f"--save {folder}: exists and is not empty; choose a new folder or add --overwrite"
            )
    if args.json_path and Path(args.json_path).is_dir():
        raise UsageError(
            f"--json {args.json_path} is a folder; give a file name, e.g. {args.json_path}/run.json"
        )
    if args.device not in (None, "auto") and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device here (torch {torch.__version__}); "
                         "use --device cpu or --device auto")
    if args.device not in (None, "auto"):
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(
                f"--device {args.device!r} is not a device; use cpu, cuda, cuda:0 or auto"
            ) from None
    return cfg


def _corpus_info(corpus: str) -> dict | None:
    from dataclasses import asdict

    from .data import corpus_info

    try:
        return asdict(corpus_info(corpus))
    except ValueError:
        return None


def _environment(device=None) -> dict:
    """Versions and the machine the numbers were measured on; `device` is where blocks ran and GPTQ solved
    (None: the model's own device, the CPU for models loaded here)."""
    import torch
    import transformers

    from . import __version__ as ours

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "gptq_explorer": ours, "git": _git_state(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average": load,
            "device": str(device or "cpu"), **_gpu(device)}


def _gpu(device) -> dict:
    import torch

    if device is None or torch.device(device).type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(torch.device(device)), "cuda": torch.version.cuda}


def _git_state() -> str | None:
    """The checkout's commit, with '+dirty' when the package's own files differ from it (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "gptq_explorer"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def run_quantize(args) -> dict:
    import torch

    from .data import calibration_windows, evaluation_ids
    from .metrics import perplexity
    from .models import load_model
    from .models.quantize import quantize_model

    cfg = check_args(args)
    threads = _threads(args)
    if threads:
        torch.set_num_threads(threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = _merge_overrides(args.override)
    eval_corpora = [c.strip() for c in args.eval.split(",") if c.strip()]
    eval_seqlen = args.eval_seqlen or args.seqlen
    started = time.perf_counter()
    loaded = load_model(args.model)
    timings = {"load": time.perf_counter() - started}
    # evaluation tokens first: a bad corpus name or a short corpus fails before the quantization
    eval_ids = {c: evaluation_ids(loaded.tokenizer, c, args.eval_tokens) for c in eval_corpora}
    report: dict = {"model": args.model, "source": loaded.source, "method": args.method,
                    "config": cfg.to_dict(), "true_sequential": args.true_sequential,
                    "overrides": overrides, "threads": torch.get_num_threads(), "calibration": None,
                    "evaluation": {"corpora": eval_corpora, "tokens": args.eval_tokens, "seqlen": eval_seqlen,
                                   "corpus_info": {c: _corpus_info(c) for c in eval_corpora}},
                    "memory": {}, "export": None}
    layers: list = []
    qm = None
    if args.method != "fp":
        t0 = time.perf_counter()
        calib = None
        if args.method == "gptq" or args.rtn_calib:  # RTN needs no data (only to measure its errors)
            calib = calibration_windows(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
            report["calibration"] = {"corpus": str(args.calib), "nsamples": args.nsamples,
                                     "seqlen": args.seqlen, "seed": args.seed,
                                     "corpus_info": _corpus_info(args.calib)}
        qm = quantize_model(loaded, calib, cfg, method=args.method, true_sequential=args.true_sequential,
                            overrides=overrides, device=device, progress=not args.quiet,
                            cache_dir=args.cache_dir)
        timings["quantize"] = time.perf_counter() - t0
        timings.update({f"quantize_{k}": v for k, v in qm.timings.items()})
        layers = qm.report_rows()
        report["memory"] = dict(qm.memory)
    report["layers"] = layers
    ppl, windows = {}, {}
    for corpus, ids in eval_ids.items():
        t0 = time.perf_counter()
        res = perplexity(loaded.model, ids, seqlen=eval_seqlen, progress=not args.quiet, device=device,
                         amp_dtype=torch.bfloat16 if args.bf16 else None, desc=f"perplexity {corpus}")
        ppl[corpus], windows[corpus] = res.ppl, res.n_windows
        timings[f"eval_{corpus}"] = time.perf_counter() - t0
    report["perplexity"] = ppl
    report["perplexity_windows"] = windows
    if args.samples:
        from .metrics import generate_samples

        t0 = time.perf_counter()
        report["samples"] = generate_samples(loaded.model, loaded.tokenizer,
                                             max_new_tokens=args.sample_tokens)
        timings["samples"] = time.perf_counter() - t0
    if args.save:
        from .checkpoint import save_quantized

        export = save_quantized(qm, args.save, format=args.format, overwrite=args.overwrite)
        report["export"] = {"folder": str(args.save), "format": export.format, "summary": export.summary(),
                            "warnings": list(export.warnings)}
    timings["total"] = time.perf_counter() - started
    report["timings"] = timings
    report["environment"] = _environment(device)
    report["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return report


def print_report(report: dict, out=None) -> None:
    out = out or sys.stdout  # looked up at call time, so redirected/captured stdout works
    cfg = QuantConfig.from_dict(report["config"])
    if report["method"] == "fp":
        what = "full precision (no quantization)"
    else:
        what = f"{report['method'].upper()} {cfg.label()}"
    print(f"\n{report['model']}: {what}", file=out)
    print(report["source"], file=out)
    if report.get("calibration"):
        c = report["calibration"]
        print(f"calibration: {c['nsamples']} x {c['seqlen']} tokens of {c['corpus']} (seed {c['seed']})",
              file=out)
    if report["perplexity"]:
        e = report["evaluation"]
        print(f"\nperplexity ({e['tokens']} tokens per corpus, windows of {e['seqlen']}, paper protocol):",
              file=out)
        print(_table([[k, f"{v:.3f}"] for k, v in report["perplexity"].items()], ["corpus", "perplexity"]),
              file=out)
    if report["layers"]:
        rows = [[r["name"], f"{r['bits']}", f"{r['group_size']}",
                 "" if r.get("output_rel_error") is None else f"{r['output_rel_error']:.2e}",
                 f"{r['seconds']:.2f}"] for r in report["layers"]]
        print(f"\n{len(rows)} quantized linears (output error relative to ||XW^T||^2 on calibration "
              "inputs):", file=out)
        print(_table(rows, ["layer", "bits", "group", "rel. output error", "seconds"]), file=out)
    if report.get("samples"):
        print("\ngreedy samples:", file=out)
        for prompt, text in report["samples"].items():
            print(f"  {prompt!r} -> {text!r}", file=out)
    if report.get("export"):
        print(f"\nexported to {report['export']['folder']}\n{report['export']['summary']}", file=out)
    t = report["timings"]
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if not k.startswith("quantize_")),
          file=out)


def _write_json(path: str, report: dict) -> None:
    """Strict JSON (a non-finite perplexity becomes null), written atomically."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(clean(report), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, p)


def main(argv=None) -> int:
    from .checkpoint.packing import CheckpointFormatError
    from .models.loading import ModelLoadError
    from .models.quantize import QuantizationCancelled

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on a bad flag
    try:
        if args.command == "prepare":
            from .models import load_model

            started = time.perf_counter()
            loaded = load_model(args.model)
            print(f"{args.model} ready in {time.perf_counter() - started:.1f}s. {loaded.source}")
            return 0
        report = run_quantize(args)
    except (ValueError, OSError, ModelLoadError, CheckpointFormatError) as exc:
        # our errors name the problem and the fix
        print(f"gptq-explorer: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, QuantizationCancelled):
        print("gptq-explorer: interrupted; nothing was written (the model's weights were restored)",
              file=sys.stderr)
        return 130
    print_report(report)
    if args.json_path:
        _write_json(args.json_path, report)
        print(f"report written to {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
