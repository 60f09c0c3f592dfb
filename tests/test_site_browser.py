"""The static Layer Lab (docs/site.md) in headless Chromium, opened from file:// with every other request
aborted: its JavaScript GPTQ gives the NumPy engine's codes on the page's own layer, for a grid of settings;
its state lives in the address; it animates; it reaches nothing outside its folder.

The site is exported from the real offline SmolLM2 (two block-0 layers: quick to capture). Timings (open ->
first frame, a setting -> redraw) go to artifacts/browser/site_timings.json and the output; they are not
asserted (benchmarks/bench_site.py measures them, docs/performance.md has the numbers).
Run alone: `.venv/bin/python -m pytest -m browser tests/test_site_browser.py -s`.
"""

from __future__ import annotations

import base64
import json
import shutil
import warnings

import numpy as np
import pytest
from browser_fixtures import ARTIFACTS, open_site, page_arrays, page_heldout
from browser_helpers import launch_chromium

from gptq_explorer.engine import QuantConfig, gptq_quantize, gptq_steps, rtn_quantize
from gptq_explorer.services.layer_source import SyntheticSource

pytestmark = pytest.mark.browser

SITE_LAYERS = "0:self_attn.q_proj,0:mlp.up_proj"  # the shared `site` fixture exports these
AGREEMENT = 0.999
# bits 2/3/4, groups of 128 and per row, sym on/off, desc_act on/off, static groups, damping
KEYS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent")
GRID = [dict(zip(KEYS, values)) for values in (
    (4, 128, True, False, False, 0.01),
    (3, -1, False, True, False, 0.01),
    (2, 128, True, True, True, 0.01),
    (4, -1, True, True, False, 0.01),
    (3, 128, False, False, True, 0.1),
    (2, -1, False, False, False, 0.001),
    (4, 128, False, True, False, 0.316228),
)]
TIMINGS: dict = {}


@pytest.fixture(scope="module")
def browser(chromium):
    """Headless Chromium as browser_fixtures.py's `browser` gives (on the shared `chromium`, which skips
    without Chromium or Playwright); at the end, this file's timings go to site_timings.json."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p, chromium)
        yield b
        b.close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "site_timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")


def test_page_codes_equal_the_numpy_engine(browser, site):
    page = open_site(browser, site)
    try:
        opened = page.evaluate("() => window.gptqExplorer.timings()")
        TIMINGS["open_to_first_frame_ms"] = opened["open_to_first_frame_ms"]
        # open -> first frame, then -> RTN's curve too (not counted as a change)
        assert 0 < opened["open_to_first_frame_ms"] <= opened["open_to_complete_ms"]
        assert opened["changes"] == []
        results = []
        Xh = page_heldout(page).astype(np.float64)
        assert Xh.shape == (256, 576) and np.isfinite(Xh).all() and np.abs(Xh).max() > 0.1
        for values in GRID:
            page.evaluate("(v) => window.gptqExplorer.set(v)", values)
            state = page.evaluate("() => window.gptqExplorer.state()")
            W, H, codes = page_arrays(page)
            cfg = QuantConfig(**{k: state[k] for k in KEYS})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = gptq_quantize(W.astype(np.float64), H.astype(np.float64), cfg)
            agree = float(np.mean(codes == ref.codes))
            results.append((cfg.label(), f"damp {cfg.damp_percent:g}", agree))
            assert agree >= AGREEMENT, (cfg, agree)
            # the summary: GPTQ's loss, and RTN's numbers (the other worker's Gram matrix) as NumPy has them
            summary = page.evaluate("() => window.gptqExplorer.summary()")
            assert summary["loss_gptq"] == pytest.approx(ref.loss, rel=1e-6)
            D = W.astype(np.float64) - rtn_quantize(W.astype(np.float64), cfg).weight
            H64 = H.astype(np.float64)
            diag = np.where(np.diag(H64) == 0, 1.0, np.diag(H64))  # dead inputs count 1, as in the engine
            Hd = H64 + cfg.damp_percent * np.mean(diag) * np.eye(len(H))
            assert summary["weight_mse_rtn"] == pytest.approx(np.mean(D ** 2), rel=1e-9)
            assert summary["loss_rtn"] == pytest.approx(0.5 * np.sum((D @ Hd) * D), rel=1e-6)
            # the held-out output errors, on the page's own held-out inputs (exact where the codes agree)
            assert summary["heldout_mse_rtn"] == pytest.approx(np.mean((Xh @ D.T) ** 2), rel=1e-9)
            Dg = W.astype(np.float64) - ref.weight
            held_g = np.mean((Xh @ Dg.T) ** 2)
            assert summary["heldout_mse_gptq"] == pytest.approx(held_g, rel=1e-6 if agree == 1 else 1e-2)
        summary_text = page.inner_text("#summary")
        assert "held-out output MSE (256 tokens)" in summary_text
        assert "held-out" in summary_text.split("RTN / GPTQ")[1]  # the ratio line names it too
        TIMINGS["agreement"] = results
        TIMINGS["changes_576"] = changes = page.evaluate("() => window.gptqExplorer.timings()")["changes"]
        # each change (the first setting is the page's default: none): its first frame, then RTN's curve
        # (the same draw when the Gram matrix was at hand)
        assert len(changes) == len(GRID) - 1 and all(0 < c["ms"] <= c["full_ms"] for c in changes)
        assert all(c["stages"]["loop_ms"] > 0 for c in changes)
        print("\n".join(f"[site] {label} {damp}: {agree:.6f}" for label, damp, agree in results))
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_state_in_the_address_and_the_animation(browser, site):
    page = open_site(browser, site, "#bits=3&group_size=-1&desc_act=1&col=100&fps=30&foo=1&corpus=code")
    try:
        state = page.evaluate("() => window.gptqExplorer.state()")
        assert (state["bits"], state["group_size"], state["desc_act"], state["col"]) == (3, -1, True, 100)
        notes = page.inner_text("#messages")
        assert "unknown key foo" in notes and "corpus" in notes
        drawn = page.evaluate("() => document.querySelector('#figure').gptqState")
        assert drawn["k"] == 100 and drawn["n"] == 576 and "desc_act" in drawn["diag_title"]
        assert "Step 101 of 576" in page.inner_text("#explain")
        assert "RTN" in page.inner_text("#summary")
        # a control changes the address (the app's link keys)
        page.select_option("#bits", "4")
        page.evaluate("() => window.gptqExplorer.ready()")
        page.wait_for_function("() => location.hash.includes('bits=4')", timeout=5_000)
        hash_ = page.evaluate("() => location.hash")
        for key in ("model=", "block=0", "sublayer=self_attn.q_proj", "group_size=-1", "desc_act=true",
                    "col="):
            assert key in hash_
        # play: the canvas's own clock steps through the frames the worker sends ahead
        page.click("#play")
        page.wait_for_function("() => document.querySelector('#figure').gptqState.k >= 110", timeout=20_000)
        page.click("#play")
        # another layer: 1536 x 576, computed and drawn
        page.select_option("#layer", "1")
        page.evaluate("() => window.gptqExplorer.ready()")
        drawn = page.evaluate("() => document.querySelector('#figure').gptqState")
        assert drawn["n"] == 576 and page.evaluate("() => window.gptqExplorer.layer().d_out") == 1536
        # grids in a row, none waited for: RTN's Gram matrices are made one at a time, the last grid's after
        # the one in progress (the first frame waits for it), and RTN's numbers are that grid's
        page.evaluate("() => { const x = window.gptqExplorer; x.set({bits: 3}); x.set({bits: 2}); }")
        page.evaluate("() => window.gptqExplorer.set({bits: 5, sym: false})")
        state = page.evaluate("() => window.gptqExplorer.state()")
        W = page_arrays(page)[0].astype(np.float64)
        cfg = QuantConfig(**{k: state[k] for k in KEYS})
        summary = page.evaluate("() => window.gptqExplorer.summary()")
        assert (cfg.bits, cfg.sym) == (5, False)
        D = W - rtn_quantize(W, cfg).weight
        assert summary["weight_mse_rtn"] == pytest.approx(np.mean(D ** 2), rel=1e-9)
        TIMINGS["changes_address_and_layer"] = page.evaluate("() => window.gptqExplorer.timings()")["changes"]
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_a_layer_that_needs_more_damping(browser, site, tmp_path):
    """The page on a layer whose H + 1% damping is not positive definite (q_proj's H less 3% of its mean
    diagonal): the GPTQ worker raises the damping to 10%, and the page has RTN's numbers made again with it
    (the RTN worker weighs RTN's errors with the damping the run used) before it draws."""
    from gptq_explorer.services.site_export import packed_upper, read_layer

    folder = tmp_path / "site"
    shutil.copytree(site, folder)
    entry = json.loads((folder / "manifest.json").read_text())["layers"][0]
    W, H = read_layer(folder, entry)
    H = (H - np.float32(0.03 * np.mean(np.diag(H))) * np.eye(len(H), dtype=np.float32)).astype(np.float32)
    text = (folder / entry["file"]).read_text(encoding="ascii")
    payload = {"W": base64.b64encode(W.astype("<f4").tobytes()).decode(),
               "H": base64.b64encode(packed_upper(H).tobytes()).decode()}
    (folder / entry["file"]).write_text(text[:text.rindex("] = ") + 4] + json.dumps(payload) + ";\n")
    page = open_site(browser, folder, "#col=200")
    try:
        W, H, codes = page_arrays(page)
        cfg = QuantConfig(**{k: page.evaluate("() => window.gptqExplorer.state()")[k] for k in KEYS})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = gptq_quantize(W.astype(np.float64), H.astype(np.float64), cfg)
        assert cfg.damp_percent == 0.01 and ref.damp_percent_used == pytest.approx(0.1)
        assert "quantized with damp_percent=0.100" in page.inner_text("#messages")
        summary = page.evaluate("() => window.gptqExplorer.summary()")
        assert summary["damp_percent_used"] == pytest.approx(0.1)
        assert np.mean(codes == ref.codes) >= AGREEMENT
        assert summary["loss_gptq"] == pytest.approx(ref.loss, rel=1e-6)
        D = W.astype(np.float64) - rtn_quantize(W.astype(np.float64), cfg).weight
        H64 = H.astype(np.float64)
        Hd = H64 + 0.1 * np.mean(np.diag(H64)) * np.eye(len(H))
        assert summary["loss_rtn"] == pytest.approx(0.5 * np.sum((D @ Hd) * D), rel=1e-6)
        drawn = page.evaluate("() => document.querySelector('#figure').gptqState")
        assert drawn["k"] == 200 and np.isfinite(drawn["rtn_y"][200])
        assert page.outside == [] and page.errors == []
    finally:
        page.close()


def test_worker_dead_inputs_and_damping_retry(browser, site):
    """The worker's engine on a synthetic layer with a dead input and an H that needs the x10 damping
    retry (not in the exported layers): the same codes and damping as the NumPy engine."""
    data = SyntheticSource(d_out=48, d_in=200, n_calib=256, n_heldout=8, seed=2, rank=12).load()
    W = data.W.astype(np.float32)
    H = np.array(data.H, dtype=np.float64)
    H[5, :] = H[:, 5] = 0.0  # input 5 never fired
    H -= 0.03 * np.mean(np.diag(H)) * np.eye(200)  # 1% damping is not enough; 10% is
    H[5, 5] = 0.0
    H = H.astype(np.float32)
    page = open_site(browser, site)
    k, crop = 70, {"rows": 8, "cols": 16, "row0": 3}
    try:
        for cfg in (QuantConfig(bits=3, group_size=64, desc_act=True),
                    QuantConfig(bits=4, group_size=-1, sym=False),
                    QuantConfig(bits=2, group_size=64, static_groups=True, desc_act=True)):
            out = page.evaluate("""([W, H, d_out, d_in, cfg, k, crop]) => {
              const eng = new Function(
                window.GPTQ_WORKER_SOURCE + "; return {state, runMessage, frameOf};")();
              eng.state.layer = {W: Float64Array.from(W), H: Float64Array.from(H), d_out, d_in};
              const r = eng.runMessage({id: 1, cfg}), f = eng.frameOf(k, crop);
              return {codes: Array.from(r.codes), damp: r.summary.damp_percent_used, warnings: r.warnings,
                      updated: Array.from(f.z.updated), compensation: Array.from(f.z.compensation),
                      meta: f.meta};
            }""", [W.ravel().tolist(), H.ravel().tolist(), 48, 200, {key: getattr(cfg, key) for key in KEYS},
                   k, crop])
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                ref = gptq_quantize(W.astype(np.float64), H.astype(np.float64), cfg)
            codes = np.array(out["codes"]).reshape(48, 200)
            assert np.mean(codes == ref.codes) >= AGREEMENT
            assert out["damp"] == pytest.approx(ref.damp_percent_used) == pytest.approx(0.1)
            assert np.all(codes[:, 5] == ref.codes[:, 5])
            assert any("dead input" in w for w in out["warnings"])
            # a frame's pending weights and update, from columns and a row of U the worker solves for
            # (it never forms U): the app's Run.pending and explain_html's largest update
            stepper = gptq_steps(W.astype(np.float64), H.astype(np.float64), cfg)
            Err = np.stack([s.error for s in stepper], axis=1)
            U, W0 = stepper.prepared.U, stepper.prepared.W
            m = out["meta"]
            rows, cols = slice(m["r0"], m["r1"]), np.arange(m["c0"], m["c1"])
            later = cols > k
            pending = W0[rows][:, cols] - Err[rows, : k + 1] @ U[: k + 1, cols]
            updated = np.array(out["updated"], dtype=float).reshape(8, 16)
            np.testing.assert_allclose(updated[:, later], pending[:, later], rtol=1e-5, atol=1e-6)
            compensation = np.array(out["compensation"], dtype=float).reshape(8, 16)
            np.testing.assert_allclose(compensation[:, later], -np.outer(Err[rows, k], U[k, cols[later]]),
                                       rtol=1e-5, atol=1e-7)
            assert m["d"] == pytest.approx(U[k, k], rel=1e-9)
            upd_max = np.abs(Err[:, k]).max() * np.abs(U[k, k + 1:]).max()
            assert m["upd_max"] == pytest.approx(upd_max, rel=1e-6)
    finally:
        page.close()
