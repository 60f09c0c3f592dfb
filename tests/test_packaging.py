"""pyproject.toml and environment.yml install the same packages with the same lower bounds."""

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge name -> PyPI name


def _split(req: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req).groups()
    return name.lower().replace("_", "-"), spec.replace(" ", "")


def _pyproject() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    return dict(_split(r) for r in reqs)


def _environment() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-e") or item.startswith("python") or item == "pip":
                continue
            name, spec = _split(item)
            out[CONDA_NAMES.get(name, name)] = spec
    return out


def test_environment_matches_pyproject():
    py, conda = _pyproject(), _environment()
    assert sorted(py) == sorted(conda), f"only in pyproject: {set(py) - set(conda)}; only in " \
                                        f"environment.yml: {set(conda) - set(py)}"
    for name, spec in py.items():
        assert conda[name] == spec, f"{name}: pyproject {spec!r} vs environment.yml {conda[name]!r}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "./run.sh test" in readme and "./run.sh app" in readme
    assert "./run.sh test" in (ROOT / ".ci" / "run").read_text()
