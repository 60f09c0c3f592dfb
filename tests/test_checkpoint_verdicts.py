"""The export's loader verdicts: GPTQModel's default CPU kernel on a short last group or per-row groups
(measured in test_checkpoint_outside_loader.py), and a checkpoint saved without a tokenizer."""

import warnings

import pytest
import torch
from tiny_models import make_byte_tokenizer

from gptq_explorer import QuantConfig
from gptq_explorer.checkpoint import save_quantized
from gptq_explorer.checkpoint.export import GPTQMODEL_SHORT_GROUP_ERROR, NO_TOKENIZER_NOTE
from gptq_explorer.models.quantize import quantize_model


def llama(hidden: int, intermediate: int):
    """One random LLaMA block of a given width (576 = SmolLM2's hidden size)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=260,
                         max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(cfg)


def export(tmp_path, model, cfg, tokenizer=None, name="ckpt"):
    qm = quantize_model(model, None, cfg, method="rtn", progress=False, tokenizer=tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = save_quantized(qm, tmp_path / name)
    return result, [str(w.message) for w in caught]


def verdicts(result):
    return {s.loader: s for s in result.loaders}


def test_short_last_group_tells_gptqmodel_users_to_pick_gptq_torch(tmp_path):
    # SmolLM2's case: in_features 576 with g128 ends with a group of 64
    result, warned = export(tmp_path, llama(576, 128), QuantConfig(bits=4, group_size=128),
                            tokenizer=make_byte_tokenizer())  # fmt: skip
    gm = verdicts(result)["GPTQModel"]
    assert gm.ok and gm.checked_here  # it loads; only the default kernel fails
    (note,) = gm.notes
    assert 'backend="gptq_torch"' in note and GPTQMODEL_SHORT_GROUP_ERROR in note
    assert "in=576 with g128 leaves 64" in note
    hf = verdicts(result)["transformers + optimum + gptqmodel (from_pretrained)"]
    assert any('backend="gptq_torch"' in n for n in hf.notes)
    assert "WARNING" in gm.line() and note in result.summary()
    assert any(note in m for m in warned)
    assert not verdicts(result)["vLLM"].ok  # vLLM refuses the folder outright (in_features % group_size)


def test_per_row_4bit_warns_about_the_fused_kernel(tmp_path):
    result, _ = export(tmp_path, llama(64, 96), QuantConfig(bits=4, group_size=-1), make_byte_tokenizer())
    (note,) = verdicts(result)["GPTQModel"].notes
    assert "TorchFusedLinear" in note and "in=96" in note and 'backend="gptq_torch"' in note


@pytest.mark.parametrize("cfg", [QuantConfig(bits=4, group_size=32), QuantConfig(bits=3, group_size=64)])
def test_no_kernel_warning_where_the_default_kernel_works(tmp_path, cfg):
    # g32 divides 64 and 96; 3-bit never uses the ATen int4 kernel
    result, warned = export(tmp_path, llama(64, 96), cfg, make_byte_tokenizer())
    assert verdicts(result)["GPTQModel"].notes == [] and result.notes == []
    assert not any("gptq_torch" in m for m in warned)


def test_missing_tokenizer_is_warned(tmp_path):
    cfg = QuantConfig(bits=4, group_size=32)
    result, warned = export(tmp_path, llama(64, 96), cfg, tokenizer=None)
    assert result.notes == [NO_TOKENIZER_NOTE]  # once, although every outside loader carries it
    assert result.summary().count("no tokenizer was saved") == 4  # vLLM, GPTQModel, transformers, AutoGPTQ
    assert not verdicts(result)["gptq_explorer.load_quantized"].notes  # ours needs none
    assert sum("no tokenizer was saved" in m for m in warned) == 1
    assert not list(result.folder.glob("tokenizer*"))
    # with a tokenizer: saved beside the weights, and no such warning
    result, warned = export(tmp_path, llama(64, 96), cfg, make_byte_tokenizer(), name="with_tok")
    assert result.notes == [] and not any("tokenizer" in m for m in warned)
    assert (result.folder / "tokenizer.json").exists()
