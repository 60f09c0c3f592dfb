"""Command line: `gptq-explorer prepare`, `gptq-explorer quantize` and `gptq-explorer export-site`.

    gptq-explorer quantize --model smollm2-135m --method gptq --bits 4 --group-size 128 \\
        --calib prose --eval prose,code --json run.json --save out/

Bad arguments exit with code 2 and a message that names the problem and the fix. Everything that can be
checked before the (slow) quantization is checked first: the output paths, the device, the evaluation
corpora and their sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .engine import QuantConfig
from .metrics.generation import SAMPLE_TOKENS
from .models.catalog import DEFAULT_MODEL
from .settings import KNOBS, QUANT_KEYS, Knob, parse_assignments, resolve

CLI_KNOBS = tuple(KNOBS)  # `quantize` takes every knob as a flag, in the order they are declared


class UsageError(ValueError):
    """A bad command line found after parsing (exit code 2)."""


def knob_dest(knob: Knob) -> str:
    """The argparse attribute of a knob: its flag's name (--damp -> args.damp, --calib -> args.calib)."""
    return knob.flag.lstrip("-").replace("-", "_")


def _add_knob(parser: argparse.ArgumentParser, knob: Knob) -> None:
    """The knob's flag(s), default and help, from its declaration (values are checked in check_args, so a
    bad one exits through main with code 2 and the knob's own message)."""
    dest = knob_dest(knob)
    if knob.type is bool:
        if knob.off_flag:  # on by default: a pair of flags
            pair = parser.add_mutually_exclusive_group()
            pair.add_argument(knob.flag, dest=dest, action="store_true", default=knob.default, help=knob.help)
            pair.add_argument(knob.off_flag, dest=dest, action="store_false",
                              help=f"the opposite of {knob.flag}")
        else:
            parser.add_argument(knob.flag, dest=dest, action="store_true", default=knob.default,
                                help=knob.help)
        return
    parser.add_argument(knob.flag, dest=dest, type=knob.type, default=knob.default, help=knob.help)


def _parse_override(text: str) -> tuple[str, dict]:
    """'blocks.0.*:bits=8,group_size=128' -> ('blocks.0.*', {'bits': 8, 'group_size': 128})."""
    pattern, sep, assignments = text.partition(":")
    if not sep or not pattern.strip() or not assignments.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PATTERN:field=value[,field=value], e.g. 'blocks.0.*:bits=8' or "
            f"'*.down_proj:bits=8,group_size=64' (fields: {', '.join(QUANT_KEYS)})"
        )
    try:
        return pattern.strip(), parse_assignments(assignments, QUANT_KEYS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


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

    prep = sub.add_parser("prepare", help="convert the offline model to its safetensors cache and store its "
                                          "first layer for the Layer Lab (once)")
    prep.add_argument("--model", default=DEFAULT_MODEL)
    prep.add_argument("--check", action="store_true",
                      help=f"only say whether {DEFAULT_MODEL} is converted and its first layer stored "
                           "already (exit 0) or not (exit 1); torch-free")

    site = sub.add_parser("export-site", help="write the Layer Lab as a static site (docs/site.md)")
    site.add_argument("folder", help="the site's folder (new, or empty)")
    site.add_argument("--model", default=DEFAULT_MODEL,
                      help=f"{DEFAULT_MODEL}, a Hugging Face id, or a folder")
    site.add_argument("--layers", default=None,
                      help="BLOCK:SUBLAYER,... (default: 0:self_attn.q_proj,0:mlp.up_proj,"
                           "29:self_attn.q_proj,29:mlp.down_proj)")
    site.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    q = sub.add_parser("quantize", help="quantize a model and measure its perplexity")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"{DEFAULT_MODEL}, a Hugging Face id, or a folder")
    q.add_argument("--method", choices=("fp", "rtn", "gptq"), default="gptq",
                   help="fp = no quantization (the baseline)")
    for name in CLI_KNOBS:
        _add_knob(q, KNOBS[name])
    q.add_argument("--override", action="append", type=_parse_override, default=[],
                   help="per-layer settings, e.g. 'blocks.0.*:bits=8' (repeatable)")
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


def knob_values(args) -> dict:
    """{knob name: value} from the command line, each checked by its knob (UsageError naming the flag);
    a knob that follows another (--eval-seqlen follows --seqlen) is resolved."""
    values = {}
    for name in CLI_KNOBS:
        knob = KNOBS[name]
        value = getattr(args, knob_dest(knob))
        try:
            values[name] = knob.check(value)
        except ValueError as exc:
            raise UsageError(f"{knob.flag} {value}: {exc}") from None
    return resolve(values)


def check_args(args) -> QuantConfig:
    """Everything about the command line that can be checked without loading the model; returns the
    QuantConfig. Raises UsageError / ValueError naming the fix."""
    import torch

    values = knob_values(args)
    cfg = QuantConfig(**{k: values[k] for k in QUANT_KEYS})
    eval_seqlen = values["eval_seqlen"]
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


def run_quantize(args) -> dict:
    """`gptq-explorer quantize`: the command line checked, then one services.reports.build_report call
    (the report's schema: gptq_explorer.services.results)."""
    import torch

    from .services.reports import ComputeSettings, build_report

    cfg = check_args(args)
    values = knob_values(args)
    threads = _threads(args)
    if threads:
        torch.set_num_threads(threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = ComputeSettings(
        corpus=values["corpus"], nsamples=values["nsamples"], seqlen=values["seqlen"], seed=values["seed"],
        eval_corpora=tuple(c.strip() for c in values["eval"].split(",") if c.strip()),
        eval_tokens=values["eval_tokens"], eval_seqlen=values["eval_seqlen"],
        max_new_tokens=args.sample_tokens)
    return build_report(args.model, args.method, cfg, settings, true_sequential=args.true_sequential,
                        overrides=_merge_overrides(args.override), device=device, rtn_calib=args.rtn_calib,
                        samples=args.samples, bf16=args.bf16, cache_dir=args.cache_dir, save=args.save,
                        save_format=args.format, overwrite=args.overwrite, bars=not args.quiet)


def run_export_site(args) -> int:
    """`gptq-explorer export-site FOLDER`: the static Layer Lab (services.site_export)."""
    from .services.site_export import DEFAULT_LAYERS, export_site, parse_layers

    layers = parse_layers(args.layers) if args.layers else DEFAULT_LAYERS
    export_site(args.folder, model=args.model, layers=layers, overwrite=args.overwrite, progress=print)
    print(f"open {Path(args.folder) / 'index.html'} in a browser, or put the folder on any static host")
    return 0


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


def main(argv=None) -> int:
    from .checkpoint.packing import CheckpointFormatError
    from .models.capture import Cancelled
    from .models.load_errors import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on a bad flag
    try:
        if args.command == "prepare" and args.check:
            from .models.cache_folders import offline_model_ready
            from .services import layer_store
            from .services.layer_source import ModelSource

            if not offline_model_ready():
                print(f"{DEFAULT_MODEL}: not converted yet (run gptq-explorer prepare)")
                return 1
            if layer_store.enabled() and layer_store.read(ModelSource().store_key()) is None:  # verified
                print(f"{DEFAULT_MODEL}: converted; its first layer is not stored yet "
                      "(run gptq-explorer prepare)")
                return 1
            print(f"{DEFAULT_MODEL}: ready")
            return 0
        if args.command == "prepare":
            from .services import layer_store
            from .services.layer_source import ModelSource, get_model

            started = time.perf_counter()
            loaded = get_model(args.model)
            print(f"{args.model} ready in {time.perf_counter() - started:.1f}s. {loaded.source}")
            first, folder = ModelSource(model=args.model), None
            if layer_store.enabled():
                first.load()  # the store's copy when it is there and sound, else captured and stored
                folder = layer_store.entry_path(first.store_key())
            print(f"{first.name}: " + (f"in the layer store, {folder}" if folder and folder.is_dir()
                                       else "not stored (the layer store is off or could not be written)"))
            return 0
        if args.command == "export-site":
            return run_export_site(args)
        report = run_quantize(args)
    except (ValueError, OSError, ModelLoadError, CheckpointFormatError) as exc:
        # our errors name the problem and the fix
        print(f"gptq-explorer: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Cancelled):
        print("gptq-explorer: interrupted; nothing was written (the model's weights were restored)",
              file=sys.stderr)
        return 130
    print_report(report)
    if args.json_path:
        from .services.results import write_json

        write_json(args.json_path, report)
        print(f"report written to {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
