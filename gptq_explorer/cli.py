"""Command line: `gptq-explorer prepare` and `gptq-explorer quantize`.

    gptq-explorer quantize --model smollm2-135m --method gptq --bits 4 --group-size 128 \\
        --calib prose --eval prose,code --json run.json --save out/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .engine import QuantConfig

# A newcomer's run: small enough to finish in a few minutes on 2 CPU cores (the paper uses 128 x 2048).
DEFAULT_NSAMPLES = 16
DEFAULT_SEQLEN = 512
DEFAULT_EVAL_TOKENS = 16384


def _parse_override(text: str) -> tuple[str, dict]:
    """'blocks.0.*:bits=8,group_size=128' -> ('blocks.0.*', {'bits': 8, 'group_size': 128})."""
    pattern, sep, assignments = text.partition(":")
    if not sep or not pattern or not assignments:
        raise argparse.ArgumentTypeError(f"--override {text!r}: expected PATTERN:field=value[,field=value]")
    values = {}
    for item in assignments.split(","):
        key, eq, raw = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--override {text!r}: {item!r} is not field=value")
        key = key.strip().replace("-", "_")
        if key in ("bits", "group_size", "block_size"):
            values[key] = int(raw)
        elif key == "damp_percent":
            values[key] = float(raw)
        elif key in ("sym", "desc_act", "static_groups"):
            values[key] = raw.strip().lower() in ("1", "true", "yes")
        else:
            raise argparse.ArgumentTypeError(f"--override {text!r}: unknown field {key!r}")
    return pattern, values


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
    q.add_argument("--group-size", type=int, default=128)
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
    q.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval", default="prose,code", help="comma-separated corpora ('' = none)")
    q.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    q.add_argument("--device", default=None, help="cpu, cuda, or auto")
    q.add_argument("--threads", type=int, default=None, help="torch threads")
    q.add_argument("--bf16", action="store_true", help="bf16 forward passes for evaluation")
    q.add_argument("--cache-dir", default=None, help="reuse/store quantization results here")
    q.add_argument("--json", dest="json_path", default=None, help="write the run's report here")
    q.add_argument("--save", default=None, help="export a GPTQ checkpoint to this folder")
    q.add_argument("--format", choices=("gptq", "gptq_v2"), default=None)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run_quantize(args) -> dict:
    import torch

    from .data import calibration_windows, evaluation_ids
    from .metrics import perplexity
    from .models import load_model
    from .models.quantize import quantize_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, damp_percent=args.damp,
                      desc_act=args.desc_act, static_groups=args.static_groups, block_size=args.block_size)
    eval_corpora = [c.strip() for c in args.eval.split(",") if c.strip()]
    started = time.perf_counter()
    loaded = load_model(args.model)
    timings = {"load": time.perf_counter() - started}
    report: dict = {"model": args.model, "source": loaded.source, "method": args.method,
                    "config": cfg.to_dict(), "true_sequential": args.true_sequential,
                    "overrides": dict(args.override), "threads": torch.get_num_threads(),
                    "calibration": None, "evaluation": {"corpora": eval_corpora, "tokens": args.eval_tokens,
                                                        "seqlen": args.seqlen}}
    layers: list = []
    qm = None
    if args.method != "fp":
        t0 = time.perf_counter()
        calib = None
        if args.method == "gptq":
            calib = calibration_windows(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
            report["calibration"] = {"corpus": str(args.calib), "nsamples": args.nsamples,
                                     "seqlen": args.seqlen, "seed": args.seed}
        qm = quantize_model(loaded, calib, cfg, method=args.method, true_sequential=args.true_sequential,
                            overrides=dict(args.override), device=device, progress=not args.quiet,
                            cache_dir=args.cache_dir)
        timings["quantize"] = time.perf_counter() - t0
        timings.update({f"quantize_{k}": v for k, v in qm.timings.items()})
        layers = qm.report_rows()
        report["memory"] = qm.memory
    report["layers"] = layers
    ppl = {}
    for corpus in eval_corpora:
        t0 = time.perf_counter()
        ids = evaluation_ids(loaded.tokenizer, corpus, args.eval_tokens)
        res = perplexity(loaded.model, ids, seqlen=args.seqlen, progress=not args.quiet, device=device,
                         amp_dtype=torch.bfloat16 if args.bf16 else None, desc=f"perplexity {corpus}")
        ppl[corpus] = res.ppl
        timings[f"eval_{corpus}"] = time.perf_counter() - t0
    report["perplexity"] = ppl
    if args.save:
        if qm is None:
            raise SystemExit("--save needs --method rtn or gptq: there is nothing quantized to export")
        from .checkpoint import save_quantized

        export = save_quantized(qm, args.save, format=args.format)
        report["export"] = {"folder": str(args.save), "summary": export.summary()}
    timings["total"] = time.perf_counter() - started
    report["timings"] = timings
    return report


def print_report(report: dict, out=sys.stdout) -> None:
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
    if report.get("export"):
        print(f"\nexported to {report['export']['folder']}\n{report['export']['summary']}", file=out)
    t = report["timings"]
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if not k.startswith("quantize_")),
          file=out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from .models import load_model

            started = time.perf_counter()
            loaded = load_model(args.model)
            print(f"{args.model} ready in {time.perf_counter() - started:.1f}s. {loaded.source}")
            return 0
        report = run_quantize(args)
    except (ValueError, OSError) as exc:  # our errors name the problem and the fix
        print(f"gptq-explorer: error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str))
        print(f"report written to {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
