"""An outside loader reads our exported GPTQ checkpoints: GPTQModel 7.6.0, alone and under transformers.

GPTQModel lives in its own virtual environment, ``.venv-outside`` (built by
``scripts/outside_loader_env.sh`` from ``requirements/outside-loader.txt``), so that the main install stays
lean. Each test below starts that environment's python on this very file (see ``main`` at the bottom):
the child exports a quantized model with our ``save_quantized``, opens the folder both with our
``load_quantized`` and with GPTQModel (``GPTQModel.load`` and, for the tiny model, transformers'
``AutoModelForCausalLM.from_pretrained`` with optimum + gptqmodel), runs the same token ids through both
and writes the numbers to a JSON report. The parent (the main test run) asserts on the report, so the
numbers show up in failures. Without ``.venv-outside`` the tests skip (they fail instead when
GPTQ_EXPLORER_REQUIRE_OUTSIDE=1, as in CI). GPTQ_EXPLORER_OUTSIDE_VENV points at another environment.

What is compared, and the tolerances:

* Weights, per quantized linear (GPTQModel's torch kernel ``TorchLinear``): its ``dequantize_weight()``
  (fp16) against ours, ``fp16(scale) * (code - zero)`` in float32. That product of an fp16 scale and a
  small integer is exact in float32 and GPTQModel computes it in fp16, so its weights must be exactly our
  weights rounded to fp16 (relative error <= 2**-11). A wrong zero convention (v1 vs v2), a wrong g_idx
  or a packing mismatch is off by a whole scale step.
* Logits: GPTQModel runs in fp16 on the CPU (its torch kernels take fp16/bf16 only; fp16 is chosen for
  its 3 more mantissa bits); ours run in float32. Both are cast to float32; the relative error
  ``||a - b|| / ||b||`` must stay under 1 % (measured: 0.07 % on the tiny LLaMA and 0.17 % on SmolLM2
  with TorchLinear, 0.37 % on the tiny LLaMA with the ATen int4 kernel, which has no dequantized weight
  to compare), and the top-1 token must agree at >= 99 % of SmolLM2's positions (a real text) and at
  >= 95 % of the tiny random model's (its logits are nearly flat, so a near-tie may flip; measured 100 %).

What GPTQModel 7.6.0 does with our folders on the CPU (the backend each case asks for follows from it):

* ``backend="gptq_torch"`` (``TorchLinear``) loads every case here: 2/3/4/8 bits, sym (v1 ``gptq``) and
  asym (``gptq_v2``), desc_act, and group sizes that leave a shorter last group (g128 on 576 = 4x128+64).
* ``backend="auto"`` picks ``TorchAtenLinear`` (ATen ``_weight_int4pack_mm_for_cpu``) for 4-bit with
  groups 32/64/128. That op needs ``in_features % group_size == 0``, so SmolLM2 at g128 loads but fails in
  the first forward ("expect K to be divisible by qGroupSize"); g32/g64 work. For group_size -1 it picks
  ``TorchFusedLinear``, which fails unless in_features is 32, 64, 128 or 256.
* Asymmetric checkpoints in the classic v1 format are refused whatever their zeros ("Loading of a
  sym=False model with format=FORMAT.GPTQ is only supported if produced by gptqmodel ..."): asym must be
  written as ``gptq_v2``, which is what ``save_quantized`` does by default.
* transformers 5.24 + optimum 2.3.0 + gptqmodel load the same folders through ``from_pretrained`` and
  select the same kernels; ``quantization_config=GPTQConfig(bits=..., backend="gptq_torch")`` passes the
  backend (only its loading attributes are used; the folder's config wins for the rest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_VENV = ROOT / os.environ.get("GPTQ_EXPLORER_OUTSIDE_VENV", ".venv-outside")  # absolute wins
OUTSIDE_PY = OUTSIDE_VENV / "bin" / "python"

VOCAB = 260  # the byte tokenizer of tiny_models: 256 bytes + <|endoftext|> + spare rows
LOGITS_REL_TOL = 0.01
WEIGHT_REL_TOL = 2.0**-11  # fp16 rounding: at most half an ulp, i.e. 2**-11 relative

# tiny LLaMA cases: name -> (bits, group_size, sym, desc_act, export format, GPTQModel backend)
TINY_CASES = {
    "sym-g128-ragged": (4, 128, True, False, None, "gptq_torch"),  # hidden 192: last group of 64
    "asym-g64-desc-v2": (4, 64, False, True, None, "gptq_torch"),  # asym -> gptq_v2
    "sym-g64-auto": (4, 64, True, False, None, "auto"),  # what a user gets by default
    "sym-8bit-g32": (8, 32, True, False, None, "gptq_torch"),
    "asym-3bit-g32": (3, 32, False, False, None, "gptq_torch"),
    "sym-2bit-g32": (2, 32, True, False, None, "gptq_torch"),
}
# transformers AutoModelForCausalLM.from_pretrained (optimum + gptqmodel) on these cases' folders
TINY_HF_CASES = {"sym-g128-ragged": "gptq_torch", "asym-g64-desc-v2": "gptq_torch", "sym-g64-auto": "auto"}
# What GPTQModel 7.6.0 refuses (pinned here, so that an upgrade that changes it is noticed):
# name -> (a TINY_CASES folder to reuse, or (bits, group_size, sym, desc_act, format) to export),
#         backend, the words of the error
TINY_REFUSED_CASES = {
    # asymmetric checkpoints in the classic v1 format are refused unless GPTQModel's own GPTAQ/FOEM made
    # them (loader.py), whatever the zeros: asym must be exported as gptq_v2, which is our default
    "asym-g64-v1": (
        (4, 64, False, False, "gptq"),
        "gptq_torch",
        "sym=False model with format=FORMAT.GPTQ is only supported",
    ),
    # backend="auto" picks the ATen int4 kernel, which cannot run a shorter last group
    "sym-g128-ragged-auto": ("sym-g128-ragged", "auto", "expect K to be divisible by qGroupSize"),
}


# ------------------------------------------------------------------ the parent side (main test run)


def run_outside(kind: str, tmp_path: Path, timeout: float) -> dict:
    if not OUTSIDE_PY.exists():
        why = f"no outside-loader environment at {OUTSIDE_VENV}: build it with scripts/outside_loader_env.sh"
        if os.environ.get("GPTQ_EXPLORER_REQUIRE_OUTSIDE") == "1":  # CI: never skip silently
            pytest.fail(why)
        pytest.skip(why)
    report = tmp_path / f"{kind}-report.json"
    env = {
        **os.environ,
        "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # GPTQModel torch.compiles TorchLinear's dequantization on load; on 2 cores that costs ~20 s per new
    # layer shape and changes no number (checked: identical logits). TORCHDYNAMO_DISABLE=0 turns it on.
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    cmd = [str(OUTSIDE_PY), __file__, kind, str(tmp_path / kind), str(report)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0 or not report.exists():
        out = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"outside loader child '{kind}' failed (rc {proc.returncode}):\n{out}")
    data = json.loads(report.read_text())
    print(f"\n[outside loader] {kind}: {time.perf_counter() - t0:.0f} s in the child")
    print(json.dumps(data, indent=1))
    return data


def check_load(name: str, r: dict, min_argmax: float) -> None:
    assert r["logits_rel_error"] < LOGITS_REL_TOL, (name, r)
    assert r["argmax_agreement"] >= min_argmax, (name, r)
    if r["backend"] == "gptq_torch":
        assert set(r["kernels"]) == {"TorchLinear"}, (name, r["kernels"])
        assert r["weights_checked"] == r["n_quantized"], (name, r)
        assert r["weight_max_rel_error"] <= WEIGHT_REL_TOL, (name, r)
        assert r["weights_equal_fp16_of_ours"], (name, r)


def test_gptqmodel_loads_tiny_llama(tmp_path):
    report = run_outside("tiny", tmp_path, timeout=600)
    assert set(report["gptqmodel"]) == set(TINY_CASES)
    for name, r in report["gptqmodel"].items():
        assert r["format"] == r["expected_format"], (name, r)
        check_load(name, r, min_argmax=0.95)
    for name, r in report["transformers"].items():
        check_load(f"transformers:{name}", r, min_argmax=0.95)
    assert set(report["transformers"]) == set(TINY_HF_CASES)
    for name, (_, _, words) in TINY_REFUSED_CASES.items():
        got = report["refused"][name]
        assert words in got.get("refused", ""), (f"GPTQModel's behaviour changed for {name}", got)


@pytest.mark.slow
def test_gptqmodel_loads_smollm2(tmp_path):
    """SmolLM2-135M at 4-bit sym g128: 576 % 128 = 64, so the last group of the 576-wide linears is short."""
    report = run_outside("smollm2", tmp_path, timeout=900)
    r = report["gptqmodel"]["sym-g128"]
    assert r["ragged_layers"] > 0  # the case this test is about
    check_load("gptqmodel:sym-g128", r, min_argmax=0.99)


# ------------------------------------------------------------------ the child side (outside venv)


def _tiny_quantized(bits, group_size, sym, desc_act, seed=0):
    """A one-block random LLaMA (hidden 192, MLP 256) with every linear GPTQ-quantized on a random
    Hessian, in the shape save_quantized reads (as in test_checkpoint_roundtrip)."""
    from types import SimpleNamespace

    import torch
    from tiny_models import make_byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from gptq_explorer import QuantConfig, gptq_quantize
    from gptq_explorer.models.adapters import get_weight, quantizable_modules, set_weight

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    qcfg = QuantConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for name, module in quantizable_modules(model).items():
        W = get_weight(module).detach().clone().float()
        X = torch.randn(128, W.shape[1], generator=gen)
        res = gptq_quantize(W, 2 * X.T @ X / 128, qcfg)
        set_weight(module, res.weight)
        results[name] = res
    return SimpleNamespace(
        model=model,
        tokenizer=make_byte_tokenizer(),
        config=qcfg,
        method="gptq",
        results=results,
        true_sequential=True,
    )


def _compare_logits(out, ref) -> dict:
    out, ref = out.float(), ref.float()
    return {
        "logits_rel_error": float((out - ref).norm() / ref.norm()),
        "logits_max_abs_error": float((out - ref).abs().max()),
        "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0] * ref.shape[1]),
    }


def _compare_weights(model, ckpt) -> dict:
    """GPTQModel's own dequantized weights (TorchLinear) against ours, relative to |ours|."""
    import numpy as np
    import torch

    worst, checked, exact = 0.0, 0, True
    for name, module in model.named_modules():
        if type(module).__name__ != "TorchLinear" or name not in ckpt.layers:
            continue
        with torch.no_grad():
            theirs = module.dequantize_weight().T.cpu().numpy()  # GPTQModel: (in, out), fp16
        ours = ckpt.layers[name].dequantize()
        scale = np.maximum(np.abs(ours), np.finfo(np.float16).tiny)
        worst = max(worst, float((np.abs(theirs.astype(np.float32) - ours) / scale).max()))
        exact = exact and np.array_equal(theirs, ours.astype(np.float16))
        checked += 1
    return {"weights_checked": checked, "weight_max_rel_error": worst, "weights_equal_fp16_of_ours": exact}


def _kernels(model) -> list[str]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)})


def _load_gptqmodel(folder, backend, ids, ckpt, ref) -> dict:
    import torch
    from gptqmodel import GPTQModel

    t0 = time.perf_counter()
    qmodel = GPTQModel.load(str(folder), device="cpu", backend=backend, dtype=torch.float16)
    t1 = time.perf_counter()
    with torch.no_grad():
        out = qmodel.model(ids).logits
    t2 = time.perf_counter()
    r = {"backend": backend, "kernels": _kernels(qmodel.model), "dtype": str(qmodel.model.dtype)}
    r |= _compare_logits(out, ref) | _compare_weights(qmodel.model, ckpt)
    r |= {"load_s": round(t1 - t0, 1), "forward_s": round(t2 - t1, 1)}
    del qmodel
    return r


def _load_transformers(folder, backend, ids, ckpt, ref) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = ckpt.config.bits
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(folder),
        dtype=torch.float16,
        device_map="cpu",
        quantization_config=GPTQConfig(bits=bits, backend=backend),  # only its loading attributes count
    )
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model(ids).logits
    t2 = time.perf_counter()
    r = {"backend": backend, "kernels": _kernels(model), "dtype": str(model.dtype)}
    r |= _compare_logits(out, ref) | _compare_weights(model, ckpt)
    r |= {"load_s": round(t1 - t0, 1), "forward_s": round(t2 - t1, 1)}
    del model
    return r


def _ours(folder, ids=None):
    """Our loader's checkpoint and its float32 logits on ids (default: the checkpoint's tokenizer on
    SMOLLM2_TEXT)."""
    import torch

    from gptq_explorer.checkpoint import load_quantized

    ckpt = load_quantized(folder)
    if ids is None:
        ids = ckpt.tokenizer(SMOLLM2_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = ckpt.model(ids).logits
    return ckpt, ids, ref


def _common(result, ckpt, timings) -> dict:
    ragged = [
        n
        for n, layer in ckpt.layers.items()
        if ckpt.specs[n].group_size != -1 and layer.in_features % ckpt.specs[n].group_size
    ]
    return {
        "format": result.format,
        "n_quantized": result.n_quantized,
        "ragged_layers": len(ragged),
        **timings,
    }


def child_tiny(workdir: Path) -> dict:
    import torch

    from gptq_explorer.checkpoint import save_quantized

    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    report = {"gptqmodel": {}, "transformers": {}}
    for name, (bits, gs, sym, desc, fmt, backend) in TINY_CASES.items():
        t0 = time.perf_counter()
        qm = _tiny_quantized(bits, gs, sym, desc)
        folder = workdir / name
        result = save_quantized(qm, folder, format=fmt, warn=False)
        ckpt, _, ref = _ours(folder, ids)
        base = _common(result, ckpt, {"export_s": round(time.perf_counter() - t0, 1)})
        base["expected_format"] = fmt or ("gptq" if sym else "gptq_v2")
        report["gptqmodel"][name] = base | _load_gptqmodel(folder, backend, ids, ckpt, ref)
        if name in TINY_HF_CASES:
            hf = _load_transformers(folder, TINY_HF_CASES[name], ids, ckpt, ref)
            report["transformers"][name] = base | hf
        print(name, json.dumps(report["gptqmodel"][name]), flush=True)
    report["refused"] = {}
    for name, (source, backend, _) in TINY_REFUSED_CASES.items():
        if isinstance(source, str):
            folder = workdir / source
        else:
            bits, gs, sym, desc, fmt = source
            folder = workdir / name
            save_quantized(_tiny_quantized(bits, gs, sym, desc), folder, format=fmt, warn=False)
        ckpt, _, ref = _ours(folder, ids)
        try:
            r = _load_gptqmodel(folder, backend, ids, ckpt, ref)
        except (ValueError, RuntimeError) as e:
            r = {"refused": f"{type(e).__name__}: {e}"}
        report["refused"][name] = r
    return report


SMOLLM2_TEXT = (
    "GPTQ quantizes a language model one layer at a time. For every linear layer it collects the inputs "
    "that calibration text produces, and then it rounds the weights column by column, moving the "
    "rounding error of each column onto the columns that are still waiting, so that the output of the "
    "layer changes as little as possible."
)


def child_smollm2(workdir: Path) -> dict:
    from gptq_explorer import QuantConfig
    from gptq_explorer.checkpoint import save_quantized
    from gptq_explorer.models import load_model
    from gptq_explorer.models.quantize import quantize_model

    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m")
    t1 = time.perf_counter()
    # RTN: the checkpoint format does not depend on how the codes were chosen, and RTN takes ~30 s here
    # where GPTQ takes ~4 min on 2 cores (GPTQ with act-order is covered by the tiny model above)
    qm = quantize_model(
        loaded, None, QuantConfig(bits=4, group_size=128, sym=True), method="rtn", progress=False
    )
    t2 = time.perf_counter()
    folder = workdir / "sym-g128"
    result = save_quantized(qm, folder, warn=False)
    del qm, loaded
    t3 = time.perf_counter()
    ckpt, ids, ref = _ours(folder)
    timings = {
        "load_model_s": round(t1 - t0, 1),
        "quantize_s": round(t2 - t1, 1),
        "export_s": round(t3 - t2, 1),
        "our_load_s": round(time.perf_counter() - t3, 1),
    }
    r = _common(result, ckpt, timings)
    # GPTQModel's default backend cannot run this folder (see the module docstring): ask for TorchLinear.
    # transformers' from_pretrained of the same folder (backend gptq_torch) is covered by the tiny model's
    # ragged case; on SmolLM2 it would add ~1 min and gave the same numbers (measured once).
    return {"gptqmodel": {"sym-g128": r | _load_gptqmodel(folder, "gptq_torch", ids, ckpt, ref)}}


def main(argv: list[str]) -> int:
    kind, workdir, report_path = argv[1], Path(argv[2]), Path(argv[3])
    import torch

    torch.set_num_threads(int(os.environ.get("GPTQ_EXPLORER_THREADS", "2")))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"tiny": child_tiny, "smollm2": child_smollm2}[kind](workdir)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    import gptqmodel
    import optimum.version
    import transformers

    report["versions"] = {
        "gptqmodel": gptqmodel.__version__,
        "optimum": optimum.version.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    report_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
