"""Export -> import of whole (tiny, random) models as GPTQ checkpoint folders.

The quantized models are built here by running ``gptq_quantize`` on every linear of a tiny LLaMA /
GPT-2 with a random Hessian, wrapped in an object with the ``QuantizedModel`` attributes that
``save_quantized`` reads (model, tokenizer, config, method, results, true_sequential).
"""

import copy
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gptq_explorer import QuantConfig, gptq_quantize, rtn_quantize
from gptq_explorer.checkpoint import CheckpointFormatError
from gptq_explorer.checkpoint.export import save_quantized
from gptq_explorer.checkpoint.load import load_quantized
from gptq_explorer.models.adapters import get_weight, quantizable_modules, set_weight

VOCAB = 256


def tiny_llama(seed=0, hidden=192):
    # hidden 192 with g128 ends with a group of 64, like SmolLM2's 576; k/v_proj have 96 outputs
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-zero biases so that the fp16 bias path is exercised
        for m in quantizable_modules(model).values():
            m.bias.normal_(0, 0.1)
    return model


def quantize(model, cfg, overrides=None, seed=0, positive_rows=False, rtn=False):
    """gptq_quantize (or RTN, faster) every linear; write the dequantized weights back like
    quantize_model does."""
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for name, module in quantizable_modules(model).items():
        W = get_weight(module).detach().clone().float()
        if positive_rows:  # all-positive rows give asymmetric zero points of 0
            W[:4] = W[:4].abs()
        X = torch.randn(128, W.shape[1], generator=gen)
        c = (overrides or {}).get(name, cfg)
        res = rtn_quantize(W, c) if rtn else gptq_quantize(W, 2 * X.T @ X / 128, c)
        set_weight(module, res.weight)
        results[name] = res
    return SimpleNamespace(
        model=model, tokenizer=None, config=cfg, method="gptq", results=results, true_sequential=True
    )


def fp16_reference(qm):
    """The in-memory model with every quantized weight rebuilt from fp16 scales (and fp16 bias):
    exactly what a checkpoint can hold."""
    ref = copy.deepcopy(qm.model)
    for name, res in qm.results.items():
        module = ref.get_submodule(name)
        s16 = res.scales.half().float()
        g = res.g_idx.long()
        set_weight(module, s16[:, g] * (res.codes.float() - res.zeros.float()[:, g]))
        if module.bias is not None:
            module.bias.data = module.bias.data.half().float()
    return ref


def logits(model, seed=1):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def check_roundtrip(qm, folder, **kw):
    result = save_quantized(qm, folder, warn=False, **kw)
    ckpt = load_quantized(folder)
    assert set(ckpt.layers) == set(qm.results)
    for name, res in qm.results.items():
        layer = ckpt.layers[name]
        assert np.array_equal(layer.codes, res.codes.numpy())
        assert np.array_equal(layer.zeros, res.zeros.numpy())
        assert np.array_equal(layer.g_idx, res.g_idx.numpy())
        assert np.array_equal(layer.scales, res.scales.half().float().numpy())
        assert ckpt.specs[name].bits == res.config.bits
    # bit-identical to the in-memory model with fp16-rounded scales, and close to the float32 one
    assert torch.equal(logits(ckpt.model), logits(fp16_reference(qm)))
    torch.testing.assert_close(logits(ckpt.model), logits(qm.model), atol=2e-3, rtol=0)
    return result, ckpt


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_llama_roundtrip(tmp_path, sym, desc_act, group_size):
    cfg = QuantConfig(bits=4, group_size=group_size, sym=sym, desc_act=desc_act)
    qm = quantize(tiny_llama(), cfg)
    result, ckpt = check_roundtrip(qm, tmp_path / "ckpt")
    assert result.format == ("gptq" if sym else "gptq_v2")
    assert ckpt.format == result.format and ckpt.notes == []
    if desc_act:  # act-order really permuted g_idx
        g = ckpt.layers["model.layers.0.mlp.down_proj"].g_idx
        assert group_size == -1 or not np.array_equal(g, np.sort(g))


@pytest.mark.parametrize("bits, static_groups", [(2, False), (3, False), (8, True)])
def test_llama_other_bits(tmp_path, bits, static_groups):
    cfg = QuantConfig(bits=bits, group_size=64, sym=False, desc_act=True, static_groups=static_groups)
    _, ckpt = check_roundtrip(quantize(tiny_llama(), cfg), tmp_path / "ckpt", format="gptq_v2")
    assert ckpt.notes == [] and ckpt.config.static_groups is static_groups


def test_asym_without_zero_zero_can_be_forced_to_v1(tmp_path):
    qm = quantize(tiny_llama(), QuantConfig(bits=8, group_size=-1, sym=False))
    assert all((r.zeros > 0).all() for r in qm.results.values())
    result, ckpt = check_roundtrip(qm, tmp_path / "ckpt", format="gptq")
    assert result.format == "gptq" and ckpt.config.sym is False


def test_gpt2_conv1d_roundtrip(tmp_path):
    qm = quantize(tiny_gpt2(), QuantConfig(bits=4, group_size=32, sym=True, desc_act=True))
    result, ckpt = check_roundtrip(qm, tmp_path / "ckpt")
    # c_attn is Conv1D with weight (in=64, out=192); the checkpoint uses the nn.Linear convention
    t = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert t["transformer.h.0.attn.c_attn.qweight"].shape == (64 * 4 // 32, 192)
    assert t["transformer.h.0.attn.c_attn.bias"].dtype == torch.float16
    assert "transformer.h.0.attn.c_attn.weight" not in t


def test_folder_contents(tmp_path):
    cfg = QuantConfig(bits=4, group_size=128, sym=True, desc_act=False, damp_percent=0.02)
    qm = quantize(tiny_llama(), cfg)
    folder = tmp_path / "ckpt"
    result = save_quantized(qm, folder, warn=False)
    assert sorted(os.listdir(folder)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "quantize_config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert json.loads((folder / "quantize_config.json").read_text()) == qc == result.quantization_config
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 128
    assert qc["desc_act"] is False and qc["sym"] is True and qc["damp_percent"] == 0.02
    assert qc["static_groups"] is False and qc["true_sequential"] is True
    assert qc["checkpoint_format"] == qc["format"] == "gptq"
    assert qc["meta"]["quantizer"][0].startswith("gptq_explorer:")
    t = load_file(str(folder / "model.safetensors"))
    prefix = "model.layers.0.self_attn.k_proj"
    assert t[f"{prefix}.qweight"].shape == (192 * 4 // 32, 96) and t[f"{prefix}.qweight"].dtype == torch.int32
    assert t[f"{prefix}.qzeros"].shape == (2, 96 * 4 // 32) and t[f"{prefix}.scales"].dtype == torch.float16
    assert t[f"{prefix}.g_idx"].tolist() == [i // 128 for i in range(192)]
    assert (t[f"{prefix}.qzeros"] == 0x77777777).all()  # sym v1: every field holds 8 - 1
    assert not any(k.endswith("proj.weight") for k in t)
    assert "lm_head.weight" not in t  # tied embeddings are stored once
    assert torch.equal(t["model.embed_tokens.weight"], qm.model.model.embed_tokens.weight)
    assert torch.equal(t["model.norm.weight"], qm.model.model.norm.weight)
    # SmolLM2-like width: g128 leaves a last group of 64, which vLLM refuses; we say so
    vllm = next(s for s in result.loaders if s.loader == "vLLM")
    assert not vllm.ok and "in_features % group_size == 0" in vllm.reasons[0]
    assert any("vLLM" in w for w in result.warnings)
    with pytest.warns(UserWarning, match="vLLM requires in_features % group_size == 0"):
        save_quantized(qm, tmp_path / "again")


def test_loader_verdicts_for_divisible_sym_4bit(tmp_path):
    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=64, sym=True), rtn=True)
    result = save_quantized(qm, tmp_path / "ckpt", warn=False)
    verdicts = {s.loader: s for s in result.loaders}
    assert verdicts["vLLM"].ok and "Marlin kernel auto-selected" in verdicts["vLLM"].reasons[0]
    assert verdicts["AutoGPTQ (deprecated)"].ok and result.warnings == []


def test_per_layer_override_is_written_as_dynamic(tmp_path):
    model = tiny_llama()
    cfg = QuantConfig(bits=4, group_size=64, sym=True)
    name = "model.layers.0.mlp.down_proj"
    qm = quantize(model, cfg, overrides={name: cfg.replace(bits=8, group_size=128)})
    result, ckpt = check_roundtrip(qm, tmp_path / "ckpt")
    assert list(result.quantization_config["dynamic"].values()) == [
        {"bits": 8, "group_size": 128, "sym": True, "desc_act": False}
    ]
    assert ckpt.specs[name].bits == 8 and ckpt.specs["model.layers.0.mlp.up_proj"].bits == 4


def test_sharded_export(tmp_path):
    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=64), rtn=True)
    result, _ = check_roundtrip(qm, tmp_path / "ckpt", max_shard_bytes=100_000)
    shards = [f for f in result.files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in result.files
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)


# ------------------------------------------------------------------ refusals, atomicity


def no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []


def test_v1_refuses_asym_zero_of_zero_and_writes_nothing(tmp_path):
    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=-1, sym=False), positive_rows=True, rtn=True)
    assert any((r.zeros == 0).any() for r in qm.results.values())
    with pytest.raises(CheckpointFormatError, match=r"format='gptq'.*zero points of 0.*gptq_v2.*Nothing was"):
        save_quantized(qm, tmp_path / "ckpt", format="gptq")
    assert list(tmp_path.iterdir()) == []
    result, _ = check_roundtrip(qm, tmp_path / "ckpt")  # the default picks gptq_v2 and is exact
    assert result.format == "gptq_v2"


def test_unpackable_shapes_are_refused_before_writing(tmp_path):
    qm = quantize(tiny_llama(hidden=80), QuantConfig(bits=3, group_size=-1), rtn=True)
    with pytest.raises(CheckpointFormatError, match=r"3-bit .*in_features=80 is not a multiple of 32"):
        save_quantized(qm, tmp_path / "ckpt")
    qm5 = quantize(tiny_llama(), QuantConfig(bits=5, group_size=-1), rtn=True)
    with pytest.raises(CheckpointFormatError, match="unknown bits 5"):
        save_quantized(qm5, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from gptq_explorer.checkpoint import export

    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=64), rtn=True)

    def boom(*args, **kwargs):
        (args[1] / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(qm, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept_unless_overwrite(tmp_path):
    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=64), rtn=True)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        save_quantized(qm, folder)
    assert os.listdir(folder) == ["precious.txt"]
    save_quantized(qm, folder, overwrite=True, warn=False)
    assert "precious.txt" not in os.listdir(folder) and no_leftovers(tmp_path)
    assert load_quantized(folder).config.bits == 4


# ------------------------------------------------------------------ malformed checkpoints


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "ckpt"
    qm = quantize(tiny_llama(), QuantConfig(bits=4, group_size=64, sym=False), rtn=True)
    save_quantized(qm, folder, warn=False)
    return folder


def broken_copy(good, tmp_path, edit_tensors=None, edit_config=None):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    if edit_tensors:
        t = load_file(str(folder / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(folder / "model.safetensors"))
    if edit_config:
        for name in ("config.json", "quantize_config.json"):
            d = json.loads((folder / name).read_text())
            edit_config(d.get("quantization_config", d))
            (folder / name).write_text(json.dumps(d))
    return folder


P = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit_tensors, edit_config, message",
    [
        (lambda t: t.pop(f"{P}.qzeros"), None, f"missing tensor '{P}.qzeros'"),
        (lambda t: t.pop(f"{P}.qweight"), None, f"missing tensor '{P}.qweight'"),
        (lambda t: t.update({f"{P}.g_idx": t[f"{P}.g_idx"] + 3}), None, f"{P}.g_idx out of range"),
        (lambda t: t.update({f"{P}.g_idx": t[f"{P}.g_idx"].long()}), None, "g_idx must be int32, got int64"),
        (
            lambda t: t.update({f"{P}.scales": t[f"{P}.scales"][:1], f"{P}.qzeros": t[f"{P}.qzeros"][:1]}),
            None,
            f"{P}.scales has 1 groups, expected 3",
        ),
        (
            lambda t: t.update({f"{P}.qweight": t[f"{P}.qweight"][:, :8].contiguous()}),
            None,
            f"{P}.scales has shape",
        ),
        (lambda t: t.pop("model.norm.weight"), None, "lacks tensor.*model.norm.weight"),
        (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), None, "tensors the model does not"),
        (None, lambda q: q.update(bits=5), "unknown bits 5"),
        (None, lambda q: q.update(bits=8), r"implies 4 bits"),
        (None, lambda q: q.update(format="marlin", checkpoint_format="marlin"), "'marlin' is not supported"),
    ],
)
def test_malformed_checkpoints(good_folder, tmp_path, edit_tensors, edit_config, message):
    folder = broken_copy(good_folder, tmp_path, edit_tensors, edit_config)
    with pytest.raises(CheckpointFormatError, match=message):
        load_quantized(folder)


def test_truncated_and_missing_files(good_folder, tmp_path):
    folder = broken_copy(good_folder, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="model.safetensors is not a readable safetensors file"):
        load_quantized(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match="has no model.safetensors"):
        load_quantized(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match="has no config.json"):
        load_quantized(folder)


def test_reads_v1_written_elsewhere_with_corrupt_zero(good_folder, tmp_path):
    # An AutoGPTQ-style v1 file where a zero of 0 was stored as -1 (field 15): flagged in notes
    def to_v1(t):
        z = t[f"{P}.qzeros"]
        t[f"{P}.qzeros"] = torch.full_like(z, -1)  # every field 15 -> decodes to zero 0 under v1

    folder = broken_copy(
        good_folder, tmp_path, to_v1, lambda q: q.update(format="gptq", checkpoint_format="gptq")
    )
    ckpt = load_quantized(folder)
    assert (ckpt.layers[P].zeros == 0).all()
    assert any(P in n and "corrupted by a v1 packer" in n for n in ckpt.notes)


# ------------------------------------------------------------------ with the real quantize_model


def test_quantize_model_export_import(tmp_path):
    from gptq_explorer.models.quantize import quantize_model

    model = tiny_llama()
    calib = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(bits=4, group_size=64, sym=False, desc_act=True)
    # wrapped like a LoadedModel: quantize_model takes a bare LlamaForCausalLM's `.model` for one
    wrapped = SimpleNamespace(model=model, tokenizer=None)
    qm = quantize_model(wrapped, calib, cfg, progress=False, overrides={"*.down_proj": {"bits": 8}})
    _, ckpt = check_roundtrip(qm, tmp_path / "ckpt")
    assert ckpt.specs["model.layers.0.mlp.down_proj"].bits == 8


@pytest.mark.slow
def test_smollm2_export_import(tmp_path):
    from gptq_explorer.models import available_offline, load_model
    from gptq_explorer.models.quantize import quantize_model

    if "smollm2-135m" not in available_offline():
        pytest.skip("the offline SmolLM2 model is not installed")
    loaded = load_model("smollm2-135m")
    qm = quantize_model(loaded, None, QuantConfig(bits=4, group_size=128), method="rtn", progress=False)
    result = save_quantized(qm, tmp_path / "smol", warn=False)
    assert result.format == "gptq"
    # 576 = 4 * 128 + 64: the export is exact, but vLLM refuses a last group of 64
    vllm = next(s for s in result.loaders if s.loader == "vLLM")
    assert not vllm.ok and "in=576, g128" in vllm.reasons[0]
    ckpt = load_quantized(tmp_path / "smol")
    assert ckpt.tokenizer is not None and ckpt.layers["model.layers.0.self_attn.q_proj"].n_groups == 5
    ids = ckpt.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = fp16_reference(qm)(ids).logits
        got = ckpt.model(ids).logits
    assert torch.equal(got, ref)
