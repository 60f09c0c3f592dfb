"""The method table's claims (docs/methods.md), checked against the shipped reports of
benchmarks/bench_methods.py in data/results/methods/smollm2-135m/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptq_explorer.settings import BEYOND_PAPER_KEYS, defaults

FOLDER = Path(__file__).resolve().parents[1] / "data" / "results" / "methods" / "smollm2-135m"
REPORTS = {p.stem: json.loads(p.read_text()) for p in sorted(FOLDER.glob("*.json"))}


def ppl(name: str) -> dict:
    return REPORTS[name]["perplexity"]


def better(a: str, b: str) -> bool:
    """Run a has a lower perplexity than run b on both corpora."""
    return all(ppl(a)[c] < ppl(b)[c] for c in ("prose", "code"))


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_every_report_states_the_reduced_protocol_and_its_method(name):
    r = REPORTS[name]
    assert r["evaluation"]["tokens"] == 16384 and r["evaluation"]["seqlen"] == 512
    assert r["threads"] == 1
    if r["method"] == "fp":
        return
    if r["method"] != "rtn":  # RTN uses no calibration data
        assert r["calibration"]["nsamples"] == 32 and r["calibration"]["seqlen"] == 512
        assert r["calibration"]["corpus"] == "prose"
    cfg = {**defaults(BEYOND_PAPER_KEYS), **r["config"]}
    assert r["method"] == name.split("-")[0] or (name.startswith("gptaq") and r["method"] == "gptq")
    assert (cfg["mse_norm"] == 2.4) == ("mse" in name)
    assert (cfg["gptaq_alpha"] == 0.25) == name.startswith("gptaq")
    assert (cfg["rotation"] == "hadamard") == ("had" in name)
    assert (cfg["group_aware"] or cfg["desc_act"]) == ("order" in name)
    bits, group = name.rsplit("-", 2)[-2:]
    assert f"w{cfg['bits']}" == bits
    assert group == ("grow" if cfg["group_size"] == -1 else f"g{cfg['group_size']}")


def test_gptq_beats_rtn():
    for grid in ("w4-g128", "w3-g128"):
        assert better(f"gptq-{grid}", f"rtn-{grid}")


@pytest.mark.parametrize("method", ["gptq-mse", "gptq-order", "gptaq", "gptq-had"])
def test_each_method_beats_plain_gptq_at_3_bits(method):
    """At 3-bit g128 the MSE grid, GAR, GPTAQ and the rotation each lower both perplexities by 10%+."""
    assert all(ppl(f"{method}-w3-g128")[c] < 0.9 * ppl("gptq-w3-g128")[c] for c in ("prose", "code"))


def test_gptaq_costs_two_streams_and_about_twice_the_time():
    gptq, gptaq = REPORTS["gptq-w3-g128"], REPORTS["gptaq-w3-g128"]
    assert gptaq["memory"]["gptaq_streams"] == 2
    assert gptaq["memory"]["activation_buffers_bytes"] == 2 * gptq["memory"]["activation_buffers_bytes"]
    assert 1.2 < gptaq["timings"]["quantize"] / gptq["timings"]["quantize"] < 4


def test_the_page_shows_the_reports():
    """docs/methods.md's table is benchmarks/bench_methods.py --markdown, number for number."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_methods", FOLDER.parents[3] / "benchmarks" /
                                                  "bench_methods.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    page = (FOLDER.parents[3] / "docs" / "methods.md").read_text()
    assert bench.markdown(FOLDER) in page


def test_rotation_helps_most_and_gptaq_trades_its_own_fit_for_the_full_precision_outputs():
    singles = ("gptq-mse", "gptq-order", "gptaq", "gptq-had")
    assert min(singles, key=lambda m: ppl(f"{m}-w3-g128")["prose"]) == "gptq-had"

    def median_error(name):
        errs = sorted(x["output_rel_error"] for x in REPORTS[name]["layers"])
        return errs[len(errs) // 2]

    assert median_error("gptaq-w3-g128") > median_error("gptq-w3-g128")
    assert better("gptaq-w3-g128", "gptq-w3-g128")


def test_the_methods_add_up():
    """GPTAQ + MSE grid + rotation is the best 3-bit row, within 40% of the unquantized model."""
    w3 = [n for n in REPORTS if n.endswith("-w3-g128")]
    assert min(w3, key=lambda n: ppl(n)["prose"]) == "gptaq-mse-had-w3-g128"
    assert min(w3, key=lambda n: ppl(n)["code"]) == "gptaq-mse-had-w3-g128"
    assert all(ppl("gptaq-mse-had-w3-g128")[c] < 1.4 * ppl("fp")[c] for c in ("prose", "code"))
    assert better("gptaq-mse-order-w3-g128", "gptaq-w3-g128")


def test_rotation_without_gptq_hurts_rtn():
    """The surprise docs/methods.md reports: the rotation that helps GPTQ most makes RTN worse."""
    assert better("rtn-w3-g128", "rtn-had-w3-g128")
    assert better("gptq-had-w3-g128", "gptq-w3-g128")


def test_the_rotation_damage_is_v_proj_s():
    """docs/methods.md, "Why the rotation hurts RTN": the whole-model table (bench_rotation_rtn.py --ablation)
    starts from the shipped RTN reports (the rotated row within float rounding of its report), and its claim
    holds on it: rotating v_proj alone does the damage, rotating everything else does not."""
    page = (FOLDER.parents[3] / "docs" / "methods.md").read_text()
    section = page.split("### Why the rotation hurts RTN", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].replace(".", "").isdigit():
            rows[cells[0].split(" (")[0]] = {"prose": float(cells[1]), "code": float(cells[2])}
    assert set(rows) == {"none", "every linear", "every linear but v_proj", "v_proj only"}
    for c in ("prose", "code"):
        assert rows["none"][c] == round(ppl("rtn-w3-g128")[c], 2)
        assert rows["every linear"][c] == pytest.approx(ppl("rtn-had-w3-g128")[c], rel=1e-3)
        assert rows["every linear but v_proj"][c] < 1.05 * rows["none"][c]
        assert rows["v_proj only"][c] > 2.5 * rows["none"][c]
