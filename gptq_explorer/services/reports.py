"""The one report builder: quantize a whole model (or not: "fp"), measure it, and say how.

    report = build_report("smollm2-135m", "gptq", QuantConfig(bits=4), ComputeSettings())

`gptq-explorer quantize` (cli.run_quantize: argument handling + this call) writes what it returns with
`--json`; the Model Lab's Compute button shows and caches it (plus "settings"). The schema is documented
in services.results (the shipped runs are such reports).

ComputeSettings: what is measured (calibration and evaluation; its defaults are the knobs of
gptq_explorer.settings); REDUCED: the Model Lab's named reduction of them, so that its Compute button
stays short on a small CPU machine. describe_report: a report's settings in words.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..metrics.generation import SAMPLE_PROMPTS, SAMPLE_TOKENS
from ..models.capture import Cancelled
from ..settings import KNOBS, resolve

METHODS = ("fp", "rtn", "gptq")
Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)


def _default(name: str) -> Any:
    return KNOBS[name].default


@dataclass(frozen=True)
class ComputeSettings:
    """What a report measures. Calibration: `nsamples` windows of `seqlen` tokens of `corpus` (drawn with
    `seed`); evaluation: the first `eval_tokens` evaluation tokens of each of `eval_corpora` in windows of
    `eval_seqlen`; greedy samples of `max_new_tokens` tokens; `batch_size` evaluation windows per forward
    pass (None: metrics.perplexity's choice). Defaults: the knobs of gptq_explorer.settings."""

    corpus: str = _default("corpus")
    nsamples: int = _default("nsamples")
    seqlen: int = _default("seqlen")
    eval_corpora: tuple = tuple(c.strip() for c in _default("eval").split(",") if c.strip())
    eval_tokens: int = _default("eval_tokens")
    eval_seqlen: int | None = _default("eval_seqlen")  # None: the calibration seqlen (the knob follows it)
    seed: int = _default("seed")
    max_new_tokens: int = SAMPLE_TOKENS
    batch_size: int | None = None

    def __post_init__(self) -> None:
        values = resolve({"seqlen": self.seqlen, "eval_seqlen": self.eval_seqlen})
        object.__setattr__(self, "eval_seqlen", values["eval_seqlen"])

    def describe(self) -> str:
        return (f"{self.nsamples}x{self.seqlen} {self.corpus} calibration, {self.eval_tokens} evaluation "
                f"tokens per corpus (windows of {self.eval_seqlen})")


# The Model Lab's Compute button: shorter calibration windows, half the evaluation tokens (in windows of the
# default length), 4 windows per forward pass.
REDUCED = ComputeSettings(seqlen=256, eval_tokens=4096, eval_seqlen=ComputeSettings().eval_seqlen,
                          batch_size=4)


def describe_report(report: dict) -> str:
    """'128x512 prose calibration, 16384 evaluation tokens per corpus (windows of 512)' from a report."""
    parts = []
    calib = report.get("calibration")
    if calib:
        parts.append(f"{calib.get('nsamples')}x{calib.get('seqlen')} {calib.get('corpus')} calibration")
    elif report.get("method") == "rtn":
        parts.append("RTN needs no calibration")
    ev = report.get("evaluation") or {}
    if ev:
        parts.append(f"{ev.get('tokens')} evaluation tokens per corpus (windows of {ev.get('seqlen')})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# where the numbers were measured


def corpus_info(corpus: str) -> dict | None:
    """A corpus' provenance for a report (None for a corpus that has none, e.g. a text file)."""
    from ..data import corpus_info as info

    try:
        return dataclasses.asdict(info(corpus))
    except ValueError:
        return None


def environment(device=None) -> dict:
    """Versions and the machine the numbers were measured on; `device` is where blocks ran and GPTQ solved
    (None: the model's own device, the CPU for models loaded here)."""
    import torch
    import transformers

    from .. import __version__ as ours

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "gptq_explorer": ours, "git": git_state(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), **cpu(), "load_average": load,
            "device": str(device or "cpu"), **gpu(device)}


def cpu() -> dict:
    """{"cpu": model name (Linux), "cpu_capability": the vector instructions torch's CPU kernels use, e.g.
    "AVX2" or "AVX512"}: CPU timings halve or double with them (docs/performance.md)."""
    import torch

    name = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {"cpu": name, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def gpu(device) -> dict:
    """{"gpu": card name, "cuda": toolkit version} for a CUDA device, {} otherwise."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(torch.device(device)), "cuda": torch.version.cuda}


def git_state() -> str | None:
    """The checkout's commit, with '+dirty' when the package's own files differ from it (None outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "gptq_explorer"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# ---------------------------------------------------------------------------------------------------------
# the builder


def build_report(
    model,
    method: str,
    cfg=None,
    settings: ComputeSettings | None = None,
    *,
    name: str | None = None,
    private_copy: bool | None = None,
    true_sequential: bool = True,
    overrides: dict | None = None,
    device=None,
    rtn_calib: bool = False,
    samples: bool = False,
    bf16: bool = False,
    cache_dir=None,
    save_hessians: bool = True,
    hessian_condition: bool = True,
    save=None,
    save_format: str | None = None,
    overwrite: bool = False,
    bars: bool = False,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    extra: dict | None = None,
) -> dict:
    """One run's report (the schema of services.results): quantize `model` with `method` ("fp": not at
    all) and `cfg`, then measure perplexity (and, with `samples`, greedy generations) as `settings` says.

    model: a name for models.load_model (loaded here, its time in timings["load"]) or a LoadedModel.
    name: the report's "model" (default: the name given, or the LoadedModel's name). private_copy: work on
    a hook-free copy (models.capture.clean_copy) and leave the given model untouched; default: when a
    LoadedModel is given (it may be shared, e.g. services.layer_source.get_model's).
    true_sequential, overrides, device, cache_dir, save_hessians, hessian_condition: quantize_model's.
    rtn_calib: RTN runs the calibration data through too (its result does not change) to report per-layer
    output errors on the same inputs as GPTQ. bf16: evaluation forward passes under bf16 autocast.
    save / save_format / overwrite: export a GPTQ checkpoint (checkpoint.save_quantized).
    bars: tqdm progress bars (the command line). progress(fraction, text): a dashboard's progress bar.
    should_cancel(): polled between layers and batches; True raises Cancelled (nothing is returned and the
    given model is unchanged). extra: keys added to the report as given.
    The evaluation tokens are read before anything is quantized: a bad corpus fails first.
    """
    from ..data import evaluation_ids
    from ..engine import QuantConfig
    from ..models.capture import clean_copy

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    cfg = QuantConfig.coerce(cfg)
    settings = settings or ComputeSettings()
    check = _cancel_check(should_cancel)
    started = time.perf_counter()
    timings: dict = {}
    loaded, name, private_copy = _open_model(model, name, private_copy, timings)
    check()
    tok = loaded.tokenizer
    eval_ids = {c: evaluation_ids(tok, c, settings.eval_tokens) for c in settings.eval_corpora}
    report = _report_head(name, loaded.source, method, cfg, settings, true_sequential, overrides)
    work = clean_copy(loaded.model) if private_copy else loaded.model
    quant_share = 0.0 if method == "fp" else 0.7  # of the progress bar (the rest: measuring)
    qm = None
    try:
        if method != "fp":
            options = dict(true_sequential=true_sequential, overrides=overrides, device=device, progress=bars,
                           cancel=should_cancel, cache_dir=cache_dir, save_hessians=save_hessians,
                           hessian_condition=hessian_condition)
            qm = _quantize(work, tok, method, cfg, settings, report, timings, rtn_calib=rtn_calib,
                           progress=progress, quant_share=quant_share, options=options)
        report["layers"] = [] if qm is None else qm.report_rows()
        _measure(work, tok, eval_ids, settings, report, timings, samples=samples, progress=progress,
                 quant_share=quant_share, bars=bars, device=device, bf16=bf16, check=check)
        if save:
            report["export"] = _export(qm, save, save_format, overwrite)
    finally:
        work = qm = None  # a kept exception's traceback must not keep a model copy alive
    return _close(report, timings, started, device, extra)


# the builder's steps, in the order it takes them; each fills its part of the report (the schema's key
# order is the order of these assignments)


def _cancel_check(should_cancel: Callable[[], bool] | None) -> Callable[[], None]:
    """check(): raises Cancelled when should_cancel() says so (never without one)."""

    def check() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled")

    return check


def _open_model(model, name: str | None, private_copy: bool | None, timings: dict) -> tuple:
    """(LoadedModel, the report's name, whether to work on a copy). A name is loaded here and is ours to
    change; a given LoadedModel may be shared, so by default it is copied."""
    from ..models import load_model

    if isinstance(model, (str, os.PathLike)):
        t0 = time.perf_counter()
        loaded = load_model(str(model))
        timings["load"] = time.perf_counter() - t0
        return loaded, name or str(model), bool(private_copy)
    return model, name or model.name, True if private_copy is None else private_copy


def _report_head(name: str, source, method: str, cfg, settings: ComputeSettings, true_sequential: bool,
                 overrides: dict | None) -> dict:
    """The report's first keys: what the run is. calibration, memory and export are filled in by the steps
    that know them (None / {} when they do not happen)."""
    import torch

    corpora = list(settings.eval_corpora)
    return {"model": name, "source": source, "method": method, "config": cfg.to_dict(),
            "true_sequential": true_sequential, "overrides": dict(overrides or {}),
            "threads": torch.get_num_threads(), "calibration": None,
            "evaluation": {"corpora": corpora, "tokens": settings.eval_tokens, "seqlen": settings.eval_seqlen,
                           "corpus_info": {c: corpus_info(c) for c in corpora}},
            "memory": {}, "export": None}


def _quantize(work, tok, method: str, cfg, settings: ComputeSettings, report: dict, timings: dict, *,
              rtn_calib: bool, progress: Progress | None, quant_share: float, options: dict):
    """Quantize `work` in place (quantize_model; options: its other keyword arguments) and return the
    QuantizedModel; fills the report's calibration and memory (and from_cache) and the quantize timings.
    progress moves through [0, quant_share] as the decoder blocks are reached."""
    from ..data import calibration_windows
    from ..models import get_adapter
    from ..models.capture import hooks
    from ..models.quantize import QuantizationCancelled, quantize_model

    t0 = time.perf_counter()
    calib = None
    if method == "gptq" or rtn_calib:  # RTN needs no data (only to measure its errors)
        calib = calibration_windows(tok, settings.corpus, settings.nsamples, settings.seqlen, settings.seed)
        report["calibration"] = {"corpus": str(settings.corpus), "nsamples": settings.nsamples,
                                 "seqlen": settings.seqlen, "seed": settings.seed,
                                 "corpus_info": corpus_info(settings.corpus)}
    # the dashboard's progress: a pre-hook on each decoder block says which one is being quantized
    blocks = get_adapter(work).get_blocks(work) if progress is not None else []
    watched = {str(i): b for i, b in enumerate(blocks)}

    def block_started(call) -> None:
        i = int(call.name) + 1
        progress(quant_share * i / len(blocks), f"quantizing block {i}/{len(blocks)}")

    try:
        with hooks(watched, block_started, when="before"):
            qm = quantize_model(work, calib, cfg, method=method, tokenizer=tok, **options)
    except QuantizationCancelled as exc:
        raise Cancelled(str(exc)) from None
    timings["quantize"] = time.perf_counter() - t0
    timings.update({f"quantize_{k}": v for k, v in qm.timings.items()})
    report["memory"] = dict(qm.memory)
    if options["cache_dir"] is not None:
        report["from_cache"] = qm.from_cache
    return qm


def _measure(work, tok, eval_ids: dict, settings: ComputeSettings, report: dict, timings: dict, *,
             samples: bool, progress: Progress | None, quant_share: float, bars: bool, device, bf16: bool,
             check: Callable[[], None]) -> None:
    """Perplexity on each evaluation corpus (then, with `samples`, greedy generations) into the report, each
    one's time into timings; progress moves through [quant_share, 1)."""
    import torch

    from ..metrics import generate_samples, perplexity

    say = progress or (lambda fraction, text: None)
    ppl, windows = {}, {}
    span = (1 - quant_share) * 0.85 / max(len(settings.eval_corpora), 1)  # of the progress bar, per corpus
    for i, (corpus, ids) in enumerate(eval_ids.items()):
        t0 = time.perf_counter()
        base = quant_share + i * span
        say(base, f"perplexity on {corpus}")

        def windows_done(f, base=base, corpus=corpus):
            say(base + f * span, f"perplexity on {corpus}")

        res = perplexity(work, ids, seqlen=settings.eval_seqlen, batch_size=settings.batch_size,
                         progress=bars if progress is None else windows_done, device=device,
                         amp_dtype=torch.bfloat16 if bf16 else None, desc=f"perplexity {corpus}",
                         check=check)
        ppl[corpus], windows[corpus] = res.ppl, res.n_windows
        timings[f"eval_{corpus}"] = time.perf_counter() - t0
    report["perplexity"] = ppl
    report["perplexity_windows"] = windows
    if samples:
        say(quant_share + (1 - quant_share) * 0.85, "generating samples")
        t0 = time.perf_counter()
        report["samples"] = generate_samples(work, tok, SAMPLE_PROMPTS, settings.max_new_tokens, check)
        timings["samples"] = time.perf_counter() - t0


def _export(qm, folder, format: str | None, overwrite: bool) -> dict:
    """The report's "export": `qm` written as a GPTQ checkpoint folder (checkpoint.save_quantized)."""
    from ..checkpoint import save_quantized

    if qm is None:
        raise ValueError("save needs method 'rtn' or 'gptq': a full-precision run has nothing "
                         "quantized to export")
    export = save_quantized(qm, folder, format=format, overwrite=overwrite)
    return {"folder": str(folder), "format": export.format, "summary": export.summary(),
            "warnings": list(export.warnings)}


def _close(report: dict, timings: dict, started: float, device, extra: dict | None) -> dict:
    """The report's last keys: the timings (total since `started`), where it ran, when, and `extra`."""
    timings["total"] = time.perf_counter() - started
    report["timings"] = timings
    report["environment"] = environment(device)
    report["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report.update(extra or {})
    return report
