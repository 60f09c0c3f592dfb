"""Adapter table: right linears in the right order and orientation; catching block-0 inputs and running
blocks one at a time reproduces the full model's logits (the basis of the sequential method)."""

import pytest
import torch
from tiny_models import EXTRA_LLAMA_LIKE, TINY_FAMILIES

from gptq_explorer.models import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedModelError,
    catch_block_inputs,
    get_adapter,
    get_weight,
    head_inputs,
    head_logits,
    load_model,
    quantizable_modules,
    run_blocks,
    set_weight,
)
from gptq_explorer.models.adapters import find_linear_like

H, F = 64, 96  # hidden and FFN sizes of the tiny models
EXPECTED = {  # block-relative name -> (out, in), in true-sequential order
    "llama": [
        ("self_attn.k_proj", (32, H)),
        ("self_attn.v_proj", (32, H)),
        ("self_attn.q_proj", (H, H)),
        ("self_attn.o_proj", (H, H)),
        ("mlp.up_proj", (F, H)),
        ("mlp.gate_proj", (F, H)),
        ("mlp.down_proj", (H, F)),
    ],
    "opt": [
        ("self_attn.k_proj", (H, H)),
        ("self_attn.v_proj", (H, H)),
        ("self_attn.q_proj", (H, H)),
        ("self_attn.out_proj", (H, H)),
        ("fc1", (F, H)),
        ("fc2", (H, F)),
    ],
    "gpt2": [
        ("attn.c_attn", (3 * H, H)),
        ("attn.c_proj", (H, H)),
        ("mlp.c_fc", (F, H)),
        ("mlp.c_proj", (H, F)),
    ],
    "gpt_neox": [
        ("attention.query_key_value", (3 * H, H)),
        ("attention.dense", (H, H)),
        ("mlp.dense_h_to_4h", (F, H)),
        ("mlp.dense_4h_to_h", (H, F)),
    ],
}
GROUP_SIZES = {"llama": [3, 1, 2, 1], "opt": [3, 1, 1, 1], "gpt2": [1, 1, 1, 1], "gpt_neox": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return {f: load_model(str(d)) for f, d in tiny_dirs.items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_linears_order_and_shapes(tiny, family):
    lm = tiny[family]
    ad = lm.adapter
    assert ad.family == family
    blocks = ad.get_blocks(lm.model)
    assert len(blocks) == 2
    for block in blocks:
        lin = ad.linears(block)
        assert [(n, tuple(get_weight(m).shape)) for n, m in lin.items()] == EXPECTED[family]
        # the table covers every linear in the block: nothing is silently left unquantized
        assert set(lin) == set(find_linear_like(block))
    assert [len(g) for g in ad.groups(True)] == GROUP_SIZES[family]
    assert ad.groups(False) == [[n for n, _ in EXPECTED[family]]]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_orientation_matches_forward(tiny, family):
    """module(x) == x @ get_weight(module).T + bias, for nn.Linear and GPT-2's Conv1D alike."""
    lm = tiny[family]
    block = lm.adapter.get_blocks(lm.model)[0]
    for name, m in lm.adapter.linears(block).items():
        W = get_weight(m)
        x = torch.randn(5, W.shape[1])
        ref = x @ W.T + (m.bias if m.bias is not None else 0)
        torch.testing.assert_close(m(x), ref, msg=name)
    if family == "gpt2":
        m = block.attn.c_attn
        assert tuple(m.weight.shape) == (H, 3 * H) and tuple(get_weight(m).shape) == (3 * H, H)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_set_weight_roundtrip(tiny_dirs, family):
    lm = load_model(str(tiny_dirs[family]))  # a private copy: we modify it
    m = next(iter(lm.adapter.linears(lm.adapter.get_blocks(lm.model)[0]).values()))
    W = get_weight(m).clone()
    new = torch.arange(W.numel(), dtype=torch.float32).view_as(W) / W.numel()
    set_weight(m, new)
    torch.testing.assert_close(get_weight(m), new)
    x = torch.randn(3, W.shape[1])
    torch.testing.assert_close(m(x), x @ new.T + (m.bias if m.bias is not None else 0))
    with pytest.raises(ValueError, match="does not fit"):
        set_weight(m, new.T.contiguous() if new.shape[0] != new.shape[1] else new[:1])


@pytest.mark.parametrize("family", TINY_FAMILIES + EXTRA_LLAMA_LIKE)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_blocks_one_by_one_reproduce_logits(tiny, family, batch_size):
    lm = tiny[family]
    model, ad = lm.model, lm.adapter
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, 24), generator=g)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    caught = catch_block_inputs(model, ids, ad, batch_size=batch_size)
    assert caught.hidden.shape == (3, 24, H)
    out = run_blocks(ad.get_blocks(model), caught, batch_size=batch_size)
    logits = head_logits(model, out, ad)
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-4)
    # and it is not vacuous: a changed block changes the result
    blk = ad.get_blocks(model)[1]
    m = next(iter(ad.linears(blk).values()))
    W = get_weight(m).clone()
    try:
        set_weight(m, W * 0.5)
        out2 = run_blocks(ad.get_blocks(model), caught, batch_size=batch_size)
        assert (head_logits(model, out2, ad) - full).abs().max() > 1e-3
    finally:
        set_weight(m, W)


@pytest.mark.parametrize("family", TINY_FAMILIES + EXTRA_LLAMA_LIKE)
def test_head_inputs_are_what_the_logits_are_made_from(tiny, family):
    """The output embedding applied to head_inputs gives the model's logits, and the forward pass stopped
    before the output embedding ran (its logits were never made)."""
    model = tiny[family].model
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    head = model.get_output_embeddings()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    try:
        hidden = head_inputs(model, ids)
    finally:
        handle.remove()
    assert calls == [] and hidden.shape == (2, 24, H)
    torch.testing.assert_close(head(hidden), full, atol=0, rtol=0)


def test_eager_attention_mask_is_caught(tiny_dirs):
    """With eager attention the causal mask is a tensor in the caught kwargs; replaying it must still
    reproduce the logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager").eval()
    ad = get_adapter(model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    caught = catch_block_inputs(model, ids, ad, batch_size=3)
    assert "position_embeddings" in caught.kwargs
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(
        head_logits(model, run_blocks(ad.get_blocks(model), caught, 3), ad), full, atol=1e-5, rtol=1e-4
    )


def test_never_quantizes_embeddings_head_norms(tiny):
    for family in TINY_FAMILIES:
        lm = tiny[family]
        mods = quantizable_modules(lm.model, lm.adapter)
        assert len(mods) == 2 * len(EXPECTED[family])
        names = " ".join(mods)
        for bad in ("embed", "wte", "wpe", "lm_head", "norm", "ln_"):
            assert bad not in names
        head = lm.model.get_output_embeddings()
        assert all(m is not head for m in mods.values())


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter("bert")
    msg = str(e.value)
    assert "'bert'" in msg and all(t in msg for t in ("llama", "opt", "gpt2", "gpt_neox"))
    assert set(SUPPORTED_MODEL_TYPES) >= {"llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox"}
