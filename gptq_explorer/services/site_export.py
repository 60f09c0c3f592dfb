"""The static Layer Lab (docs/site.md): a folder that animates GPTQ on real layers with no server at all.

`export_site(folder)` captures a handful of layers with the Layer Lab's own capture code (ModelSource in
layer_source.py, the default calibration), and writes them next to the page (gptq_explorer/site/: the
page, its script and styles, and the GPTQ + RTN engine in JavaScript that runs in Web Workers) and the
Layer Lab's canvas view (ui/layer_canvas.js, turned into a classic script).

Why every file is a classic <script>: a page opened from file:// may not fetch() local files, import ES
modules or start a Worker from a file (Chromium refuses all three). So the data are base64 strings in .js
files (one per layer, loaded when the layer is picked), the worker starts from a Blob of its own source,
and the canvas module's `export`s become a global. The same folder works unchanged on any static host.

Data: W as float32, little-endian, row-major (d_out, d_in); H (symmetric) as float32, little-endian, its
upper triangle packed row by row (half the bytes; the page mirrors it); the held-out inputs X_heldout
(tokens, d_in) as float16, little-endian, row-major: the first HELDOUT_TOKENS of the app's held-out tokens,
for the held-out output error (the app's H_heldout of 1,024 tokens would take a 1536-wide layer's file over
the size budget; these are a quarter of its bytes). `manifest.json` (and the same in `manifest.js`, for
file://) names each layer, its shapes, its encoding, its SHA-256 and where it came from.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .. import settings
from ..models.catalog import DEFAULT_MODEL
from .layer_source import LayerData, ModelSource

PACKAGE = Path(__file__).resolve().parents[1]
SITE_SOURCES = PACKAGE / "site"
CANVAS_ESM = PACKAGE / "ui" / "layer_canvas.js"  # read as text: services never import the front-ends
CANVAS_IMPORT = re.compile(r'^import \{[^}]*\} from "\./(layer_canvas_\w+\.js)";\n', re.M)
PAGE_FILES = ("index.html", "site_text.js", "site.js", "site.css")
# the workers' code: the engine, then the workers' side (the page starts them from both files' text)
WORKER_FILES = ("gptq_engine.js", "gptq_worker.js")
# One attention and one MLP layer, early and late (SmolLM2 has 30 blocks); down_proj is the 1536-wide one
DEFAULT_LAYERS: tuple[tuple[int, str], ...] = (
    (0, "self_attn.q_proj"), (0, "mlp.up_proj"), (29, "self_attn.q_proj"), (29, "mlp.down_proj"))
MAX_SITE_BYTES = 25 * 10**6
# Held-out tokens per layer (a prefix of the capture's X_heldout), stored as float16
HELDOUT_TOKENS = 256
# What the page's controls offer, from the knobs (settings.py) and the Layer Lab's view rules
SITE_KNOBS = ("bits", "group_size", "sym", "damp_percent", "desc_act", "static_groups")
VIEW = {"col": 0, "rows": 24, "cols": 32, "row0": 0, "fps": 15}
VIEW_RANGES = {"rows": (4, 96), "cols": (4, 128), "row0": (0, None), "col": (0, None), "fps": (1, 30)}


def parse_layers(text: str) -> tuple[tuple[int, str], ...]:
    """'0:self_attn.q_proj,29:mlp.down_proj' -> ((0, 'self_attn.q_proj'), (29, 'mlp.down_proj'))."""
    out = []
    for item in text.split(","):
        block, sep, sublayer = item.strip().partition(":")
        if not sep or not block.strip().isdigit() or not sublayer.strip():
            raise ValueError(f"--layers: {item.strip()!r} is not BLOCK:SUBLAYER (e.g. 0:self_attn.q_proj)")
        out.append((int(block), sublayer.strip()))
    if len(set(out)) != len(out):
        raise ValueError(f"--layers names a layer twice: {text!r}")
    return tuple(out)


def site_arrays(data: LayerData) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) exactly as the page gets them: float32, H made exactly symmetric from its upper triangle."""
    W = np.ascontiguousarray(data.W, dtype=np.float32)
    H = np.asarray(data.H, dtype=np.float32)
    H = np.triu(H) + np.triu(H, 1).T
    return W, H


def packed_upper(H: np.ndarray) -> np.ndarray:
    return H[np.triu_indices(H.shape[0])].astype("<f4")


def unpack_upper(packed: np.ndarray, n: int) -> np.ndarray:
    H = np.zeros((n, n), dtype=np.float32)
    H[np.triu_indices(n)] = packed
    return H + np.triu(H, 1).T


def canvas_module() -> str:
    """layer_canvas.js as one module: each `import {...} from "./layer_canvas_*.js"` replaced by that file
    (beside it), its exports made local names, as the app's loader (ui/layer_figure.py) does."""
    esm = CANVAS_ESM.read_text(encoding="utf-8")
    return CANVAS_IMPORT.sub(lambda m: re.sub(r"^export ", "", (CANVAS_ESM.parent / m.group(1)).read_text(
        encoding="utf-8"), flags=re.M), esm)


def canvas_script(esm: str) -> str:
    """The Layer Lab's canvas module (canvas_module(): one text) as a classic script (file:// pages cannot
    import modules): its exports become `window.gptqLayerCanvas = {render, clockStep}`; the code is the app's,
    unchanged."""
    body = esm.replace("export default {", "const layerCanvasView = {", 1)
    body = re.sub(r"^export (const|function) ", r"\1 ", body, flags=re.M)
    if re.search(r"^\s*(export|import)\b", body, flags=re.M):
        raise ValueError("layer_canvas.js has an import or export the static site does not know how to turn "
                         "into a classic script; update services/site_export.canvas_script")
    return ("// The Layer Lab's canvas view (gptq_explorer/ui/layer_canvas.js) as a classic script, written\n"
            "// by `gptq-explorer export-site`: a page opened from file:// cannot import ES modules.\n"
            '(function () {\n"use strict";\n' + body
            + "\nwindow.gptqLayerCanvas = { render: layerCanvasView.render, clockStep };\n})();\n")


def _slug(block: int, sublayer: str) -> str:
    return f"block{block}-{sublayer.replace('.', '-')}"


def _controls() -> dict:
    """The knobs the page offers, from their one declaration (settings.py), with the view's defaults."""
    out = {}
    for name in SITE_KNOBS:
        k = settings.KNOBS[name]
        item = {"default": k.default, "label": k.control_label, "help": k.help}
        if k.offered is not None:
            item["offered"] = list(k.offered)
            item["labels"] = {str(v): lab for v, lab in k.option_labels}
        elif k.offered_range is not None:
            item["range"] = list(k.offered_range)
        elif k.type is int:
            item["range"] = [k.low, k.high]
        out[name] = item
    return {"knobs": out, "view": VIEW, "view_ranges": VIEW_RANGES}


def _b64(a: np.ndarray, dtype: str = "float32") -> str:
    return base64.b64encode(_bytes(a, dtype)).decode("ascii")


def _entry(raw: np.ndarray, shape: list, layout: str, dtype: str = "float32") -> dict:
    b = _bytes(raw, dtype)
    return {"shape": shape, "dtype": dtype, "byteorder": "little", "layout": layout, "encoding": "base64",
            "bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}


def _bytes(raw: np.ndarray, dtype: str = "float32") -> bytes:
    return np.ascontiguousarray(raw, dtype="<f4" if dtype == "float32" else "<f2").tobytes()


def heldout_inputs(data: LayerData, tokens: int = HELDOUT_TOKENS) -> np.ndarray:
    """The first `tokens` held-out inputs (tokens, d_in), float16, as the page gets them. Raises ValueError
    for an input float16 cannot hold (|x| > 65504)."""
    X = np.asarray(data.X_heldout[:tokens])
    big = float(np.abs(X).max()) if X.size else 0.0
    if not np.isfinite(big) or big > float(np.finfo(np.float16).max):
        raise ValueError(f"{data.name}: a held-out input of magnitude {big:.4g} does not fit the site's "
                         "float16 encoding (at most 65504); export other layers")
    return X.astype(np.float16)


def export_site(folder, *, model: str = DEFAULT_MODEL, layers: Iterable[tuple[int, str]] = DEFAULT_LAYERS,
                corpus: str | None = None, nsamples: int | None = None, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> dict:
    """Write the static Layer Lab into `folder` (created; it must be empty unless overwrite). Returns the
    manifest. Raises ValueError for a non-empty folder or a site over MAX_SITE_BYTES."""
    progress = progress or (lambda message: None)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if not overwrite:
            raise ValueError(f"{folder} exists and is not empty; choose a new folder or add --overwrite")
        if folder.is_dir():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    layers = tuple(layers)
    if not layers:
        raise ValueError("no layers to export: give at least one BLOCK:SUBLAYER")
    corpus = corpus or settings.KNOBS["corpus"].default
    nsamples = nsamples or settings.KNOBS["nsamples"].default
    (folder / "data").mkdir(parents=True)

    entries = []
    for i, (block, sublayer) in enumerate(layers):
        progress(f"[{i + 1}/{len(layers)}] capturing {model} block {block} {sublayer}")
        src = ModelSource(model=model, block=block, sublayer=sublayer, corpus=corpus, nsamples=nsamples)
        data = src.load()
        W, H = site_arrays(data)
        d_out, d_in = W.shape
        slug = _slug(block, sublayer)
        path = f"data/{slug}.js"
        Xh = heldout_inputs(data)
        payload = {"W": _b64(W), "H": _b64(packed_upper(H)), "Xh": _b64(Xh, "float16")}
        (folder / path).write_text(
            "// One layer of the static Layer Lab (manifest.json says what it is); gptq-explorer wrote it.\n"
            f"(window.GPTQ_SITE_DATA = window.GPTQ_SITE_DATA || {{}})[{json.dumps(slug)}] = "
            f"{json.dumps(payload)};\n", encoding="ascii")
        entries.append({
            "key": slug, "model": model, "block": block, "sublayer": sublayer, "name": data.name,
            "d_out": int(d_out), "d_in": int(d_in), "file": path, "description": data.description,
            "calibration": {"corpus": src.corpus, "nsamples": src.nsamples, "seqlen": src.seqlen,
                            "seed": src.seed, "tokens": int(data.X_calib.shape[0])},
            "W": _entry(W, [int(d_out), int(d_in)], "row-major"),
            "H": _entry(packed_upper(H), [int(d_in), int(d_in)],
                        "upper triangle packed row by row (H is symmetric: H[j, i] = H[i, j])"),
            "X_heldout": _entry(Xh, [int(Xh.shape[0]), int(d_in)], "row-major: one held-out token per row",
                                "float16"),
            "heldout": {"tokens": int(Xh.shape[0]), "of": int(data.X_heldout.shape[0]),
                        "what": f"the first {Xh.shape[0]} of the Layer Lab's {data.X_heldout.shape[0]} "
                                "held-out tokens (the corpus' evaluation part), rounded to float16"},
        })

    manifest = {
        "format": 1, "title": "GPTQ Explorer: the Layer Lab, static",
        "provenance": ("Captured by gptq-explorer export-site with the Layer Lab's capture code "
                       "(gptq_explorer/services/layer_source.py: a forward hook on the linear, H = 2/n X^T X "
                       "over the calibration tokens)."),
        "layers": entries, "controls": _controls(),
    }
    text = json.dumps(manifest, indent=1)
    (folder / "manifest.json").write_text(text + "\n", encoding="utf-8")
    (folder / "manifest.js").write_text(f"window.GPTQ_SITE_MANIFEST = {text};\n", encoding="utf-8")
    write_page(folder)
    size = site_bytes(folder)
    if size > MAX_SITE_BYTES:
        raise ValueError(f"the site is {size / 1e6:.1f} MB, over the {MAX_SITE_BYTES / 1e6:.0f} MB budget: "
                         "export fewer or smaller layers")
    progress(f"wrote {folder} ({size / 1e6:.1f} MB, {len(entries)} layers)")
    return json.loads(text)  # as the page reads it (lists, not tuples)


def write_page(folder) -> None:
    """The page's own files into `folder` (everything but the manifest and the data): the page, the workers'
    code (readable, and as one string for the Blob the page starts them from) and the canvas view."""
    folder = Path(folder)
    for name in PAGE_FILES:
        shutil.copyfile(SITE_SOURCES / name, folder / name)
    sources = [(SITE_SOURCES / name).read_text(encoding="utf-8") for name in WORKER_FILES]
    for name, text in zip(WORKER_FILES, sources):
        (folder / name).write_text(text, encoding="utf-8")  # readable beside the page
    (folder / "worker_source.js").write_text(
        f"// {' + '.join(WORKER_FILES)} as one string: the page starts its Workers from a Blob (file://\n"
        "// forbids a Worker from a file). Written by gptq-explorer export-site.\n"
        f"window.GPTQ_WORKER_SOURCE = {json.dumps(chr(10).join(sources))};\n",
        encoding="utf-8")
    (folder / "layer_canvas.js").write_text(canvas_script(canvas_module()), encoding="utf-8")


def site_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _payload(folder, entry: dict) -> dict:
    text = (Path(folder) / entry["file"]).read_text(encoding="ascii")
    return json.loads(text[text.rindex("] = ") + 4:].rstrip().rstrip(";"))


def read_layer(folder, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(W, H) float32 back from an exported layer file, as the page decodes it."""
    payload = _payload(folder, entry)
    W = np.frombuffer(base64.b64decode(payload["W"]), dtype="<f4").reshape(entry["W"]["shape"])
    packed = np.frombuffer(base64.b64decode(payload["H"]), dtype="<f4")
    return W, unpack_upper(packed, entry["d_in"])


def read_heldout(folder, entry: dict) -> np.ndarray:
    """The held-out inputs (tokens, d_in) back from an exported layer file: float16."""
    raw = base64.b64decode(_payload(folder, entry)["Xh"])
    return np.frombuffer(raw, dtype="<f2").reshape(entry["X_heldout"]["shape"])
