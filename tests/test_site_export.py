"""`gptq-explorer export-site` (services/site_export.py): the static Layer Lab's files, its size budget, its
manifest, and its data, which must decode to exactly the arrays the capture code gives (a tiny random-init
LLaMA here; tests/test_site_browser.py opens a site of the real offline model)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from gptq_explorer.cli import main
from gptq_explorer.services import site_export
from gptq_explorer.services.layer_source import ModelSource
from gptq_explorer.services.site_export import (
    DEFAULT_LAYERS,
    HELDOUT_TOKENS,
    MAX_SITE_BYTES,
    canvas_module,
    canvas_script,
    export_site,
    heldout_inputs,
    parse_layers,
    read_heldout,
    read_layer,
    site_arrays,
    site_bytes,
)

LAYERS = ((0, "self_attn.q_proj"), (1, "mlp.down_proj"))
PAGE = ("index.html", "site_text.js", "site.js", "site.css", "gptq_engine.js", "gptq_worker.js",
        "worker_source.js", "layer_canvas.js", "manifest.js", "manifest.json")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory, tiny_dirs):
    folder = tmp_path_factory.mktemp("site") / "out"
    model = str(tiny_dirs["llama"])
    return folder, model, export_site(folder, model=model, layers=LAYERS, nsamples=4)


def test_the_site_has_its_files_and_fits_the_budget(tiny_site):
    folder, _, manifest = tiny_site
    for name in PAGE:
        assert (folder / name).is_file(), name
    for entry in manifest["layers"]:
        assert (folder / entry["file"]).is_file()
    assert site_bytes(folder) <= MAX_SITE_BYTES
    # nothing in the page reaches outside its folder
    scripts = ("index.html", "site_text.js", "site.js", "gptq_engine.js", "gptq_worker.js", "layer_canvas.js")
    for name in scripts:
        text = (folder / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://|\bfetch\(\w|XMLHttpRequest|import\(", text), name


def test_the_manifest_names_each_layer_and_where_it_came_from(tiny_site):
    folder, model, manifest = tiny_site
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    js = (folder / "manifest.js").read_text()
    assert json.loads(js[js.index("= ") + 2:].rstrip().rstrip(";")) == manifest
    assert [(e["block"], e["sublayer"]) for e in manifest["layers"]] == list(LAYERS)
    q, down = manifest["layers"]
    assert (q["d_out"], q["d_in"]) == (64, 64) and (down["d_out"], down["d_in"]) == (64, 96)
    assert down["W"]["shape"] == [64, 96] and down["H"]["shape"] == [96, 96]
    assert down["H"]["bytes"] == 4 * 96 * 97 // 2  # the upper triangle
    assert q["model"] == model and q["calibration"]["nsamples"] == 4
    assert "layer_source" in manifest["provenance"]
    knobs = manifest["controls"]["knobs"]
    assert knobs["group_size"]["offered"] == [-1, 32, 64, 128, 256] and knobs["bits"]["range"] == [2, 8]


def test_the_data_round_trip_to_the_captured_arrays(tiny_site):
    folder, model, manifest = tiny_site
    for entry, (block, sublayer) in zip(manifest["layers"], LAYERS):
        data = ModelSource(model=model, block=block, sublayer=sublayer, nsamples=4).load()
        W_ref, H_ref = site_arrays(data)
        W, H = read_layer(folder, entry)
        assert W.dtype == np.float32 and H.dtype == np.float32
        np.testing.assert_array_equal(W, W_ref)
        np.testing.assert_array_equal(H, H_ref)
        np.testing.assert_array_equal(W, data.W.astype(np.float32))  # the capture's W, exactly
        np.testing.assert_allclose(H, data.H, rtol=1e-6, atol=1e-6 * np.abs(data.H).max())
        # the held-out inputs: the capture's first HELDOUT_TOKENS, rounded to float16, as the manifest says
        Xh = read_heldout(folder, entry)
        tokens = min(HELDOUT_TOKENS, len(data.X_heldout))
        assert Xh.dtype == np.float16 and Xh.shape == (tokens, data.W.shape[1])
        assert list(Xh.shape) == entry["X_heldout"]["shape"]
        np.testing.assert_array_equal(Xh, data.X_heldout[:tokens].astype(np.float16))
        np.testing.assert_allclose(Xh, data.X_heldout[:tokens], rtol=1e-3, atol=1e-4)
        assert entry["X_heldout"]["dtype"] == "float16" and entry["X_heldout"]["bytes"] == Xh.nbytes
        assert entry["heldout"]["tokens"] == tokens and entry["heldout"]["of"] == len(data.X_heldout)


def test_held_out_inputs_float16_cannot_hold_are_refused():
    from gptq_explorer.services.layer_source import LayerData

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    ok = LayerData(rng.normal(size=(4, 8)), X, X, "layer", "")
    assert heldout_inputs(ok).shape == (HELDOUT_TOKENS, 8)
    big = LayerData(rng.normal(size=(4, 8)), X, X * 1e5, "layer", "")
    with pytest.raises(ValueError, match="float16"):
        heldout_inputs(big)


def test_the_canvas_becomes_a_classic_script():
    esm = canvas_module()
    script = canvas_script(esm)
    assert "export " not in "\n".join(line for line in script.splitlines() if line.startswith("export"))
    assert "window.gptqLayerCanvas" in script
    with pytest.raises(ValueError, match="import or export"):
        canvas_script("import x from 'y';\n" + esm)


def test_the_canvas_is_one_module_as_the_app_loads_it():
    """layer_canvas.js imports its picture (layer_canvas_paint.js): the site and the app put that file in
    place of the import, the same text, with the app's exports only."""
    from gptq_explorer.ui.layer_figure import ESM

    esm = canvas_module()
    assert esm == ESM
    assert 'from "./layer_canvas_paint.js"' in site_export.CANVAS_ESM.read_text(encoding="utf-8")
    assert not re.search(r"^\s*import\b", esm, flags=re.M)
    exports = re.findall(r"^export (?:const|function|default) ?(\w*)", esm, flags=re.M)
    assert sorted(exports) == ["", "CATCH_UP_MS", "HOLD_MS", "clockStep"]
    assert "function paint(ctx, scene, frame, hover)" in esm


def test_the_default_layers_fit_the_budget():
    """SmolLM2's four default layers (576 wide, MLP 1536: W, H's upper triangle, the held-out inputs) in
    base64, with the page: under 25 MB."""
    shapes = {"self_attn.q_proj": (576, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    raw = sum(4 * (o * i + i * (i + 1) // 2) + 2 * HELDOUT_TOKENS * i
              for o, i in (shapes[s] for _, s in DEFAULT_LAYERS))
    sources = (*site_export.PAGE_FILES, *site_export.WORKER_FILES)
    page = sum((site_export.SITE_SOURCES / n).stat().st_size for n in sources)
    assert 4 * raw / 3 + 2 * page + 200_000 < MAX_SITE_BYTES
    assert {b for b, _ in DEFAULT_LAYERS} == {0, 29}
    assert {"self_attn.q_proj", "mlp.down_proj"} <= {s for _, s in DEFAULT_LAYERS}


def test_parse_layers_and_refusals(tmp_path):
    expected = ((0, "self_attn.q_proj"), (29, "mlp.down_proj"))
    assert parse_layers("0:self_attn.q_proj, 29:mlp.down_proj") == expected
    for bad in ("q_proj", "x:mlp.up_proj", "0:a,0:a"):
        with pytest.raises(ValueError):
            parse_layers(bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_site(tmp_path / "full", layers=LAYERS)


def test_cli_export_site(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "site"
    rc = main(["export-site", str(out), "--model", str(tiny_dirs["llama"]), "--layers", "1:self_attn.o_proj"])
    assert rc == 0
    assert "index.html" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["block"], e["sublayer"]) for e in manifest["layers"]] == [(1, "self_attn.o_proj")]
    assert main(["export-site", str(out), "--model", str(tiny_dirs["llama"])]) == 2  # not empty
    assert main(["export-site", str(tmp_path / "b"), "--layers", "nonsense"]) == 2
