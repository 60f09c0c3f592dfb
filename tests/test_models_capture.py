"""models.capture: named hooks that always come off, StopForward, and capture_inputs on a tiny LLaMA."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_config

from gptq_explorer.models import get_adapter
from gptq_explorer.models.capture import (
    Cancelled,
    StopForward,
    capture_inputs,
    clean_copy,
    hooks,
    run_until_stopped,
)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def ids(n=5, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(1))


def linears(model, block=0):
    ad = get_adapter(model)
    return ad.linears(ad.get_blocks(model)[block])


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_see_every_call_and_come_off(model):
    lin = linears(model)
    calls = []
    with hooks({"q": lin["self_attn.q_proj"], "down": lin["mlp.down_proj"]}, calls.append):
        out = model(input_ids=ids(2), use_cache=False)
    assert [c.name for c in calls] == ["q", "down"]
    assert calls[0].input.shape == (2, 16, model.config.hidden_size)
    assert torch.equal(calls[0].output, lin["self_attn.q_proj"](calls[0].input))
    assert out.logits.shape[:2] == (2, 16) and no_hooks(model)
    before = []
    with hooks({"q": lin["self_attn.q_proj"]}, before.append, when="before"):
        model(input_ids=ids(1), use_cache=False)
    assert before[0].output is None and no_hooks(model)
    with pytest.raises(ValueError, match="when must be one of"):
        with hooks({}, calls.append, when="during"):
            pass


def test_stop_forward_ends_the_pass_and_an_error_still_removes_the_hooks(model):
    lin = linears(model)
    later = []

    def stop(call):
        raise StopForward

    with hooks({"q": lin["self_attn.q_proj"]}, stop), hooks({"down": lin["mlp.down_proj"]}, later.append):
        assert run_until_stopped(model, input_ids=ids(1), use_cache=False) is None
    assert later == [] and no_hooks(model)  # nothing after q_proj ran
    assert run_until_stopped(model, input_ids=ids(1), use_cache=False) is not None  # runs to the end

    def boom(call):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), hooks({"q": lin["self_attn.q_proj"]}, boom):
        model(input_ids=ids(1), use_cache=False)
    assert no_hooks(model)


def test_capture_inputs_matches_a_plain_hook(model):
    lin = linears(model, block=1)
    names = {"k": lin["self_attn.k_proj"], "gate": lin["mlp.gate_proj"]}
    windows = ids()
    seen = {n: [] for n in names}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in names.items()]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in handles:
        h.remove()
    fractions = []
    got = capture_inputs(model, names, windows, batch_size=2, progress=fractions.append)
    for n in names:
        assert got[n].dtype == np.float32 and got[n].shape == (5 * 16, model.config.hidden_size)
        np.testing.assert_allclose(got[n], torch.cat(seen[n]).numpy(), rtol=1e-5, atol=1e-6)
    assert fractions == [0.4, 0.8, 1.0] and no_hooks(model)


def test_capture_inputs_cancels_and_names_a_module_never_reached(model):
    lin = linears(model)
    with pytest.raises(Cancelled):
        capture_inputs(model, {"q": lin["self_attn.q_proj"]}, ids(), should_cancel=lambda: True)
    stray = torch.nn.Linear(4, 4)  # not part of the model: the forward pass never calls it
    with pytest.raises(RuntimeError, match="never reached"):
        capture_inputs(model, {"stray": stray}, ids(2))
    assert no_hooks(model) and not stray._forward_hooks


def test_clean_copy_has_no_hooks_and_the_same_outputs(model):
    lin = linears(model)
    with hooks({"q": lin["self_attn.q_proj"]}, lambda call: None):
        copy = clean_copy(model)
        assert not no_hooks(model) and no_hooks(copy)
    x = ids(1)
    with torch.no_grad():
        assert torch.equal(copy(input_ids=x).logits, model(input_ids=x).logits)
