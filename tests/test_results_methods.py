"""The method table's claims (docs/methods.md), checked against the shipped reports of
benchmarks/bench_methods.py in data/results/methods/smollm2-135m/."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from gptq_explorer.settings import BEYOND_PAPER_KEYS, defaults

FOLDER = Path(__file__).resolve().parents[1] / "data" / "results" / "methods" / "smollm2-135m"
REPORTS = {p.stem: json.loads(p.read_text()) for p in sorted(FOLDER.glob("*.json"))}
# repeats on other calibration windows: (seed, name) -> report (bench_methods.py --seed N, in seed-N/)
SEEDS = {(int(p.parent.name.removeprefix("seed-")), p.stem): json.loads(p.read_text())
         for p in sorted(FOLDER.glob("seed-*/*.json"))}
SINGLES = ("gptq-mse", "gptq-order", "gptaq", "gptq-had")  # one method on top of GPTQ


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_methods", FOLDER.parents[3] / "benchmarks" /
                                                  "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench_module()  # the benchmark that wrote the reports: its table and its median layer error


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
        assert r["calibration"]["corpus"] == "prose" and r["calibration"]["seed"] == 0
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
    for grid in ("w4-g128", "w3-g128", "w3-grow"):
        assert better(f"gptq-{grid}", f"rtn-{grid}")


@pytest.mark.parametrize("method", ["gptq-mse", "gptq-order", "gptaq", "gptq-had"])
def test_each_method_beats_plain_gptq_at_3_bits(method):
    """At 3-bit g128 the MSE grid, GAR, GPTAQ and the rotation each lower both perplexities by 10%+."""
    assert all(ppl(f"{method}-w3-g128")[c] < 0.9 * ppl("gptq-w3-g128")[c] for c in ("prose", "code"))


def test_gptaq_costs_two_streams_and_about_twice_the_time():
    gptq, gptaq = REPORTS["gptq-w3-g128"], REPORTS["gptaq-w3-g128"]
    assert gptaq["memory"]["gptaq_streams"] == 2
    # hidden-state buffers: 4 against GPTQ's 2 on the paper's loop, 3 on the single pass (the reports
    # shipped so far ran GPTAQ on the loop)
    buffers = 3 if gptaq["memory"]["single_pass"] else 4
    gptq_buffers = gptq["memory"]["activation_buffers_bytes"]
    assert 2 * gptaq["memory"]["activation_buffers_bytes"] == buffers * gptq_buffers
    assert 1.2 < gptaq["timings"]["quantize"] / gptq["timings"]["quantize"] < 4


def test_the_page_shows_the_reports():
    """docs/methods.md's table is benchmarks/bench_methods.py --markdown, number for number."""
    page = (FOLDER.parents[3] / "docs" / "methods.md").read_text()
    assert BENCH.markdown(FOLDER) in page


def median_error(name: str) -> float:
    return BENCH.median_layer_error(REPORTS[name])


def test_rotation_helps_most_and_gptaq_trades_its_own_fit_for_the_full_precision_outputs():
    assert min(SINGLES, key=lambda m: ppl(f"{m}-w3-g128")["prose"]) == "gptq-had"
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
    """The surprise docs/methods.md reports: the rotation that helps GPTQ most makes RTN worse with groups
    of 128 (at 3 and 4 bits); per row, where one range spans the outlier inputs, it helps RTN too."""
    for grid in ("w3-g128", "w4-g128"):
        assert better(f"rtn-{grid}", f"rtn-had-{grid}")
        assert better(f"gptq-had-{grid}", f"gptq-{grid}")
    assert all(ppl("rtn-had-w3-grow")[c] < 0.5 * ppl("rtn-w3-grow")[c] for c in ("prose", "code"))


def test_at_4_bits_every_method_beats_plain_gptq():
    """w4-g128: each method lowers both perplexities (by less than at 3 bits), the rotation most; GPTAQ +
    MSE grid + rotation is the best row, within 4% (prose) and 8% (code) of the unquantized model."""
    for m in SINGLES:
        assert better(f"{m}-w4-g128", "gptq-w4-g128"), m
        assert ppl(f"{m}-w4-g128")["prose"] > 0.75 * ppl("gptq-w4-g128")["prose"], m
    for c in ("prose", "code"):
        assert min(SINGLES, key=lambda m: ppl(f"{m}-w4-g128")[c]) == "gptq-had"
    w4 = [n for n in REPORTS if n.endswith("-w4-g128")]
    for c, within in (("prose", 1.04), ("code", 1.08)):
        assert min(w4, key=lambda n: ppl(n)[c]) == "gptaq-mse-had-w4-g128"
        assert ppl("gptaq-mse-had-w4-g128")[c] < within * ppl("fp")[c]
    assert ppl("rtn-mse-w4-g128")["prose"] < ppl("rtn-w4-g128")["prose"]
    assert ppl("rtn-mse-w4-g128")["code"] > ppl("rtn-w4-g128")["code"]


def test_per_row_the_mse_grid_hurts_gptq_unless_rotated():
    """w3-grow: RTN falls apart and every GPTQ row rescues it; the rotation is the best single method; the
    MSE grid makes GPTQ worse although it lowers the median layer error, because of a few layers it breaks
    (docs/methods.md, "Why the MSE grid hurts GPTQ per row"), and still helps RTN and, with the rotation,
    GPTAQ."""
    assert min(ppl("rtn-w3-grow").values()) > 5000
    gpt = [n for n in REPORTS if n.endswith("-w3-grow") and n.startswith("gpt")]
    assert all(ppl(n)[c] < ppl("rtn-w3-grow")[c] / 20 for n in gpt for c in ("prose", "code"))
    for c in ("prose", "code"):
        assert min(SINGLES, key=lambda m: ppl(f"{m}-w3-grow")[c]) == "gptq-had"
    assert better("gptq-w3-grow", "gptq-mse-w3-grow")
    assert median_error("gptq-mse-w3-grow") < 0.6 * median_error("gptq-w3-grow")
    ratios = [b["output_rel_error"] / a["output_rel_error"]
              for a, b in zip(REPORTS["gptq-w3-grow"]["layers"], REPORTS["gptq-mse-w3-grow"]["layers"],
                              strict=True)]
    assert sum(r > 1 for r in ratios) == 20 and sum(r > 10 for r in ratios) == 4
    assert better("rtn-mse-w3-grow", "rtn-w3-grow")
    assert better("gptaq-mse-had-w3-grow", "gptaq-w3-grow")
    assert better("gptaq-mse-had-w3-grow", "gptq-had-w3-grow")
    assert better("gptaq-mse-had-w3-grow", "gptaq-had-w3-grow")
    grow = [n for n in REPORTS if n.endswith("-w3-grow")]
    for c, within in (("prose", 1.25), ("code", 1.45)):
        assert min(grow, key=lambda n: ppl(n)[c]) == "gptaq-mse-had-w3-grow"
        assert ppl("gptaq-mse-had-w3-grow")[c] < within * ppl("fp")[c]


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


def over_seeds(name: str) -> dict[int, dict]:
    """A run's perplexities by calibration seed: 0 from the table, the others from the repeats."""
    return {0: ppl(name), **{s: r["perplexity"] for (s, n), r in SEEDS.items() if n == name}}


@pytest.mark.parametrize("key", sorted(SEEDS))
def test_seed_repeats_change_only_the_calibration_seed(key):
    seed, name = key
    r, r0 = SEEDS[key], REPORTS[name]
    assert seed > 0 and r["calibration"]["seed"] == seed
    assert (r["method"], r["config"], r["evaluation"]) == (r0["method"], r0["config"], r0["evaluation"])
    assert {**r["calibration"], "seed": 0} == r0["calibration"]


def test_gptaq_against_gar_over_seeds():
    """w4-g128, the close call repeated on calibration seeds 0-2: GPTAQ is lower on prose with every seed,
    GAR lower on code with every seed (by 0.6-3.1%): neither wins both; the seed alone moves plain GPTQ's
    code perplexity by more than 4%. The MSE grid beats plain GPTQ on both corpora with each seed tried."""
    gar, gptaq, gptq, mse = (over_seeds(f"{m}-w4-g128") for m in ("gptq-order", "gptaq", "gptq", "gptq-mse"))
    assert set(gar) == set(gptaq) == set(gptq) == {0, 1, 2}
    for s in gar:
        assert gptaq[s]["prose"] < gar[s]["prose"], s
        assert gar[s]["code"] < gptaq[s]["code"] < 1.04 * gar[s]["code"], s
    codes = [r["code"] for r in gptq.values()]
    assert max(codes) > 1.04 * min(codes)
    assert set(mse) == {0, 1}
    assert all(mse[s][c] < gptq[s][c] for s in mse for c in ("prose", "code"))


def test_gptaq_on_the_single_pass_costs_less_than_on_the_loop():
    """The table's GPTAQ rows ran on the paper's loop (more than 4x GPTQ's quantize time); the seed repeats
    ran on the single pass: 1.8x and 2.7x the time of GPTQ's repeats with the same seed (the second while
    the unit tests shared the machine; docs/performance.md has the side-by-side measurement), and they keep
    each block's full-precision linear inputs: tokens x (3 x 576 + 1536) float32."""
    for grid in ("w4-g128", "w3-grow"):
        loop, gptq = REPORTS[f"gptaq-{grid}"], REPORTS[f"gptq-{grid}"]
        assert not loop["memory"]["single_pass"]
        assert loop["timings"]["quantize"] > 4 * gptq["timings"]["quantize"]
    for s in (1, 2):
        gptaq, gptq = SEEDS[(s, "gptaq-w4-g128")], SEEDS[(s, "gptq-w4-g128")]
        assert gptaq["memory"]["single_pass"] and gptaq["memory"]["gptaq_streams"] == 2
        assert gptaq["timings"]["quantize"] < 3 * gptq["timings"]["quantize"]
        assert gptaq["timings"]["quantize"] < 0.7 * REPORTS["gptaq-w4-g128"]["timings"]["quantize"]
        assert gptaq["memory"]["gptaq_fp_inputs_bytes"] == 32 * 512 * (3 * 576 + 1536) * 4
