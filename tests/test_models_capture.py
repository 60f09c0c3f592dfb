"""models.capture: named hooks that always come off, StopForward, capture_inputs on a tiny LLaMA, and
forward passes in turns."""

import contextvars

import numpy as np
import pytest
import torch
from tiny_models import tiny_config

from gptq_explorer.models import get_adapter
from gptq_explorer.models.capture import (
    Cancelled,
    StopForward,
    TurnsDiverged,
    capture_inputs,
    clean_copy,
    hooks,
    park,
    run_in_turns,
    run_until_stopped,
    turn_index,
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


def test_turns_meet_at_each_park_and_go_on_in_order():
    log = []

    def turn(k):
        def run():
            for key in ("a", "b"):
                log.append((key, turn_index()))
                park(key)
            return 10 * k
        return run

    results = run_in_turns([turn(k) for k in range(3)], on_all=lambda key: log.append(("all", key)))
    assert results == [0, 10, 20]
    assert log == [("a", 0), ("a", 1), ("a", 2), ("all", "a"), ("b", 0), ("b", 1), ("b", 2), ("all", "b")]
    assert turn_index() is None
    assert run_in_turns([lambda: 1, lambda: 2]) == [1, 2]  # turns that never park just run through
    var = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    assert run_in_turns([var.get]) == ["caller's"]  # a turn sees the caller's context variables


def test_turns_that_part_ways_or_fail_are_unwound():
    with pytest.raises(TurnsDiverged, match="turn 0 waits at 1 but turn 1 reached 2"):
        run_in_turns([lambda: park(1), lambda: park(2)])
    with pytest.raises(TurnsDiverged, match="turn 0 waits at 1 but turn 1 reached 'its end'"):
        run_in_turns([lambda: park(1), lambda: None])
    with pytest.raises(RuntimeError, match="outside run_in_turns"):
        park(1)
    unwound = []

    def waits():
        try:
            park("x")
        finally:
            unwound.append(turn_index())

    with pytest.raises(ZeroDivisionError):  # on_all fails: the waiting turns' finally blocks still run
        run_in_turns([waits, waits], on_all=lambda key: 1 / 0)
    assert unwound == [0, 1]

    def fails():
        raise ValueError("in a turn")

    unwound.clear()
    with pytest.raises(ValueError, match="in a turn"):  # a turn fails: the one already waiting is unwound
        run_in_turns([waits, fails, waits])
    assert unwound == [0]


def test_a_forward_in_turns_parks_in_hooks_and_gives_the_same_outputs(model):
    """A block run in turns of samples, every turn parked at each linear: the hooks see each turn's own
    input and the outputs are those of the block run on each turn's samples."""
    ad = get_adapter(model)
    block = ad.get_blocks(model)[0]
    lin = linears(model)
    x = torch.randn(4, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(16)[None]
    emb = model.model.rotary_emb(x, pos)
    order = []

    def hook(call):
        order.append((call.name, turn_index(), call.input.shape[0]))
        park(call.name)

    def forward(s):
        return block(x[s:s + 2], position_embeddings=emb, position_ids=pos)

    with torch.no_grad():
        with hooks(lin, hook, when="before"):
            out = run_in_turns([lambda: forward(0), lambda: forward(2)], on_all=lambda key: order.append(key))
        plain = [forward(0), forward(2)]
    out = [o[0] if isinstance(o, tuple) else o for o in out]
    plain = [o[0] if isinstance(o, tuple) else o for o in plain]
    assert all(torch.equal(a, b) for a, b in zip(out, plain))
    names = [o for o in order if isinstance(o, str)]  # on_all's keys: the linears in the order they ran
    assert sorted(names) == sorted(lin) and no_hooks(model)
    assert order == [e for name in names for e in ((name, 0, 2), (name, 1, 2), name)]  # turn 0, 1, on_all
