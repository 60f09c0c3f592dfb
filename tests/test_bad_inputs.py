"""Bad input, one test per row of the table in docs/errors.md: what is tried, and what the user gets.

Every message must name the problem AND the fix; nothing may be left half-done: a failed quantization restores
the model's weights, a failed export or cache write leaves no folder that could be read back as valid (temp
folder + completion marker + rename), and a rejected batch leaves a Hessian unchanged. Tiny models only
(hidden 64, a byte tokenizer), so the whole file runs in seconds.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
import warnings

import numpy as np
import pytest
import torch
from tiny_models import make_byte_tokenizer, make_tiny_model, tiny_config

from gptq_explorer import Hessian, QuantConfig, gptq_quantize
from gptq_explorer.checkpoint import CheckpointFormatError
from gptq_explorer.checkpoint.export import save_quantized
from gptq_explorer.checkpoint.load import load_quantized
from gptq_explorer.data import CorpusError, calibration_windows
from gptq_explorer.models import ModelLoadError, cache_folders, load_model, loading
from gptq_explorer.models.quantize import QuantizationCancelled, quantize_model

BACKENDS = ("numpy", "torch")


def layer(seed=0, d_out=16, d_in=64, tokens=256):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    X = rng.standard_normal((tokens, d_in)) @ rng.standard_normal((d_in, d_in)) / 8
    return W, Hessian(d_in).add_batch(X).H


def tiny_llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.normal_(0, 0.08)
    return model


def calib(n=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def as_np(x) -> np.ndarray:
    return x.numpy().astype(np.float64) if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    changed = [k for k, v in before.items()
               if not np.array_equal(v.numpy(), after[k].numpy(), equal_nan=True)]
    assert changed == [], f"weights changed by a failed run: {changed[:5]}"


def no_temp_leftovers(folder) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------
# NaN / Inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_weights_names_the_layer_fix(backend):
    W, H = layer()
    W[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"W contains NaN or Inf.*reload the model in float32"):
        gptq_quantize(W, H, backend=backend)
    H2 = H.copy()
    H2[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"H contains NaN or Inf.*calibration forward pass in float32"):
        gptq_quantize(layer()[0], H2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_activations_is_rejected_and_the_hessian_is_unchanged(backend):
    rng = np.random.default_rng(1)
    h = Hessian(32, backend=backend)
    good = rng.standard_normal((10, 32)).astype(np.float32)
    h.add_batch(torch.from_numpy(good) if backend == "torch" else good)
    H0 = as_np(h.H)
    # two chunks' worth of tokens, the bad one in the last chunk: nothing of the batch may be added
    bad = rng.standard_normal((5000, 32)).astype(np.float32)
    bad[-1, 7] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 of 5000 tokens.*not added.*float32"):
        h.add_batch(torch.from_numpy(bad) if backend == "torch" else bad)
    assert h.n_tokens == 10
    np.testing.assert_array_equal(as_np(h.H), H0)


def test_model_with_nan_weight_fails_cleanly_and_is_restored():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")  # the block's last group
    before = weights(model)
    with pytest.raises(ValueError, match=r"W contains NaN or Inf.*re-download"):
        quantize_model(model, calib(), QuantConfig(bits=4, group_size=32), progress=False)
    assert_unchanged(model, before)  # the q/k/v/o/up/gate layers quantized first were put back


def test_model_with_inf_activations_fails_cleanly_and_is_restored():
    model = tiny_llama()
    ids = calib()
    with torch.no_grad():
        model.model.embed_tokens.weight[int(ids[0, 0])] = float("inf")
    before = weights(model)
    with pytest.raises(ValueError, match=r"activations contain NaN or Inf.*float32"):
        quantize_model(model, ids, QuantConfig(bits=4, group_size=32), progress=False)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------------
# degenerate layers and Hessians


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_weights_quantize_exactly_to_zero(backend):
    _, H = layer()
    res = gptq_quantize(np.zeros((16, 64)), H, QuantConfig(bits=4, group_size=32), backend=backend)
    assert np.array_equal(res.weight, np.zeros((16, 64)))
    assert (np.asarray(res.codes) == 8).all() and (np.asarray(res.zeros) == 8).all()
    assert np.isfinite(res.scales).all() and (np.asarray(res.scales) > 0).all()


def test_all_zero_inputs_warn_that_the_layer_becomes_zero():
    W, _ = layer()
    with pytest.warns(RuntimeWarning, match=r"all 64 inputs of this layer were zero.*Calibrate with text"):
        res = gptq_quantize(W, np.zeros((64, 64)))
    assert np.array_equal(res.weight, np.zeros_like(W)) and np.asarray(res.dead_columns).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_singular_hessian_is_handled_by_damping(backend):
    W, _ = layer()
    X = np.random.default_rng(2).standard_normal((8, 64))  # rank 8 < 64
    H = Hessian(64).add_batch(X).H
    assert np.linalg.matrix_rank(H) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1% damping suffices: no retry, no warning
        res = gptq_quantize(W, H, backend=backend)
    assert np.isfinite(res.weight).all() and res.damp_percent_used == 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_positive_definite_hessian(backend):
    W, H = layer()
    with pytest.raises(ValueError, match=r"not positive definite even after raising damp_percent.*"
                                         r"calibration data"):
        gptq_quantize(W, -H, backend=backend)
    A = H.copy()
    A[0, 1] += 1.0
    with pytest.raises(ValueError, match=r"H must be symmetric.*symmetrize it: \(H \+ H.T\) / 2"):
        gptq_quantize(W, A, backend=backend)
    # barely indefinite: the damping retry rescues it, and says so
    ev, V = np.linalg.eigh(H)
    ev[0] = -0.03 * ev.mean()
    with pytest.warns(RuntimeWarning, match=r"quantized with damp_percent=0.1 instead.*calibration"):
        res = gptq_quantize(W, (V * ev) @ V.T, backend=backend)
    assert res.damp_percent_used == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=1), r"bits must be between 2 and 8 .*got 1"),
        (dict(bits=16), r"bits must be between 2 and 8 .*got 16"),
        (dict(bits=4.5), r"bits must be an integer, got 4.5"),
        (dict(group_size=0), r"group_size must be -1 \(one group per row\) or a positive number.*got 0"),
        (dict(group_size=-8), r"group_size must be -1 .*got -8"),
        (dict(damp_percent=0.0), r"damp_percent must be strictly between 0 and 1 \(0.01 = 1%.*got 0"),
        (dict(damp_percent=2.0), r"damp_percent must be strictly between 0 and 1 .*got 2"),
        (dict(damp_percent=float("nan")), r"damp_percent must be strictly between 0 and 1 .*got nan"),
        (dict(block_size=0), r"block_size must be a positive number of columns, got 0"),
        (dict(sym="yes"), r"sym must be True or False, got 'yes'"),
    ],
)
def test_settings_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_unknown_setting_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown QuantConfig field\(s\) \['bitz'\]; allowed: .*'bits'"):
        QuantConfig.from_dict({"bitz": 4})


def test_a_config_that_is_not_a_quantconfig_is_refused():
    """A string or a dict where a QuantConfig belongs: every entry point (QuantConfig.coerce) says what it
    wants, and a model is left unchanged."""
    from gptq_explorer import gptq_steps, rtn_quantize

    W, H = layer()
    with pytest.raises(ValueError, match="cfg must be a QuantConfig"):
        gptq_quantize(W, H, "4bit")
    with pytest.raises(ValueError, match="cfg must be a QuantConfig"):
        rtn_quantize(W, "4bit")
    with pytest.raises(ValueError, match="cfg must be a QuantConfig"):
        gptq_steps(W, H, {"bits": 4})
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(ValueError, match="cfg must be a QuantConfig"):
        quantize_model(model, calib(), cfg="4bit", progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_size_not_dividing_the_width_keeps_a_short_last_group(backend):
    W, H = layer(d_in=80)  # 80 = 2 * 32 + 16
    res = gptq_quantize(W, H, QuantConfig(bits=4, group_size=32), backend=backend)
    g = np.asarray(res.g_idx)
    assert res.n_groups == 3 and (g[64:] == 2).all() and (g[:32] == 0).all()
    np.testing.assert_allclose(np.asarray(res.dequantize()), np.asarray(res.weight), rtol=0, atol=1e-6)


def test_export_with_a_short_last_group_says_which_loaders_refuse(tmp_path):
    # intermediate 96 with g64: down_proj ends with a group of 32 (SmolLM2 576 with g128 does the same)
    qm = quantize_model(tiny_llama(), None, QuantConfig(bits=4, group_size=64), method="rtn", progress=False)
    result = save_quantized(qm, tmp_path / "ckpt", warn=False)
    vllm = next(s for s in result.loaders if s.loader == "vLLM")
    assert not vllm.ok
    assert "in_features % group_size == 0" in vllm.reasons[0] and "in=96, g64" in vllm.reasons[0]
    ckpt = load_quantized(tmp_path / "ckpt", tokenizer=False)
    name = "model.layers.0.mlp.down_proj"
    assert ckpt.layers[name].n_groups == 2
    np.testing.assert_array_equal(ckpt.layers[name].codes, qm.results[name].codes.numpy())


# ---------------------------------------------------------------------------------------------------------
# calibration text


def test_calibration_text_shorter_than_one_window(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("A short text.\n" * 8)  # 112 characters; 35% of them calibrate: ~40 byte tokens
    with pytest.raises(ValueError, match=r"has \d+ tokens .*fewer than one window of seqlen=64.*"
                                         r"Use a shorter seqlen or a longer text"):
        calibration_windows(make_byte_tokenizer(), str(f), nsamples=4, seqlen=64)
    assert calibration_windows(make_byte_tokenizer(), str(f), nsamples=2, seqlen=16).shape == (2, 16)


@pytest.mark.parametrize("content", [b"", b"  \n\n\t \n"])
def test_empty_corpus_file(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(CorpusError, match=r"is empty \(or only whitespace\)\. Put some text in it"):
        calibration_windows(make_byte_tokenizer(), str(f), nsamples=1, seqlen=8)


def test_non_utf8_corpus_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1") * 50)
    with pytest.raises(CorpusError, match=r"is not UTF-8 text \(byte 3: b'\\xe9'\).*"
                                          r"iconv -f latin1 -t utf-8"):
        calibration_windows(make_byte_tokenizer(), str(f), nsamples=1, seqlen=8)


def test_missing_corpus_file_lists_the_built_in_ones(tmp_path):
    with pytest.raises(CorpusError, match=r"does not exist\. Pass an existing UTF-8 text file, or one of: "
                                          r"prose, code"):
        calibration_windows(make_byte_tokenizer(), str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------------------------------------------------
# models


def test_unknown_model_id_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_hub_cache_dir", lambda: tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"Cannot load 'nobody-xyz/no-such-model': offline mode is on.*"
                                             r"Available offline: .*Connect to the internet once"):
        load_model("nobody-xyz/no-such-model")
    assert time.perf_counter() - t0 < 30  # no network wait


def test_local_folder_without_weights(tmp_path):
    d = tmp_path / "noweights"
    tiny_config("llama").save_pretrained(d)
    with pytest.raises(ModelLoadError, match=r"has a config.json but no weights \(\*\.safetensors\)\. "
                                             r"Copy the weights there"):
        load_model(str(d))


def test_pickle_only_checkpoint_is_refused_unopened(tmp_path):
    d = tmp_path / "pickled"
    tiny_config("llama").save_pretrained(d)
    # a pickle that would run code if it were ever unpickled: it must not be
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(Vtouch " + str(marker).encode() + b"\ntR."  # protocol-0 pickle
    (d / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ModelLoadError, match=r"only has pickle checkpoints \(pytorch_model.bin\)\. Loading a "
                                             r"pickle can run arbitrary code.*save_pretrained"):
        load_model(str(d))
    assert not marker.exists()


def _sparse_safetensors(path, n_params: int, dtype="BF16"):
    """A valid safetensors file declaring one (n_params,) tensor; sparse on disk (no data written)."""
    nbytes = n_params * {"BF16": 2, "F32": 4}[dtype]
    header = json.dumps({"model.embed_tokens.weight": {"dtype": dtype, "shape": [n_params],
                                                       "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + nbytes)


def test_model_too_large_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv(loading.MEMORY_ENV, raising=False)
    d = tmp_path / "huge"
    tiny_config("llama").save_pretrained(d)
    _sparse_safetensors(d / "model.safetensors", 64 * 10**9)  # 64B parameters: 128 GB in bf16
    t0 = time.perf_counter()
    with pytest.raises(loading.ModelTooLargeError) as e:
        load_model(str(d))
    assert time.perf_counter() - t0 < 10  # refused from the header alone: nothing was read
    est = e.value.estimate
    assert est.parameters == 64 * 10**9 and est.bytes_per_parameter == 4 and not est.fits
    msg = str(e.value)
    assert "64,000M parameters x 4 bytes (float32) x 1.25" in msg and "= 320.0 GB" in msg
    assert f"only {est.bytes_available / 1e9:.1f} GB is available" in msg and "Nothing was loaded" in msg
    assert "Pick a smaller model" in msg and "bfloat16 would need 160.0 GB, still too much" in msg


def test_memory_cap_env_and_exact_parameter_count(tmp_path, monkeypatch):
    d = make_tiny_model("llama", tmp_path / "tiny")
    est = loading.estimate_model_memory(str(d))
    real = load_model(str(d), check_memory=False).model
    stored = {p.data_ptr(): p.numel() for p in real.parameters()}  # tied embeddings stored once
    assert est.parameters == sum(stored.values()) and est.fits
    monkeypatch.setenv(loading.MEMORY_ENV, "0.0001")  # 100 kB for a 0.2 MB model
    with pytest.raises(loading.ModelTooLargeError, match=r"GPTQ_EXPLORER_MAX_MODEL_GB=0.0001"):
        load_model(str(d))
    monkeypatch.setenv(loading.MEMORY_ENV, "lots")
    with pytest.raises(ModelLoadError, match=r"GPTQ_EXPLORER_MAX_MODEL_GB='lots' is not a number"
                                             r".*e\.g\. 2\.5"):
        load_model(str(d))


def test_damaged_weights_of_a_local_model(tmp_path):
    d = make_tiny_model("llama", tmp_path / "tiny")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"damaged or incomplete.*Copy or download the model again"):
        load_model(str(d))


# ---------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from tiny_models import make_byte_tokenizer as tok

    qm = quantize_model(tiny_llama(), None, QuantConfig(bits=4, group_size=32), method="rtn", progress=False)
    qm.tokenizer = tok()
    folder = tmp_path_factory.mktemp("export") / "ckpt"
    save_quantized(qm, folder, warn=False)
    return qm, folder


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_truncated_checkpoint(export, tmp_path):
    folder = _copy(export[1], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors is not a readable safetensors file "
                                                    r"\(truncated\?\).*copy the folder again or re-export"):
        load_quantized(folder)


def test_corrupted_checkpoint_header_and_config(export, tmp_path):
    folder = _copy(export[1], tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:16] = b"#garbage"  # inside the JSON header
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"not a readable safetensors file.*re-export"):
        load_quantized(folder)
    shutil.copy(export[1] / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointFormatError, match=r"config.json is not valid JSON.*Copy the folder again"):
        load_quantized(folder)


# ---------------------------------------------------------------------------------------------------------
# cancel


def test_cancelled_quantization_restores_the_model_and_caches_nothing(tmp_path):
    model = tiny_llama()
    before = weights(model)
    polls = []

    def cancel():  # the Cancel button: set after a few checks, i.e. mid-way through block 0
        polls.append(1)
        return len(polls) > 4

    cache = tmp_path / "cache"
    with pytest.raises(QuantizationCancelled, match=r"cancelled after \d+ of 14 layers; the original weights "
                                                    r"were restored, so the model is unchanged") as e:
        quantize_model(model, calib(), QuantConfig(bits=4, group_size=32), progress=False, cancel=cancel,
                       cache_dir=cache)
    assert 0 < len(e.value.layers_done) < 14
    assert_unchanged(model, before)
    assert not cache.exists() or list(cache.iterdir()) == []
    # and the same model quantizes normally afterwards, exactly like a fresh copy
    a = quantize_model(model, calib(), QuantConfig(bits=4, group_size=32), progress=False)
    b = quantize_model(tiny_llama(), calib(), QuantConfig(bits=4, group_size=32), progress=False)
    for name in a.results:
        assert torch.equal(a.results[name].codes, b.results[name].codes), name


# ---------------------------------------------------------------------------------------------------------
# full disk


def _full_disk_after(nbytes: int):
    """A safetensors.torch.save_file that writes nbytes of the file, then fails like a full disk."""

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    return save_file


def test_full_disk_while_exporting_leaves_nothing(export, tmp_path, monkeypatch):
    import safetensors.torch

    qm, good = export
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_after(4096))
    with pytest.raises(OSError, match=r"No space left on the device while writing the checkpoint to "
                                      r".*nothing was written.*Free some disk space there, "
                                      r"or save to a folder") as e:
        save_quantized(qm, tmp_path / "new", warn=False)
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder
    # overwriting an existing export: the old folder survives intact
    old = _copy(good, tmp_path)
    files = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(OSError, match=r"the existing folder was kept unchanged"):
        save_quantized(qm, old, overwrite=True, warn=False)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == files and no_temp_leftovers(tmp_path)
    monkeypatch.undo()
    assert load_quantized(old, tokenizer=False).config.bits == 4


def test_full_disk_while_writing_a_model_cache_folder(tmp_path):
    target = tmp_path / "models" / "some-model"

    def write(tmp):
        (tmp / "config.json").write_text("{}")
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ModelLoadError, match=r"No space left on the device while writing the cache folder .*"
                                             r"nothing was cached.*GPTQ_EXPLORER_CACHE"):
        cache_folders.write_cache_folder(target, write, needs="about 0.5 GB")
    assert list(target.parent.iterdir()) == []
    # a finished folder is complete; cutting a file short (or losing one) makes it incomplete
    cache_folders.write_cache_folder(target, lambda tmp: (tmp / "a.bin").write_bytes(b"x" * 100) and {})
    assert cache_folders.cache_folder_complete(target)
    (target / "a.bin").write_bytes(b"x" * 50)
    assert not cache_folders.cache_folder_complete(target)
    (target / "a.bin").unlink()
    assert not cache_folders.cache_folder_complete(target)
    assert not cache_folders.cache_folder_complete(tmp_path / "missing")


def test_full_disk_while_caching_a_quantization_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    model = tiny_llama()
    cache = tmp_path / "cache"
    cfg = QuantConfig(bits=4, group_size=32)
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_after(100))
    try:
        quantize_model(model, calib(), cfg, progress=False, cache_dir=cache, inplace=False)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    assert list(cache.iterdir()) == []  # no entry, no temp folder: nothing half-written can be read back
    monkeypatch.undo()
    qm = quantize_model(model, calib(), cfg, progress=False, cache_dir=cache, inplace=False)
    assert not qm.from_cache and len(list(cache.iterdir())) == 1
    again = quantize_model(model, calib(), cfg, progress=False, cache_dir=cache, inplace=False)
    assert again.from_cache
    for name in qm.results:
        assert torch.equal(again.results[name].codes, qm.results[name].codes.to(torch.int32)), name


def test_full_disk_while_caching_keeps_the_result_and_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_after(100))
    with pytest.warns(RuntimeWarning, match=r"could not be cached.*No space left.*Free some disk space"):
        qm = quantize_model(tiny_llama(), calib(), QuantConfig(bits=4, group_size=32), progress=False,
                            cache_dir=tmp_path / "cache")
    assert len(qm.results) == 14


def test_damaged_quantization_cache_entry_is_recomputed(tmp_path):
    cache = tmp_path / "cache"
    cfg = QuantConfig(bits=4, group_size=32)
    model = tiny_llama()
    first = quantize_model(model, calib(), cfg, progress=False, cache_dir=cache, inplace=False)
    entry = cache / first.cache_key
    data = (entry / "results.safetensors").read_bytes()
    (entry / "results.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="damaged"):
        qm = quantize_model(model, calib(), cfg, progress=False, cache_dir=cache, inplace=False)
    assert not qm.from_cache and len(qm.results) == 14
