"""The lessons' stored runs (data/results/lessons/*.json, read with lessons.stored): the numbers agree with
each other and with what the lessons compute from them."""

from __future__ import annotations

import pytest

from gptq_explorer import lessons
from gptq_explorer.checkpoint.storage import linear_storage
from gptq_explorer.lessons.step_by_step import lesson3_claims


def test_full_setting_results_are_consistent():
    full = lessons.stored("full_setting")
    l1 = full["lesson1"]
    assert l1["ppl_increase"] == pytest.approx(l1["ppl_rtn"] / l1["ppl_fp"] - 1, abs=1e-3)
    assert l1["final_amplification"] == pytest.approx(l1["final_cumulative"] / l1["final_isolated"], abs=2e-3)
    claims = lesson3_claims(full["lesson3"])
    assert claims["left_to_right_worst"] and claims["desc_act_best"]
    assert claims["greedy_not_better_than_best_shared"] and claims["pure_greedy_worse_than_all_shared"]
    assert claims["kept_without_downdate_gptq_grid"] == pytest.approx(0.2015, abs=2e-3)
    assert full["lesson2"]["tokens"] == 128 * 512


def test_whole_model_results_are_consistent():
    runs = lessons.stored("whole_model")
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    bits = sum(linear_storage(o, i, 4, 128).total_bits for o, i in shapes) / sum(o * i for o, i in shapes)
    for key, r in runs.items():
        assert r["ppl prose"] > 1 and r["ppl code"] > 1
        if key != "fp":
            assert r["bits per weight"] == pytest.approx(bits, abs=1e-4) and r["dead inputs"] == 0
            assert r["ppl prose"] > runs["fp"]["ppl prose"] and r["ppl code"] > runs["fp"]["ppl code"]


def test_stored_names_what_exists():
    with pytest.raises(FileNotFoundError, match="full_setting"):
        lessons.stored("nothing")
