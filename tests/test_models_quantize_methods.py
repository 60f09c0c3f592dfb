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
from gptq_explorer.models.quantize import QuantizationCancelled, quantize_model

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
    # GPTAQ on the paper's loop: every sample in one batch, and batches of 3 (a short last one)
    for name, bs in (("gptaq_loop", 8), ("gptaq_loop3", 3)):
        out[name] = quantize_model(load_model(llama), ids, BASE.replace(gptaq_alpha=0.25), progress=False,
                                   single_pass=False, batch_size=bs)
    # the single pass in turns of 3 samples, as on a CPU with larger inputs
    from gptq_explorer.models import quantize_sequential as qs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qs, "_samples_per_turn", lambda model, seqlen: 3)
        out["gptaq_turns3"] = quantize_model(load_model(llama), ids, BASE.replace(gptaq_alpha=0.25),
                                             progress=False)
    return out


def test_gptaq_carries_two_streams_and_differs_from_gptq_after_the_first_layers(runs):
    gptq, gptaq = runs["gptq"], runs["gptaq"]
    assert gptaq.memory["gptaq_streams"] == 2 and gptq.memory["gptaq_streams"] == 1
    assert gptaq.memory["single_pass"] and gptq.memory["single_pass"]
    # block 0's q/k/v see the embeddings in both models: dXXT = 0 there, so GPTAQ is GPTQ
    q0 = "model.layers.0.self_attn.q_proj"
    assert torch.equal(gptaq.results[q0].codes, gptq.results[q0].codes)
    # later layers see inputs that quantization changed: different codes
    last = [r.name for r in gptq.layers][-1]
    assert (gptaq.results[last].codes != gptq.results[last].codes).float().mean() > 0.01


def test_gptaq_single_pass_equals_the_papers_loop(runs):
    """The single pass (the full-precision block run once per block, each group's input kept for the
    quantized pass) gives the paper's loop's numbers: bit for bit when the loop's batch is the whole
    calibration set (the same tensors meet the same kernels), up to float32 summation order otherwise."""
    a = runs["gptaq"]
    assert not a.from_cache and a.memory["single_pass"] and not runs["gptaq_loop"].memory["single_pass"]
    for loop, exact in ((runs["gptaq_loop"], True), (runs["gptaq_loop3"], False)):
        assert [r.name for r in loop.layers] == [r.name for r in a.layers]
        for rep, ref in zip(a.layers, loop.layers):
            codes, ref_codes = a.results[rep.name].codes, loop.results[rep.name].codes
            if exact:
                assert torch.equal(codes, ref_codes), rep.name
                assert (rep.loss, rep.output_rel_error) == (ref.loss, ref.output_rel_error), rep.name
            else:
                assert (codes == ref_codes).float().mean() > 0.999, rep.name
                assert rep.loss == pytest.approx(ref.loss, rel=1e-4), rep.name
                assert rep.output_rel_error == pytest.approx(ref.output_rel_error, rel=1e-3), rep.name


def test_gptaq_single_pass_in_turns_equals_the_papers_loop_bit_for_bit(runs):
    """In turns of 3 samples both streams run the loop's batches of 3 through the same kernels, and each
    turn pairs its quantized inputs with its own full-precision ones: the same numbers exactly."""
    a, loop = runs["gptaq_turns3"], runs["gptaq_loop3"]
    assert a.memory["single_pass"] and a.memory["gptaq_fp_inputs_bytes"] == runs["gptaq"].memory[
        "gptaq_fp_inputs_bytes"]  # every turn's full-precision inputs are kept until its group is quantized
    for rep, ref in zip(a.layers, loop.layers, strict=True):
        assert rep.name == ref.name and torch.equal(a.results[rep.name].codes, loop.results[rep.name].codes)
        assert (rep.loss, rep.output_mse) == (ref.loss, ref.output_mse), rep.name


def test_gptaq_memory_and_time_fields(llama, runs):
    """The report's account of what GPTAQ keeps: hidden-state buffers, the kept full-precision inputs, one
    group's H and dXXT; and the full-precision stream's share of the forward time."""
    c = load_model(llama).model.config
    hidden, inter, tokens = c.hidden_size, c.intermediate_size, 8 * 32
    gptq, sp, loop, loop3 = (runs[k] for k in ("gptq", "gptaq", "gptaq_loop", "gptaq_loop3"))
    act = gptq.memory["activation_buffers_bytes"]  # in and out, (8, 32, hidden) float32 each
    assert act == 2 * tokens * hidden * 4 and "gptaq_fp_inputs_bytes" not in gptq.memory
    # single pass: both streams' inputs and outputs, the FP inputs freed before the quantized outputs
    assert sp.memory["activation_buffers_bytes"] == 3 * act // 2
    assert loop.memory["activation_buffers_bytes"] == 2 * act
    # kept at once: every token's input of q/k/v, o, up/gate (hidden wide) and down (intermediate wide)
    assert sp.memory["gptaq_fp_inputs_bytes"] == tokens * (3 * hidden + inter) * 4
    # the loop: one batch of one group's inputs, down's the widest (k, v, q count once: one tensor)
    assert loop.memory["gptaq_fp_inputs_bytes"] == tokens * inter * 4
    assert loop3.memory["gptaq_fp_inputs_bytes"] == 3 * 32 * inter * 4
    # down's H and dXXT, in both schedules (shared inputs share one H and one dXXT)
    for qm in (sp, loop, loop3):
        assert qm.memory["hessian_bytes_max_group"] == 2 * inter * inter * 4
    for qm in (sp, loop):
        assert 0 < qm.timings["forward_fp"] < qm.timings["forward"]


@pytest.mark.parametrize("when", [2, 12])
def test_gptaq_cancel_mid_block_restores_the_original_weights(llama, when):
    """Cancelled inside block 0: in the full-precision pass (when=2: nothing quantized yet) or in the
    quantized pass after its first groups (when=12: k, v, q and o quantized); either way every weight is put
    back."""
    lm = load_model(llama)
    before = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > when

    with pytest.raises(QuantizationCancelled, match="original weights were restored") as e:
        quantize_model(lm, calib(), BASE.replace(gptaq_alpha=0.25), progress=False, cancel=cancel)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    done = e.value.layers_done
    if when == 2:
        assert done == []
    else:  # stopped inside block 0, some of its groups quantized
        assert 0 < len(done) < 7 and {r.block for r in done} == {0}


def test_gptaq_single_pass_refuses_an_input_changed_in_place(llama):
    """A kept full-precision input that a later op of the block writes into is no longer the input: the
    single pass says so (and restores the weights) rather than compute dXXT from it."""
    from gptq_explorer.models.capture import hooks

    lm = load_model(llama)
    o_proj = lm.model.model.layers[0].self_attn.o_proj
    with hooks({"o": o_proj}, lambda call: call.input.mul_(1.0)):  # after o_proj: rewrite its input
        with pytest.raises(RuntimeError, match="changed in place"):
            quantize_model(lm, calib(), BASE.replace(gptaq_alpha=0.25), progress=False)
    assert torch.equal(o_proj.weight, load_model(llama).model.model.layers[0].self_attn.o_proj.weight)


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
    assert report["memory"]["gptaq_streams"] == 2 and report["memory"]["single_pass"] is True
    assert report["memory"]["gptaq_fp_inputs_bytes"] > 0 and report["timings"]["quantize_forward_fp"] > 0
