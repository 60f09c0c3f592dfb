"""gptq_explorer.lessons.whole_model (lesson 7): sensitive layers, mixed precision and the shipped runs, on
tiny random LLaMAs and written reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptq_explorer import QuantConfig, rtn_quantize
from gptq_explorer.checkpoint.storage import storage_of
from gptq_explorer.lessons import whole_model as L


@pytest.fixture(scope="module")
def calib(tiny_lm):
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def test_mixed_precision_from_the_report(tiny_lm, calib):
    from gptq_explorer.models import get_weight
    from gptq_explorer.models.quantize import quantize_model

    cfg = QuantConfig(group_size=32)
    qm = quantize_model(tiny_lm, calib, cfg, method="rtn", inplace=False, progress=False,
                        hessian_condition=False)
    errs = {r.name: r.output_rel_error for r in qm.layers}
    top = L.sensitive_layers(qm.layers, 3)
    assert top == sorted(errs, key=lambda n: -errs[n])[:3]
    as_dicts = [r.__dict__ for r in qm.layers]
    assert L.sensitive_layers(as_dicts, 3) == top  # a JSON report's rows work the same
    assert L.sensitive_layers(qm.layers, 3, key="output_rel_norm") == top  # sqrt keeps the order
    r0 = qm.layers[0]
    assert L._get(r0, "output_rel_norm") == pytest.approx(r0.output_rel_error**0.5)
    rtn_only = quantize_model(tiny_lm, None, cfg, method="rtn", inplace=False, progress=False)
    with pytest.raises(ValueError, match="pass calib_ids"):
        L.sensitive_layers(rtn_only.layers, 3)

    ov = L.overrides_for(top, bits=8)
    assert ov == {n: {"bits": 8} for n in top}
    with pytest.raises(ValueError, match="say what"):
        L.overrides_for(top)
    mixed = quantize_model(tiny_lm, None, cfg, method="rtn", inplace=False, progress=False, overrides=ov)
    assert {r.name for r in mixed.layers if r.bits == 8} == set(top)
    for name in top:  # RTN is per layer: the 8-bit layers are RTN-8 of the original weights
        W = get_weight(tiny_lm.model.get_submodule(name)).detach().float()
        Q8 = rtn_quantize(W.clone(), cfg.replace(bits=8)).weight
        assert torch.allclose(get_weight(mixed.model.get_submodule(name)).float(), torch.as_tensor(Q8))
    base, mix = storage_of(rtn_only), storage_of(mixed)
    extra = sum(4 * r.shape[0] * r.shape[1] + 4 * r.shape[0] * (r.shape[1] // 32) for r in mixed.layers
                if r.bits == 8)
    assert mix.total_bits - base.total_bits == extra and mix.bits_per_weight > base.bits_per_weight

    rows = L.report_rows(qm.layers)
    assert len(rows) == 7 and all(r["min"] <= r["output_rel_norm (median)"] <= r["max"] for r in rows)
    quarter = [r | {"output_rel_error": r["output_rel_error"] / 4} for r in as_dicts]
    cmp = L.report_comparison(qm.layers, quarter)
    assert len(cmp) == 7 and all(r["GPTQ / RTN"] == pytest.approx(0.5) for r in cmp)  # sqrt(1/4)
    with pytest.raises(ValueError, match="different layer types"):
        L.report_comparison(qm.layers, as_dicts[:3])
    fig = L.fig_layer_report(qm.layers, highlight=top)
    assert len(fig.data) == 8 and len(fig.data[-1].x) == 3
    assert L.sublayer("model.layers.1.self_attn.v_proj") == "self_attn.v_proj"
    assert L.ppl_gap_closed(10.0, 20.0, 12.0) == pytest.approx(0.8)
    ids = torch.arange(64) % 256
    assert L.eval_ppl(qm.model, ids, 32) > 1


def test_mixed_precision_runs_measure_bits_and_ppl(tiny_lm):
    from gptq_explorer.models.quantize import quantize_model

    cfg = QuantConfig(group_size=32)
    ids = torch.arange(64) % 256
    choices = {"uniform": {}, "last block": {"blocks.-1.*": {"bits": 8}}}
    runs = L.mixed_precision_runs(tiny_lm, cfg, choices, ids, 32)
    assert [r.label for r in runs] == ["uniform", "last block"] and [r.layers_8bit for r in runs] == [0, 7]
    direct = quantize_model(tiny_lm, None, cfg, method="rtn", inplace=False, progress=False,
                            overrides=choices["last block"])
    assert runs[1].bits_per_weight == storage_of(direct).bits_per_weight > runs[0].bits_per_weight
    assert runs[1].total_bits == storage_of(direct).total_bits
    assert runs[1].weights == sum(r.shape[0] * r.shape[1] for r in direct.layers) == 2 * 30720
    again = L.mixed_run("again", direct, runs[1].ppl, base_bits=4)
    assert (again.layers_8bit, again.total_bits) == (7, runs[1].total_bits)
    assert again.overrides == choices["last block"]
    assert runs[1].ppl == pytest.approx(L.eval_ppl(direct.model, ids, 32), rel=1e-6)
    fp = L.eval_ppl(tiny_lm.model, ids, 32)
    rows = L.mixed_rows(runs, fp, runs[0])
    assert rows[0]["extra bits per weight"] == 0 and np.isnan(rows[0]["removed per 0.01 extra bits"])
    closed = (runs[0].ppl - runs[1].ppl) / (runs[0].ppl - fp)
    assert rows[1]["share of the gap removed"] == pytest.approx(closed)


def test_shipped_comparison_reads_results(tmp_path, monkeypatch):
    import json

    from gptq_explorer.services.results import run_id

    monkeypatch.setenv("GPTQ_EXPLORER_RESULTS", str(tmp_path))
    empty = L.shipped_comparison("m")
    assert len(empty["missing"]) == 9 and empty["rows"] == [] and "bench_models.py" in empty["message"]
    (tmp_path / "m").mkdir()
    ppl = {"fp": 10.0, "rtn-w4-g128-sym": 14.0, "gptq-w4-g128-sym": 12.0}
    for rid, p in ppl.items():
        method = rid.split("-")[0]
        calib = {"corpus": "prose", "nsamples": 128, "seqlen": 512} if method == "gptq" else None
        report = {"method": method, "config": QuantConfig().to_dict(), "overrides": {}, "calibration": calib,
                  "evaluation": {"tokens": 65536}, "perplexity": {"prose": p, "code": p / 2},
                  "timings": {"quantize": 1.5} if method != "fp" else {}, "created": "2026-11-27T00:00:00"}
        assert rid == (run_id(method) if method != "fp" else "fp")
        (tmp_path / "m" / f"{rid}.json").write_text(json.dumps(report))
    got = L.shipped_comparison("m")
    assert got["missing"] == ["rtn-w3-g128-sym", "gptq-w3-g128-sym", "rtn-w4-g128-asym", "gptq-w4-g128-asym",
                              "rtn-w3-g128-asym", "gptq-w3-g128-asym"]
    rows = {r["run"]: r for r in got["rows"]}
    assert rows["gptq-w4-g128-sym"]["prose ppl"] == 12.0 and rows["gptq-w4-g128-sym"]["code ppl"] == 6.0
    assert rows["gptq-w4-g128-sym"]["calibration"] == "128 x 512 prose" and rows["fp"]["bits"] == 32
    assert rows["rtn-w4-g128-sym"]["calibration"] == "none" and rows["fp"]["quantize s"] == 0.0


def test_samples_rows_side_by_side():
    from gptq_explorer.metrics import SAMPLE_PROMPTS

    runs = {"fp": {"samples": {p: f"fp {i}" for i, p in enumerate(SAMPLE_PROMPTS)}},
            "q": {"samples": {p: f"q {i}" for i, p in enumerate(SAMPLE_PROMPTS)}}, "old": {"perplexity": {}}}
    rows = L.samples_rows(runs, {"FP": "fp", "GPTQ": "q"})
    assert [r["prompt"] for r in rows] == list(SAMPLE_PROMPTS)
    assert rows[1] == {"prompt": SAMPLE_PROMPTS[1], "FP": "fp 1", "GPTQ": "q 1"}
    with pytest.raises(ValueError, match=r"no samples in the stored run\(s\) \['old'\].*--samples"):
        L.samples_rows(runs, {"FP": "fp", "old": "old"})
