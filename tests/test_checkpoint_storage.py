"""gptq_explorer.checkpoint.storage: the bits a GPTQ checkpoint stores per linear equal the sizes of the
tensors the packer writes; summed over a model's layers with per-layer settings."""

from __future__ import annotations

import numpy as np
import pytest

from gptq_explorer import QuantConfig
from gptq_explorer.checkpoint import n_groups, pack_linear
from gptq_explorer.checkpoint import storage as S


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_layer_bits_are_the_packed_tensor_sizes(bits, group_size):
    rng = np.random.default_rng(bits)
    out_f, in_f = 64, 96  # g64 on 96 inputs leaves a short last group of 32
    G = n_groups(in_f, group_size)
    codes = rng.integers(0, 2**bits, (out_f, in_f))
    zeros = rng.integers(1, 2**bits, (out_f, G))
    g_idx = np.arange(in_f) // (in_f if group_size == -1 else group_size)
    packed = pack_linear(codes, rng.random((out_f, G)) + 0.1, zeros, g_idx, bits)
    want = S.linear_bits(out_f, in_f, bits, group_size)
    assert {k: v.nbytes * 8 for k, v in packed.items()} == want
    s = S.Storage()
    s.add(out_f, in_f, bits, group_size)
    assert s.bits_per_weight == pytest.approx(sum(want.values()) / (out_f * in_f))
    assert s.per_weight()["qweight"] == bits


def test_storage_from_configs_with_overrides(tiny_lm):
    from gptq_explorer.models.quantize import layer_configs

    model = tiny_lm.model
    ad = tiny_lm.adapter
    shapes = {f"{ad.block_prefix(i)}.{n}": tuple(m.weight.shape) for i, b in enumerate(ad.get_blocks(model))
              for n, m in ad.linears(b).items()}
    base = QuantConfig(group_size=32)
    cfgs = layer_configs(list(shapes), base, {"blocks.-1.*": {"bits": 8}}, ad, 2)
    s = S.storage_from_configs(shapes, cfgs)
    direct = 0
    for name, (o, i) in shapes.items():
        b = 8 if name.startswith("model.layers.1.") else 4
        direct += o * i * b + (i // 32) * o * (b + 16) + i * 32
    assert s.total_bits == direct and s.layers == 14
