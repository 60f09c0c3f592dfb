"""The methods after GPTQ on whole (tiny) models: GPTAQ's two activation streams, rotated layers, MSE grid,
GAR and ternary through quantize_model, the cache, the CLI's report and the export's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from gptq_explorer import QuantConfig
from gptq_explorer.checkpoint import save_quantized
from gptq_explorer.checkpoint.format import CheckpointFormatError
from gptq_explorer.models import get_weight, load_model
from gptq_explorer.models.quantize import quantize_model

BASE = QuantConfig(bits=3, group_size=32)


def calib():
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return str(tiny_dirs["llama"])


@pytest.fixture(scope="module")
def runs(llama, tmp_path_factory):
    ids = calib()
    out = {"ids": ids, "cache": tmp_path_factory.mktemp("qcache")}
    for name, cfg in {"gptq": BASE, "gptaq": BASE.replace(gptaq_alpha=0.25),
                      "rot": BASE.replace(rotation="hadamard")}.items():
        out[name] = quantize_model(load_model(llama), ids, cfg, progress=False, cache_dir=out["cache"],
                                   save_hessians=True)
    return out


def test_gptaq_carries_two_streams_and_differs_from_gptq_after_the_first_layers(runs):
    gptq, gptaq = runs["gptq"], runs["gptaq"]
    assert gptaq.memory["gptaq_streams"] == 2 and gptq.memory["gptaq_streams"] == 1
    assert gptaq.memory["activation_buffers_bytes"] == 2 * gptq.memory["activation_buffers_bytes"]
    # block 0's q/k/v see the embeddings in both models: dXXT = 0 there, so GPTAQ is GPTQ
    q0 = "model.layers.0.self_attn.q_proj"
    assert torch.equal(gptaq.results[q0].codes, gptq.results[q0].codes)
    # later layers see inputs that quantization changed: different codes
    last = [r.name for r in gptq.layers][-1]
    assert (gptaq.results[last].codes != gptq.results[last].codes).float().mean() > 0.01


def test_gptaq_fits_the_full_precision_outputs_better(llama, runs):
    """GPTAQ's aim: the quantized model's outputs closer to the full-precision model's on calibration data."""
    ids = runs["ids"]
    fp = logits(load_model(llama).model, ids)
    err = {k: float((logits(runs[k].model, ids) - fp).norm() / fp.norm()) for k in ("gptq", "gptaq")}
    assert err["gptaq"] < err["gptq"], err


def test_rotated_layers_equal_the_online_rotation(llama, runs):
    """The explorer evaluates a rotated layer as (Q R) x; a deployment runs Q (R x). Same logits."""
    qm, ids = runs["rot"], runs["ids"]
    online = load_model(llama).model
    handles = []
    for name, res in qm.results.items():
        module = online.get_submodule(name)
        R = res.rotation.to(torch.float32)
        module.weight.data = res.dequantize().to(torch.float32)  # the codes' own basis
        handles.append(module.register_forward_pre_hook(lambda m, args, R=R: (args[0] @ R.T,)))
    got = logits(online, ids)
    for h in handles:
        h.remove()
    want = logits(qm.model, ids)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def test_rotation_survives_the_cache(llama, runs):
    again = quantize_model(load_model(llama), runs["ids"], BASE.replace(rotation="hadamard"), progress=False,
                           cache_dir=runs["cache"])
    assert again.from_cache
    for name, res in runs["rot"].results.items():
        torch.testing.assert_close(get_weight(again.model.get_submodule(name)), res.weight.to(torch.float32),
                                   atol=1e-5, rtol=1e-5)


def test_export_refuses_rotated_and_ternary_models(llama, runs, tmp_path):
    with pytest.raises(CheckpointFormatError, match="rotate its input online"):
        save_quantized(runs["rot"], tmp_path / "rot")
    tern = quantize_model(load_model(llama), runs["ids"], BASE.replace(ternary=True), progress=False)
    with pytest.raises(CheckpointFormatError, match="not a uniform grid"):
        save_quantized(tern, tmp_path / "tern")


def test_mse_and_gar_export_as_standard_checkpoints(llama, runs, tmp_path):
    from gptq_explorer.checkpoint import load_quantized

    cfg = BASE.replace(mse_norm=2.4, group_aware=True)
    qm = quantize_model(load_model(llama), runs["ids"], cfg, progress=False)
    for res in qm.results.values():
        assert torch.equal(res.g_idx, torch.arange(res.g_idx.numel(), dtype=torch.int32) // 32)
    save_quantized(qm, tmp_path / "ckpt", warn=False)
    back = load_quantized(tmp_path / "ckpt")
    ids = runs["ids"]
    torch.testing.assert_close(logits(back.model, ids), logits(qm.model, ids), atol=2e-2, rtol=2e-2)


def test_cli_records_the_method_in_its_report(llama, tmp_path):
    from gptq_explorer import cli

    out = tmp_path / "r.json"
    rc = cli.main(["quantize", "--model", llama, "--nsamples", "4", "--seqlen", "32", "--eval", "",
                   "--bits", "3", "--group-size", "32", "--gptaq-alpha", "0.25", "--mse-norm", "2.4",
                   "--json", str(out), "--quiet"])
    assert rc in (0, None)
    report = json.loads(out.read_text())
    assert report["config"]["gptaq_alpha"] == 0.25 and report["config"]["mse_norm"] == 2.4
    assert report["memory"]["gptaq_streams"] == 2
