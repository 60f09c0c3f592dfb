"""The logic behind the lesson notebooks (notebooks/0*.ipynb): every number a lesson states is computed here.

The notebooks stay short: they call these functions, show the figures and tables they return, and assert
the claims their text makes. tests/test_lessons_<module>.py checks the same functions with numeric
assertions. A notebook imports its lesson's module and the display helpers:

    from gptq_explorer.lessons import rtn_errors as L
    from gptq_explorer.lessons.display import html_table, setup, show

Modules
  display              setup (torch threads), show (plotly, offline), html_table
  measures             relative weight and output errors, the inputs' Hessian, geometric means of errors
  real_layers          real linears' weights and inputs on calibration and held-out text (lessons 4-6)
  rtn_errors           lesson 1: why round-to-nearest fails
  obs_update           lesson 2: the OBS update on three real weights
  step_by_step         lesson 3: GPTQ step by step
  seed_lesson          the seed lesson's claim, measured (lesson 3 re-creates its loop)
  bits_and_groups      lesson 4: bits and group size
  act_order            lesson 5: desc_act and static groups
  damping_calibration  lesson 6: damping and calibration data
  whole_model          lesson 7: the whole model
  export_deploy        lesson 8: export and deploy
  after_gptq           lesson 9: after GPTQ (the methods beyond the paper; GPTQ as Babai's nearest plane)

`stored(name)` reads the numbers of runs too large for a notebook, made once with these modules:
data/results/lessons/<name>.json (services.results finds data/results), whose "how" says how each was
made.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

MODULES = ("display", "measures", "real_layers", "rtn_errors", "obs_update", "step_by_step", "seed_lesson",
           "bits_and_groups", "act_order", "damping_calibration", "whole_model", "export_deploy",
           "after_gptq")


def results_folder() -> Path:
    """Where the lessons' stored runs live: <results>/lessons (see services.results.results_dir)."""
    from ..services.results import results_dir

    return results_dir() / "lessons"


def stored(name: str) -> dict:
    """The stored numbers <results>/lessons/<name>.json holds (its "numbers"), e.g. stored("full_setting")."""
    path = results_folder() / f"{name}.json"
    try:
        return json.loads(path.read_text())["numbers"]
    except FileNotFoundError:
        found = sorted(p.stem for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"no stored lesson results {path}; there are {found}") from None


def __getattr__(name: str):
    """`lessons.<module>` after `from gptq_explorer import lessons`: the module, imported on first use."""
    if name in MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
