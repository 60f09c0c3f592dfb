"""Whole-model GPTQ on SmolLM2-135M, side by side in one run: ours (gptq_explorer.quantize_model) and
llm-compressor's GPTQModifier (the vLLM project's quantizer), with the same calibration token ids, the same
config, the same threads, and perplexity of both on the same evaluation ids with our evaluation.

    scripts/llmcompressor_env.sh                          # once: builds .venv-llmc (never the main venv)
    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/bench_llmcompressor.py --group-size 64
    python benchmarks/bench_llmcompressor.py --group-size 64 --group-size -1 --nsamples 128

How (the main venv runs this file; llm-compressor runs in a child process in .venv-llmc, the same file
with --child, importing only torch, transformers, datasets and llm-compressor):
  1. our calibration windows (prose, seed 0) are saved to calib_ids.safetensors; both sides read them;
  2. ours: quantize_model(..., true_sequential=True) timed (block-input catching included);
  3. theirs: oneshot(model, dataset=those ids, recipe=GPTQModifier(...)) timed; then their checkpoint is
     saved compressed (pack-quantized) and re-opened with their decompression (transformers + compressed-
     tensors, run_compressed=False); the decompressed linear weights must equal their in-memory GPTQ
     result, and are handed to us as float32;
  4. perplexity of both with gptq_explorer.metrics.perplexity on the same token ids.
  Model load and checkpoint save are timed apart, on both sides. Same config on both sides: bits, group
  size, sym, damping 1% of mean diag(H), block size 128, no act-order, min-max grid (no MSE search),
  lm_head not quantized. The one difference left: llm-compressor collects the Hessians of all linears of a
  decoder layer in one pass ("sequential" pipeline, layer by layer); ours is true-sequential inside a
  block too (q/k/v, then o, then up/gate, then down: 4 passes' worth of inputs), as the paper's code.

Why the perplexities differ: llm-compressor (0.14) takes each group's scale and zero from its observer on
the ORIGINAL weights, before GPTQ runs (compress_module_list: weight_observer.get_qparams(), then
quantize_weight uses those fixed scales); the paper's code computes a group's scale and zero when GPTQ
reaches the group, from the error-compensated weights. The former is what the reference calls static
groups. --static-groups (and --no-true-sequential) make our side match theirs exactly in semantics;
--reuse-theirs reuses a finished llm-compressor run of the same config (its stored weights, time and
perplexities) so that such a variant costs only our side.

A comparison report (JSON) goes to data/results/comparisons/llmcompressor-smollm2-135m-g<G>.json.
--refusal reproduces llm-compressor's refusal of g128 on SmolLM2 (576 = 4 x 128 + 64) and quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMC_VENV = Path(os.environ.get("GPTQ_EXPLORER_LLMC_VENV", ROOT / ".venv-llmc"))
OUT = ROOT / "data" / "results" / "comparisons"


# ---------------------------------------------------------------------------------------------- child side
# (runs in .venv-llmc: nothing from gptq_explorer is imported here)


def _recipe(bits: int, group_size: int, sym: bool, damp: float):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size, actorder=None, observer="minmax",
    )  # fmt: skip
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                        dampening_frac=damp, actorder=None)  # fmt: skip


def _dataset(ids):
    from datasets import Dataset

    mask = [[1] * ids.shape[1]] * ids.shape[0]
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask})


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(a.ids)["calib_ids"]
    out = Path(a.out)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    report = {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "load_seconds": load_s,
              "batch_size": a.llmc_batch_size}  # fmt: skip
    recipe = _recipe(a.bits, a.group_size, a.sym, a.damp)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        oneshot(model=model, dataset=_dataset(ids), recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=ids.shape[0], shuffle_calibration_samples=False,
                batch_size=a.llmc_batch_size)  # fmt: skip
    except Exception as exc:  # --refusal: what it says about g128 on 576 inputs
        report.update(refused=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
        (out / "child.json").write_text(json.dumps(report, indent=2))
        return
    report["seconds"], report["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    mem = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    t0 = time.perf_counter()
    model.save_pretrained(out / "compressed", save_compressed=True)
    report["save_seconds"] = time.perf_counter() - t0
    report["compressed_files"] = sorted(p.name for p in (out / "compressed").iterdir())
    qcfg = json.loads((out / "compressed" / "config.json").read_text()).get("quantization_config", {})
    report["quantization_config"] = qcfg
    # their decompression: transformers' compressed-tensors integration, de-compressed to dense weights
    from transformers import CompressedTensorsConfig

    dense = CompressedTensorsConfig(run_compressed=False)
    back = AutoModelForCausalLM.from_pretrained(
        out / "compressed", dtype=torch.float32, quantization_config=dense
    )
    dec = {n: back.get_submodule(n).weight.detach().float().clone() for n in names}
    report["decompressed_vs_in_memory_max_abs"] = max(float((dec[n] - mem[n]).abs().max()) for n in names)
    save_file({n: w.contiguous() for n, w in dec.items()}, str(out / "dequantized_linears.safetensors"))
    (out / "child.json").write_text(json.dumps(report, indent=2))


# ---------------------------------------------------------------------------------------------- main side


def run_child(model_dir, ids_file, out, a, group_size: int, nsamples_note: str = "") -> dict:
    py = LLMC_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} not found: build it with scripts/llmcompressor_env.sh")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(py), __file__, "--child", "--model", str(model_dir), "--ids", str(ids_file), "--out", str(out),
           "--bits", str(a.bits), "--group-size", str(group_size), "--threads", str(a.threads),
           "--damp", str(a.damp), "--llmc-batch-size", str(a.llmc_batch_size)]
    cmd += [] if a.sym else ["--asym"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH="")  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)  # their logs go there
    wall = time.perf_counter() - t0
    (out / "child.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (out / "child.json").exists():
        raise SystemExit(f"llm-compressor child failed (rc {proc.returncode}); see {out / 'child.log'}:\n"
                         + (proc.stdout + proc.stderr)[-3000:])  # fmt: skip
    rep = json.loads((out / "child.json").read_text())
    rep["process_wall_seconds"] = wall
    return rep


def nudge_linears(model, eps: float, seed: int = 0) -> None:
    """W <- W * (1 + eps * N(0, 1)) for every linear except lm_head: a change the size of float rounding."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                mod.weight.mul_(1 + eps * torch.randn(mod.weight.shape, generator=gen))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, action="append", help="repeatable; default 64")
    p.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384, help="per corpus (prose and code)")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor's batch_size (default 1)")
    p.add_argument("--refusal", action="store_true", help="reproduce llm-compressor's g128 refusal only")
    p.add_argument("--static-groups", action="store_true",
                   help="ours with static groups (scales from the original weights, as llm-compressor does)")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="ours collects all of a block's Hessians in one pass, as llm-compressor does")
    p.add_argument("--nudge", type=float, default=0.0,
                   help="multiply our side's linear weights by 1 + NUDGE x N(0, 1) (seed 0) before "
                        "quantizing: how far a float-rounding-sized change moves our result")
    p.add_argument("--reuse-theirs", action="store_true",
                   help="reuse the finished llm-compressor run in --work for this config (no time ratio)")
    p.add_argument("--work", default=str(ROOT / "artifacts" / "llmcompressor"), help="scratch folder")
    a = p.parse_args(argv)
    if a.child:
        a.group_size = a.group_size[0]
        child(a)
        return 0

    import torch
    from safetensors.torch import save_file

    from gptq_explorer import QuantConfig
    from gptq_explorer.data import calibration_windows, evaluation_ids
    from gptq_explorer.metrics import perplexity
    from gptq_explorer.models import load_model, set_weight
    from gptq_explorer.models.quantize import quantize_model
    from gptq_explorer.services.reports import environment

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(a.model)
    model_dir = loaded.info.get("path") or a.model
    if a.refusal:  # one short window is enough: the refusal comes before any real work
        ids = calibration_windows(loaded.tokenizer, "prose", 1, 64, 0)
        save_file({"calib_ids": ids.contiguous()}, str(work / "refusal_ids.safetensors"))
        a.bits, a.sym = 4, True
        rep = run_child(model_dir, work / "refusal_ids.safetensors", work / "refusal-g128", a, 128)
        print(f"llm-compressor {rep['llmcompressor']} on g128: {(rep.get('refused') or 'accepted')[:700]}")
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "llmcompressor-smollm2-135m-g128-refusal.json").write_text(json.dumps(rep, indent=2) + "\n")
        return 0

    calib = calibration_windows(loaded.tokenizer, "prose", a.nsamples, a.seqlen, 0)
    ids_file = work / f"calib_ids_{a.nsamples}x{a.seqlen}.safetensors"
    save_file({"calib_ids": calib.contiguous()}, str(ids_file))
    evals = {c: evaluation_ids(loaded.tokenizer, c, a.eval_tokens) for c in ("prose", "code")}
    load_avg = lambda: [round(x, 2) for x in os.getloadavg()]  # noqa: E731
    for g in a.group_size or [64]:
        cfg = QuantConfig(bits=a.bits, group_size=g, sym=a.sym, damp_percent=a.damp, desc_act=False,
                          static_groups=a.static_groups, block_size=128)  # fmt: skip
        variant = (("-static" if a.static_groups else "") + ("" if a.true_sequential else "-nts")
                   + (f"-nudge{a.nudge:g}" if a.nudge else ""))
        report_name = f"llmcompressor-smollm2-135m-g{'row' if g == -1 else g}-{a.nsamples}x{a.seqlen}"
        theirs_dir = work / f"g{g}"
        calib_info = {"corpus": "prose", "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": 0,
                      "ids_file": ids_file.name}  # fmt: skip
        row: dict = {"model": a.model, "config": cfg.to_dict(), "calibration": calib_info,
                     "evaluation": {"tokens": a.eval_tokens, "seqlen": a.eval_seqlen}, "threads": a.threads,
                     "true_sequential_ours": a.true_sequential, "load_average_start": load_avg(),
                     "environment": environment()}  # fmt: skip
        # ours
        ours = load_model(a.model)
        if a.nudge:
            nudge_linears(ours.model, a.nudge)
            row["nudge"] = a.nudge
        t0, c0 = time.perf_counter(), time.process_time()
        # no condition numbers: a diagnostic of our reports (an eigendecomposition per Hessian) that
        # llm-compressor does not compute; the time here is the quantization's alone
        qm = quantize_model(ours, calib, cfg, method="gptq", true_sequential=a.true_sequential,
                            progress=False, hessian_condition=False)
        row["ours"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                       "timings": qm.timings,
                       "peak_rss_bytes": qm.memory.get("peak_rss_bytes")}  # fmt: skip
        # theirs
        base = OUT / f"{report_name}.json"  # the side-by-side run whose llm-compressor half is reused
        if a.reuse_theirs:
            if not (theirs_dir / "child.json").exists() or not base.exists():
                raise SystemExit(f"--reuse-theirs: no finished llm-compressor run in {theirs_dir} with its "
                                 f"report {base}; run once without --reuse-theirs")
            prev = json.loads(base.read_text())
            same = ("bits", "group_size", "sym", "damp_percent")
            if prev["calibration"] != calib_info or prev["evaluation"] != row["evaluation"] or any(
                    prev["config"][k] != cfg.to_dict()[k] for k in same):
                raise SystemExit(f"--reuse-theirs: {base} was made with other settings; run without it")
            rep = {**json.loads((theirs_dir / "child.json").read_text()), "reused": True}
        else:
            rep = run_child(model_dir, ids_file, theirs_dir, a, g)
        row["llmcompressor"] = rep
        row["load_average_end"] = load_avg()
        from safetensors.torch import load_file

        theirs = load_model(a.model)
        dq = load_file(str(theirs_dir / "dequantized_linears.safetensors"))
        missing = set(qm.results) ^ set(dq)
        if missing:
            raise SystemExit(f"the two sides quantized different linears: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, w in dq.items():
                set_weight(theirs.model.get_submodule(name), w)
        # how far apart the two quantized weights are (same grid family; GPTQ's choices may differ)
        diffs, same = [], []
        for name in dq:
            wq = ours.model.get_submodule(name).weight.detach().float()
            diffs.append(float((wq - dq[name]).norm() / wq.norm()))
            same.append(float((wq == dq[name]).float().mean()))
        row["weights"] = {"rel_diff_mean": sum(diffs) / len(diffs), "rel_diff_max": max(diffs),
                          "identical_fraction_mean": sum(same) / len(same)}  # fmt: skip
        row["perplexity"] = {"ours": {}, "llmcompressor": {}}
        for corpus, ids in evals.items():
            for who, m in (("ours", ours.model), ("llmcompressor", theirs.model)):
                if who == "llmcompressor" and a.reuse_theirs:  # the same weights on the same ids
                    row["perplexity"][who][corpus] = prev["perplexity"][who][corpus]
                    continue
                row["perplexity"][who][corpus] = perplexity(m, ids, seqlen=a.eval_seqlen, progress=False).ppl
        if not a.reuse_theirs:  # a reused run was not measured side by side: no time ratio
            row["time_ratio_ours_over_theirs"] = row["ours"]["seconds"] / rep["seconds"]
        if rep.get("cpu_seconds") and not a.reuse_theirs:  # CPU time: less sensitive to other processes
            row["cpu_time_ratio_ours_over_theirs"] = row["ours"]["cpu_seconds"] / rep["cpu_seconds"]
        pp = row["perplexity"]
        row["ppl_ratio_ours_over_theirs"] = {c: pp["ours"][c] / pp["llmcompressor"][c] for c in evals}
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{report_name}{variant}.json"
        path.write_text(json.dumps(row, indent=2) + "\n")
        ratio = row.get("time_ratio_ours_over_theirs")
        print(f"g{g}{variant}: ours {row['ours']['seconds']:.1f}s, llm-compressor {rep['seconds']:.1f}s "
              f"(ratio {'n/a, reused' if ratio is None else f'{ratio:.2f}'}); weights {row['weights']}; "
              f"ppl ours {row['perplexity']['ours']} theirs {row['perplexity']['llmcompressor']}; "
              f"written {path}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
