"""gptq_explorer.lessons.real_layers: the inputs of real linears (lessons 4-6), captured on a tiny random
LLaMA and checked against a plain forward hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq_explorer.lessons import real_layers as L


def as_real_layers(data, name="model.layers.3.mlp.down_proj", corpora=("prose",), X_calib=None,
                   X_heldout=None):
    """Wrap LayerData as RealLayers (one layer, one or more 'corpora')."""
    X_calib = X_calib or {c: np.asarray(data.X_calib) for c in corpora}
    X_heldout = X_heldout or {c: np.asarray(data.X_heldout) for c in corpora}
    return L.RealLayers([name], {name: np.asarray(data.W, dtype=np.float64)},
                        {(name, c): X_calib[c] for c in corpora}, {(name, c): X_heldout[c] for c in corpora},
                        tuple(corpora), 4, 256, X_heldout[corpora[0]].shape[0])



def test_capture_inputs_matches_a_plain_hook(tiny_lm):
    from gptq_explorer.models import quantizable_modules

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ids = torch.randint(0, 250, (3, 16), generator=torch.Generator().manual_seed(0))
    got = L.capture_inputs(tiny_lm, names, ids, batch_size=2)
    seen = {n: [] for n in names}
    mods = quantizable_modules(tiny_lm.model)
    hs = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
          for n in names]
    with torch.no_grad():
        tiny_lm.model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    for n in names:
        assert got[n].shape == (48, mods[n].in_features)
        assert np.allclose(got[n], seen[n][0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="unknown layer"):
        L.capture_inputs(tiny_lm, ["model.layers.9.mlp.down_proj"], ids)


def test_load_real_layers(tiny_lm):
    layers = L.load_real_layers(tiny_lm, [(1, "mlp.down_proj")], corpora=("prose", "code"), nsamples=2,
                                seqlen=32, heldout_tokens=64)
    name = "model.layers.1.mlp.down_proj"
    assert layers.names == [name] and layers.short(name) == "block 1 down_proj"
    assert layers.X_calib[(name, "code")].shape == (64, 96)
    assert layers.X_heldout[(name, "prose")].shape == (64, 96)
    assert not np.allclose(layers.H(name, "prose"), layers.H(name, "code"))
    X = layers.X_calib[(name, "prose")].astype(np.float64)
    assert np.allclose(layers.H(name), 2 / X.shape[0] * X.T @ X)
    W = L.weight_of(tiny_lm, name)
    assert W.dtype == np.float64 and W.shape == (64, 96)
