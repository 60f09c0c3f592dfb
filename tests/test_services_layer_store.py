"""The layer store (services.layer_store): captured layers on disk, read with NumPy alone.

Model-free where possible: a "model" here is a folder with a config.json (all the store's key needs), and
its "capture" a synthetic layer (ModelSource._capture and model_structure patched)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gptq_explorer.services import layer_source, layer_store
from gptq_explorer.services.layer_source import LayerData, ModelSource, SyntheticSource

ROOT = Path(__file__).resolve().parent.parent
STRUCTURE = (2, ["self_attn.q_proj", "mlp.down_proj"])


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty cache folder of its own (the store is $GPTQ_EXPLORER_CACHE/layers)."""
    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(layer_store.STORE_GB_ENV, raising=False)
    return tmp_path / "cache" / "layers"


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A ModelSource on a folder that only has to exist (its files identify it), whose capture is a small
    synthetic layer and whose structure is STRUCTURE: no torch, no model. Counts the captures."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    captures = []

    def capture(self, progress, should_cancel):
        captures.append(self.key)
        data = SyntheticSource(d_out=24, d_in=40, n_calib=96, n_heldout=48, seed=self.block).load()
        return LayerData(data.W, data.X_calib.astype(np.float32), data.X_heldout.astype(np.float32),
                         self.name, f"fake capture of {self.name}")

    def capture_pair(self, progress, should_cancel):
        captures.append(self.pair_key)
        pair = SyntheticSource(d_out=24, d_in=40, n_calib=96, n_heldout=48, seed=self.block).load_pair()
        return dataclasses.replace(pair, name=self.name)

    monkeypatch.setattr(ModelSource, "_capture", capture)
    monkeypatch.setattr(ModelSource, "_capture_pair", capture_pair)
    monkeypatch.setattr(layer_source, "model_structure", lambda name, progress=None: STRUCTURE)
    src = ModelSource(model=str(folder), corpus="prose", nsamples=4, seqlen=48, heldout_tokens=48)
    return src, captures


def forget(src: ModelSource) -> None:
    """Drop src's layers from this process' memory cache, so the next read is the store's."""
    with layer_source._ACTS_LOCK:
        layer_source._ACTS.pop(src.key, None)
        layer_source._ACTS.pop(src.pair_key, None)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


# ---------------------------------------------------------------------------------------------------------
# the key


def test_the_key_names_a_stable_path_sensitive_to_every_field(store, fake_model, monkeypatch):
    src, _ = fake_model
    key = src.store_key()
    path = layer_store.entry_path(key)
    assert path.parent == store and path == layer_store.entry_path(dict(reversed(list(key.items()))))
    # the same path in another process (no hash randomisation, no dict order in it)
    out = run_python(f"""
        from gptq_explorer.services.layer_source import ModelSource
        from gptq_explorer.services import layer_store
        print(layer_store.entry_path(ModelSource(model={src.model!r}, corpus="prose", nsamples=4, seqlen=48,
                                                 heldout_tokens=48).store_key()))""",
                     GPTQ_EXPLORER_CACHE=os.environ["GPTQ_EXPLORER_CACHE"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(path)

    # every field of the source's key, the stream, the model's files, the corpus and the software
    variants = {f.name: dataclasses.replace(src, **{f.name: _other(getattr(src, f.name))})
                for f in dataclasses.fields(src) if f.metadata.get("key", True)}
    paths = {name: layer_store.entry_path(v.store_key()) for name, v in variants.items()
             if name != "model"}  # another model name: another folder, below
    paths["pair"] = layer_store.entry_path(src.store_key(pair=True))
    paths["corpus file"] = layer_store.entry_path(
        dataclasses.replace(src, corpus=str(Path(src.model) / "config.json")).store_key())
    with monkeypatch.context() as m:
        m.setattr(layer_store, "software", lambda: {"torch": "0", "transformers": "0"})
        paths["software"] = layer_store.entry_path(src.store_key())
    with monkeypatch.context() as m:
        m.setattr(layer_store, "FORMAT", layer_store.FORMAT + 1)
        paths["format"] = layer_store.entry_path(src.store_key())
    time.sleep(0.01)
    (Path(src.model) / "model.safetensors").write_bytes(b"new weights")
    paths["model files"] = layer_store.entry_path(src.store_key())
    assert set(paths) >= {"block", "sublayer", "corpus", "nsamples", "seqlen", "heldout_tokens", "seed"}
    assert len(set(paths.values()) | {path}) == len(paths) + 1, paths
    # what only changes the speed is not in it; a model that is not on this machine has no key
    assert dataclasses.replace(src, batch_size=1).store_key() == src.store_key()
    assert ModelSource(model=str(Path(src.model) / "missing")).store_key() is None


def _other(value):
    return value + 1 if isinstance(value, int) else value + "x"


# ---------------------------------------------------------------------------------------------------------
# writing and reading


def test_write_then_read_is_exact_and_read_only(store):
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((7, 5)), "X": rng.standard_normal((11, 5)).astype(np.float32),
              "n": np.arange(4, dtype=np.int64), "empty": np.zeros((0, 5), np.float32)}
    key = {"what": "a test", "n": 3}
    folder = layer_store.write(key, arrays, {"name": "layer", "structure": [2, ["a", "b"]]})
    assert folder == layer_store.entry_path(key) and folder.is_dir()
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temporary folder left
    entry = layer_store.read(key)
    assert entry.meta == {"name": "layer", "structure": [2, ["a", "b"]]}
    assert set(entry.arrays) == set(arrays)
    for name, a in arrays.items():
        b = entry.arrays[name]
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), name
        assert type(b) is np.ndarray and not b.flags.writeable
    assert isinstance(entry.arrays["W"].base, np.memmap)  # mapped: only the pages used are read
    manifest = json.loads((folder / layer_store.MANIFEST).read_text())
    assert manifest["key"]["format"] == layer_store.FORMAT and manifest["arrays"]["X"]["dtype"] == "<f4"
    assert layer_store.read({"what": "another"}) is None


def test_a_model_layer_round_trips_through_the_store(store, fake_model):
    src, captures = fake_model
    data = src.load()
    assert captures == [src.key] and layer_store.entry_path(src.store_key()).is_dir()
    forget(src)
    stored = src.cached()
    assert stored is not None and stored is not data and captures == [src.key]
    for name in ("W", "X_calib", "X_heldout", "H", "H_heldout"):
        a, b = getattr(data, name), getattr(stored, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (stored.name, stored.description) == (data.name, data.description)
    assert src.cached() is stored and src.load() is stored  # the memory cache now
    assert layer_source.cached_model_structure(src.model) == STRUCTURE

    # GPTAQ's two streams are stored under a key of their own
    pair = src.load_pair()
    forget(src)
    again = src.cached_pair()
    assert again.has_fp and captures == [src.key, src.pair_key]
    for name in ("X_calib", "X_heldout", "X_calib_fp", "X_heldout_fp", "H", "dXXT"):
        assert np.array_equal(getattr(pair, name), getattr(again, name)), name


def test_reading_a_stored_layer_imports_no_torch(store, fake_model):
    """A fresh process (a visitor's kernel) shows a stored model layer at once: the Layer Lab on it, with
    its model's blocks and sublayers, without torch, transformers or the model."""
    src, _ = fake_model
    data = src.load()
    out = run_python(f"""
        import sys
        from gptq_explorer.services.layer_source import ModelSource
        from gptq_explorer.ui import LayerLab
        src = ModelSource(model={src.model!r}, corpus="prose", nsamples=4, seqlen=48, heldout_tokens=48)
        lab = LayerLab(source=src, models={{}}, defer_load_s=60)
        assert lab.data.name == src.name and lab._job is None and lab._deferred is None, lab.data.name
        assert list(lab.controls["block"].options) == [0, 1], lab.controls["block"].options
        heavy = sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)
        print(heavy, float(lab.data.H.sum()), lab.run.n)""",
                     GPTQ_EXPLORER_CACHE=os.environ["GPTQ_EXPLORER_CACHE"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", repr(float(data.H.sum())), str(data.W.shape[1])]


def test_choosing_a_stored_layer_in_the_lab_loads_no_model(store, fake_model, monkeypatch):
    """A layer another process stored: picked in the lab, it shows with its model's blocks and sublayers,
    and the model is never loaded."""
    src, _ = fake_model
    other = ModelSource(model=src.model, block=1, nsamples=8)  # the lab's own seqlen and held-out tokens
    other.load()
    forget(other)
    layer_source._STRUCTURES.pop(src.model, None)  # as in a process that has not read it yet
    monkeypatch.setattr(layer_source, "get_model", _no_model)
    from gptq_explorer.ui import LayerLab

    lab = LayerLab(source=SyntheticSource(), models={src.model: "fake"}, threaded=False)
    lab.set(model=src.model, block=1, sublayer=other.sublayer, nsamples=8)
    assert lab.errors == [] and lab.data.name == other.name, lab.errors
    assert list(lab.controls["block"].options) == [0, 1]


def _no_model(name, progress=None):
    raise AssertionError(f"{name} was loaded")


# ---------------------------------------------------------------------------------------------------------
# damage: detected, deleted, captured again


def _truncate(folder):
    path = folder / "X_calib.npy"
    path.write_bytes(path.read_bytes()[:-100])


def _remove(folder):
    (folder / "H.npy").unlink()


def _flip(folder):  # same size, other bytes: only the checksum sees it
    path = folder / "W.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def _garble_manifest(folder):
    (folder / layer_store.MANIFEST).write_text('{"key": ')


def _wrong_shape(folder):  # a manifest edited by hand
    manifest = json.loads((folder / layer_store.MANIFEST).read_text())
    manifest["arrays"]["W"]["shape"] = [1, 2]
    (folder / layer_store.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_truncate, _remove, _flip, _garble_manifest, _wrong_shape])
def test_a_damaged_entry_is_detected_deleted_and_rebuilt(store, fake_model, damage, caplog):
    src, captures = fake_model
    data = src.load()
    folder = layer_store.entry_path(src.store_key())
    damage(folder)
    forget(src)
    assert src.cached() is None  # never served
    assert not folder.exists() and "damaged" in caplog.text
    assert not list(store.iterdir())  # set aside and deleted
    again = src.load()  # captured again, stored anew
    assert captures == [src.key, src.key] and np.array_equal(again.W, data.W)
    forget(src)
    assert np.array_equal(src.cached().X_calib, data.X_calib)


# ---------------------------------------------------------------------------------------------------------
# concurrent writers

WRITER = """
import sys, time
import numpy as np
from gptq_explorer.services import layer_store
i, start = int(sys.argv[1]), float(sys.argv[2])
arrays = {f"a{j}": np.full((256, 1024), i, dtype=np.float64) for j in range(4)}
time.sleep(max(start - time.time(), 0))
print(layer_store.write({"layer": "the same"}, arrays, {"writer": i}))
"""


def _check_whole(entry) -> int:
    """The writer whose entry this is: every array holds its number (no mix of two writers)."""
    writer = entry.meta["writer"]
    assert sorted(entry.arrays) == ["a0", "a1", "a2", "a3"]
    for a in entry.arrays.values():
        assert a.shape == (256, 1024) and np.all(a == writer)
    return writer


def test_concurrent_writers_in_processes_leave_one_whole_entry(store):
    start = time.time() + 2.0  # the interpreters start first, then all write at once
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i), str(start)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    seen = set()
    while any(p.poll() is None for p in procs):  # a reader meanwhile: a whole entry or none
        entry = layer_store.read({"layer": "the same"})
        if entry is not None:
            seen.add(_check_whole(entry))
        time.sleep(0.005)
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    folder = layer_store.entry_path({"layer": "the same"})
    assert {out.strip() for out, _ in outs} == {str(folder)}
    winner = _check_whole(layer_store.read({"layer": "the same"}))
    assert seen <= {winner} and [p.name for p in store.iterdir()] == [folder.name]


def test_concurrent_writers_in_threads_leave_one_whole_entry(store):
    barrier = threading.Barrier(4)
    results = [None] * 4

    def write(i):
        arrays = {f"a{j}": np.full((256, 1024), i, dtype=np.float64) for j in range(4)}
        barrier.wait()
        results[i] = layer_store.write({"layer": "the same"}, arrays, {"writer": i})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == {layer_store.entry_path({"layer": "the same"})}
    _check_whole(layer_store.read({"layer": "the same"}))
    assert len(list(store.iterdir())) == 1


# ---------------------------------------------------------------------------------------------------------
# size, off switch


def test_the_store_keeps_within_its_size_dropping_the_least_recently_used(store, monkeypatch):
    a = np.zeros((1000, 100))  # 0.8 MB an entry
    for i in range(3):
        layer_store.write({"i": i}, {"a": a})
        os.utime(layer_store.entry_path({"i": i}) / layer_store.MANIFEST, (1000 + i, 1000 + i))
    layer_store.read({"i": 0})  # used now: kept longest
    stale = store / ".old.tmp-x"
    stale.mkdir()
    os.utime(stale, (0, 0))
    monkeypatch.setenv(layer_store.STORE_GB_ENV, "0.002")  # room for two
    layer_store.write({"i": 3}, {"a": a})
    assert [layer_store.read({"i": i}) is not None for i in range(4)] == [True, False, False, True]
    assert not stale.exists()


def test_the_store_can_be_turned_off(store, fake_model, monkeypatch):
    monkeypatch.setenv(layer_store.STORE_GB_ENV, "0")
    src, captures = fake_model
    assert layer_store.write({"i": 1}, {"a": np.zeros(3)}) is None and layer_store.read({"i": 1}) is None
    src.load()
    forget(src)
    assert src.cached() is None and not store.exists()
    monkeypatch.setenv(layer_store.STORE_GB_ENV, "lots")  # not a number: the default, with a warning
    assert layer_store.limit_bytes() == int(layer_store.DEFAULT_STORE_GB * 1e9)


# ---------------------------------------------------------------------------------------------------------
# gptq-explorer prepare


def _real_model_in(cache: Path) -> None:
    """The converted offline model of the user's cache, linked into a cache folder of the test's own."""
    from gptq_explorer.models.cache_folders import offline_model_ready, smollm2_cache_dir

    if not offline_model_ready():
        pytest.skip("the offline model is not converted (gptq-explorer prepare)")
    real = smollm2_cache_dir()
    (cache / "models").mkdir(parents=True)
    (cache / "models" / real.name).symlink_to(real, target_is_directory=True)


def test_prepare_check_asks_for_the_stored_first_layer(tmp_path, monkeypatch, capsys):
    from gptq_explorer import cli

    _real_model_in(tmp_path)
    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path))
    assert cli.main(["prepare", "--check"]) == 1
    assert "first layer is not stored yet" in capsys.readouterr().out
    monkeypatch.setenv(layer_store.STORE_GB_ENV, "0")  # no store: the converted model is all it needs
    assert cli.main(["prepare", "--check"]) == 0
    assert not (tmp_path / "layers").exists()


@pytest.mark.slow
def test_prepare_stores_the_default_layer(tmp_path, monkeypatch, capsys):
    from gptq_explorer import cli

    _real_model_in(tmp_path)
    monkeypatch.setenv("GPTQ_EXPLORER_CACHE", str(tmp_path))
    assert cli.main(["prepare"]) == 0
    src = ModelSource()
    folder = layer_store.entry_path(src.store_key())
    assert f"in the layer store, {folder}" in capsys.readouterr().out
    entry = layer_store.read(src.store_key())
    assert entry.arrays["W"].shape == (576, 576) and entry.arrays["X_calib"].shape == (16 * 256, 576)
    assert entry.meta["structure"][0] == 30
    assert cli.main(["prepare", "--check"]) == 0
    out = run_python("""
        import sys
        from gptq_explorer.cli import main
        assert main(["prepare", "--check"]) == 0
        assert "torch" not in sys.modules, "prepare --check imported torch" """,
                     GPTQ_EXPLORER_CACHE=str(tmp_path))
    assert out.returncode == 0 and "ready" in out.stdout, out.stderr
    _flip(folder)
    assert cli.main(["prepare", "--check"]) == 1 and not folder.exists()  # damaged: deleted, not ready
